"""Checkpoints: Orbax ``CheckpointManager`` with the train state, the data iterator state and the
run's metadata (model config, tokenizer) saved together under one step.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it when
complete, so an interrupted save is never taken for a checkpoint); the last ``keep`` are kept.
``load_for_inference`` reads a workdir for generation without any training state.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxbased.config import ModelConfig
from jaxbased.data.tokenizers import Tokenizer, load_tokenizer

CHECKPOINT_SUBDIR = "checkpoints"
TOKENIZER_SUBDIR = "tokenizer"
DAMAGED_SUBDIR = "damaged_checkpoints"
ITEMS = ("state", "data", "metadata")
# Orbax's marker of a finished step folder and of a finished item, and the item files every
# intact step holds (a step lacking one is damaged before any array is read).
STEP_MARKER = "_CHECKPOINT_METADATA"
ITEM_FILES = {
    "state": ("_METADATA", "manifest.ocdbt"),
    "data": ("metadata",),
    "metadata": ("metadata",),
}
Restored = TypeVar("Restored")


#: Model fields that do not change the model's function: a checkpoint resumes across them
#: (``scan_layers`` changes the parameter layout, which resuming converts:
#: ``jaxbased.layer_layout``).
LAYOUT_ONLY_FIELDS = ("remat", "scan_layers")


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of a different model."""


class DamagedCheckpointError(OSError):
    """Every checkpoint of the workdir (or the one asked for) is damaged; none is deleted."""


