"""Checkpoints: Orbax ``CheckpointManager`` with the train state, the data iterator state and the
run's metadata (model config, tokenizer) saved together under one step.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it when
complete, so an interrupted save is never taken for a checkpoint); the last ``keep`` are kept.
``load_for_inference`` reads a workdir for generation without any training state.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxbased.config import ModelConfig
from jaxbased.data.tokenizers import Tokenizer, load_tokenizer

CHECKPOINT_SUBDIR = "checkpoints"
TOKENIZER_SUBDIR = "tokenizer"
ITEMS = ("state", "data", "metadata")


#: Model fields that do not change the model's function: a checkpoint resumes across them
#: (``scan_layers`` changes the parameter layout, which resuming converts:
#: ``jaxbased.layer_layout``).
LAYOUT_ONLY_FIELDS = ("remat", "scan_layers")


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of a different model."""


class Checkpointer:
    """Save and restore ``(train state, data iterator state, metadata)`` in ``workdir``."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_SUBDIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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


def check_compatible(saved_model: dict, config: ModelConfig, workdir: pathlib.Path) -> None:
    """Raise ``IncompatibleCheckpointError`` naming every model field that differs
    (``based.feature_dim`` for a section's field), apart from ``LAYOUT_ONLY_FIELDS``.

    The saved record is read as ``ModelConfig.from_dict`` reads it: a field missing from it (a
    checkpoint written before the field existed) counts as its default, and an old flat record
    is converted to sections first.
    """
    try:
        saved = _flat_fields(ModelConfig.from_dict(saved_model).to_dict())
    except ValueError as error:
        raise IncompatibleCheckpointError(
            f"workdir {str(workdir)!r} holds a checkpoint whose model config cannot be read "
            f"({error}); use a new --workdir"
        ) from None
    current = _flat_fields(config.to_dict())
    differences = [
        f"{name}: checkpoint {saved[name]!r} vs config {current[name]!r}"
        for name in sorted(current)
        if saved[name] != current[name] and name not in LAYOUT_ONLY_FIELDS
    ]
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
    latest complete checkpoint. Raises ``ValueError`` if there is none.
    """
    workdir = pathlib.Path(workdir)
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"workdir {str(workdir)!r} holds no complete checkpoint")
        metadata = checkpointer.metadata(step)
        config = ModelConfig.from_dict(metadata["model"])
        target = _single_device_state(config)
        restored = checkpointer.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        params = jax.tree.map(np.asarray, restored["state"].params)
    finally:
        checkpointer.close()
    tokenizer = load_tokenizer(metadata["tokenizer"], workdir / TOKENIZER_SUBDIR)
    return config, params, tokenizer