class Checkpointer:
    """Save and restore ``(train state, data iterator state, metadata)`` in ``workdir``.

    ``create=False`` reads an existing ``checkpoints/`` folder without creating anything (a
    missing folder is a ``ValueError``).

    A damaged step (a missing or truncated file, an empty step folder, metadata that does not
    match its arrays) is found by :meth:`restore_newest_intact`, which falls back to the newest
    step that reads completely and says which steps it skipped; damaged steps are never deleted.
    """

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        keep: int = 3,
        async_save: bool = True,
        create: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINT_SUBDIR
        if not create and not self.directory.is_dir():
            raise ValueError(
                f"workdir {str(workdir)!r} holds no {CHECKPOINT_SUBDIR}/ folder (not a train.py "
                "or jaxbased-convert workdir)"
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=create
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Every finished step, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def missing_files(self, step: int) -> str | None:
        """Why ``step``'s folder is damaged when a file every intact step has is missing or
        empty (None when all are there; their contents are checked only by reading them)."""
        folder = self.directory / str(step)
        if not folder.is_dir() or not any(folder.iterdir()):
            return "its folder is empty"
        for item, names in ITEM_FILES.items():
            for name in names:
                path = folder / item / name
                if not path.is_file():
                    return f"{item}/{name} is missing"
                if path.stat().st_size == 0:
                    return f"{item}/{name} is empty"
        return None

    def restore_newest_intact(
        self, read: Callable[[int], Restored], steps: list[int] | None = None
    ) -> tuple[int, Restored, dict[int, str]] | None:
        """``(step, read(step), damaged)`` for the newest of ``steps`` (default: all, newest
        first) whose files are all there and whose ``read`` succeeds; ``damaged`` maps each newer
        step skipped to why. None when there is no step. One warning names the skipped steps.

        ``read`` raising ``IncompatibleCheckpointError`` is not damage: it propagates. Raises
        :class:`DamagedCheckpointError` when every step is damaged.
        """
        steps = self.steps() if steps is None else steps
        if not steps:
            return None
        damaged: dict[int, str] = {}
        last_error: Exception | None = None
        for step in steps:
            reason = self.missing_files(step)
            if reason is None:
                try:
                    restored = read(step)
                except IncompatibleCheckpointError:
                    raise
                except Exception as error:  # any unreadable file is damage
                    details = " ".join(str(error).split()).split(" See full TensorStore")[0]
                    reason = f"unreadable: {type(error).__name__}: {details}"[:200]
                    last_error = error
                else:
                    if damaged:
                        logging.warning(
                            "checkpoint %s of %s %s damaged (%s); using step %d (nothing was "
                            "deleted)",
                            ", ".join(f"step {s}" for s in damaged),
                            self.directory,
                            "is" if len(damaged) == 1 else "are",
                            "; ".join(f"step {s}: {why}" for s, why in damaged.items()),
                            step,
                        )
                    return step, restored, damaged
            damaged[step] = reason
        error = DamagedCheckpointError(
            f"no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {why}" for s, why in damaged.items())
            + " (nothing was deleted; move the folder away to start afresh)"
        )
        raise error from last_error

    def set_aside(self, step: int) -> pathlib.Path:
        """Move damaged ``step`` to ``<workdir>/damaged_checkpoints/<step>[-N]`` (kept for
        inspection), so that a resumed run can save that step number again (Orbax refuses to
        overwrite a step); returns where it went."""
        target_folder = self.workdir / DAMAGED_SUBDIR
        target_folder.mkdir(exist_ok=True)
        target = target_folder / str(step)
        suffix = 1
        while target.exists():
            target, suffix = target_folder / f"{step}-{suffix}", suffix + 1
        (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def save(self, step: int, state: Any, data_state: dict, metadata: dict) -> None:
        """Start saving (returns before the write finishes when async)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                metadata=ocp.args.JsonSave(metadata),
            ),
            force=True,
        )

    def metadata(self, step: int) -> dict:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
        )
        return dict(restored["metadata"])

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """The state (shaped like ``abstract_state``), data iterator state and metadata."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                metadata=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["data"]), dict(restored["metadata"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def model_differences(saved_model: dict, config: ModelConfig) -> list[str]:
    """``"name: checkpoint X vs config Y"`` for every model field of the saved record that
    differs from ``config`` (``based.feature_dim`` for a section's field), apart from
    ``LAYOUT_ONLY_FIELDS``; empty when the two are the same model.

    The saved record is read as ``ModelConfig.from_dict`` reads it: a field missing from it (a
    checkpoint written before the field existed) counts as its default, and an old flat record
    is converted to sections first. Raises ``ValueError`` when the record cannot be read.
    """
    saved = _flat_fields(ModelConfig.from_dict(saved_model).to_dict())
    current = _flat_fields(config.to_dict())
    return [
        f"{name}: checkpoint {saved[name]!r} vs config {current[name]!r}"
        for name in sorted(current)
        if saved[name] != current[name] and name not in LAYOUT_ONLY_FIELDS
    ]


def check_compatible(saved_model: dict, config: ModelConfig, workdir: pathlib.Path) -> None:
    """Raise ``IncompatibleCheckpointError`` naming every model field that differs
    (:func:`model_differences`)."""
    try:
        differences = model_differences(saved_model, config)
    except ValueError as error:
        raise IncompatibleCheckpointError(
            f"workdir {str(workdir)!r} holds a checkpoint whose model config cannot be read "
            f"({error}); use a new --workdir"
        ) from None
    if differences:
        raise IncompatibleCheckpointError(
            f"workdir {str(workdir)!r} holds a checkpoint of an incompatible model ("
            + "; ".join(differences)
            + "); use a new --workdir or the same model config"
        )


def _flat_fields(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"based": {"chunk_size": 16}}`` -> ``{"based.chunk_size": 16}``."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat_fields(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _single_device_state(config: ModelConfig) -> Any:
    """The abstract train state of ``config`` on this host's first device: the restore target
    that reads a checkpoint saved on any mesh (the optimizer's hyper-parameters do not change
    its state's structure), in ``config``'s parameter layout (stacked when it scans its
    layers; a checkpoint's stored config names the layout it was saved in)."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    from jaxbased.model import LanguageModel
    from jaxbased.training.optimizer import make_optimizer
    from jaxbased.training.state import TrainState

    model = LanguageModel(config)
    optimizer = make_optimizer(optax.constant_schedule(1.0))

    def init() -> TrainState:
        params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
        return TrainState.create(nn.meta.unbox(params), optimizer)

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
        jax.eval_shape(init),
    )


def load_for_inference(
    workdir: str | pathlib.Path, step: int | None = None
) -> tuple[ModelConfig, Any, Tokenizer]:
    """The model config, float32 parameters and tokenizer of a ``train.py`` workdir.

    The parameters have the layout the checkpoint was saved in, which its config names
    (``config.scan_layers``): they fit ``LanguageModel(config)`` as returned;
    ``jaxbased.layer_layout.convert_layout`` gives the other layout. ``step`` defaults to the
    newest intact checkpoint (a damaged newer one is skipped with a warning). Raises
    ``ValueError`` if there is none, ``DamagedCheckpointError`` if every one (or ``step``) is
    damaged.
    """
    workdir = pathlib.Path(workdir)
    checkpointer = Checkpointer(workdir, async_save=False, create=False)

    def read(step: int) -> tuple[dict, ModelConfig, Any]:
        metadata = checkpointer.metadata(step)
        config = ModelConfig.from_dict(metadata["model"])
        target = _single_device_state(config)
        restored = checkpointer.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return metadata, config, jax.tree.map(np.asarray, restored["state"].params)

    try:
        if step is not None and step not in checkpointer.steps():
            raise ValueError(
                f"workdir {str(workdir)!r} has no checkpoint of step {step} (it has: "
                f"{', '.join(map(str, checkpointer.steps())) or 'none'})"
            )
        found = checkpointer.restore_newest_intact(read, None if step is None else [step])
        if found is None:
            raise ValueError(f"workdir {str(workdir)!r} holds no complete checkpoint")
        _, (metadata, config, params), _ = found
    finally:
        checkpointer.close()
    tokenizer = load_tokenizer(metadata["tokenizer"], workdir / TOKENIZER_SUBDIR)
    return config, params, tokenizer
