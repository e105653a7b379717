"""Write imported weights as a ``train.py`` workdir, so that ``train.py`` fine-tunes them and
``jaxbased-generate --workdir`` / :func:`~jaxbased.training.checkpointing.load_for_inference`
read them.

The layout is the one ``train.py`` leaves (see :mod:`jaxbased.training.loop`)::

    checkpoints/0/   Orbax checkpoint of step 0: the train state (step 0, float32 parameters, a
                     fresh AdamW state), the data iterator at its start, and the metadata (model
                     config, tokenizer spec, where the weights came from)
    tokenizer/       the tokenizer file and its spec.json

``train.py --workdir=<that dir>`` with the same model config resumes from step 0: the imported
weights, a new optimizer state and the first batch of the given data.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from jaxbased.config import ModelConfig
from jaxbased.data.tokenizers import Tokenizer
from jaxbased.layer_layout import convert_layout

STEP = 0


def initial_data_state() -> dict[str, Any]:
    """The state of a fresh training data iterator (whatever the data: it counts batches)."""
    import grain

    from jaxbased.data.pipeline import make_iterator

    iterator = make_iterator(grain.MapDataset.range(0, 4).batch(2), prefetch_threads=0)
    return dict(iterator.get_state())


def train_state_for(params: Any) -> Any:
    """``TrainState(step=0, params, AdamW state)`` shaped as ``train.py`` restores it.

    The optimizer's hyper-parameters do not change its state's structure, and AdamW's initial
    state is all zeros (step counts, first and second moments), so the state is built from
    shapes alone with NumPy zeros: no second and third copy of the weights is computed (the
    zero pages cost no memory until written).
    """
    import optax

    from jaxbased.training.optimizer import make_optimizer
    from jaxbased.training.state import TrainState

    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)
    optimizer = make_optimizer(optax.constant_schedule(1.0))
    abstract = jax.eval_shape(lambda p: TrainState.create(p, optimizer), params)
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)
    return zeros.replace(params=params)


def _save_tokenizer(tokenizer: Tokenizer, directory: pathlib.Path) -> None:
    staging = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer.save(staging)
    (staging / "spec.json").write_text(json.dumps(tokenizer.spec()))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def write_workdir(
    workdir: str | pathlib.Path,
    config: ModelConfig,
    params: Any,
    tokenizer: Tokenizer,
    *,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Save ``params`` of ``config`` with ``tokenizer`` as step 0 of a ``train.py`` workdir.

    Args:
      workdir: the directory to create (or to reuse, when empty).
      config: the model config stored in the metadata (``train.py`` checks that its own model
        config equals it before resuming).
      params: float32 parameter tree (NumPy or JAX arrays), in either layout; it is saved in
        ``config``'s (``jaxbased.layer_layout``).
      tokenizer: saved into ``workdir/tokenizer`` and named in the metadata.
      source: extra metadata, e.g. where the weights came from.
      overwrite: replace the checkpoints of an existing workdir.

    Returns the checkpoint directory. Raises ``ValueError`` when ``workdir`` already holds
    checkpoints and ``overwrite`` is False, or when the tokenizer's ids do not fit the model.
    """
    from jaxbased.training.checkpointing import CHECKPOINT_SUBDIR, TOKENIZER_SUBDIR, Checkpointer

    workdir = pathlib.Path(workdir).absolute()
    checkpoints = workdir / CHECKPOINT_SUBDIR
    if checkpoints.exists() and any(checkpoints.iterdir()):
        if not overwrite:
            raise ValueError(
                f"workdir {str(workdir)!r} already holds checkpoints; choose a new one or pass "
                "overwrite=True (jaxbased-convert --overwrite)"
            )
        shutil.rmtree(checkpoints)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(tokenizer, workdir / TOKENIZER_SUBDIR)
    metadata = {
        "model": config.to_dict(),
        "tokenizer": tokenizer.spec(),
        "data_path": "",
        "seq_len": None,
        "imported_from": source or {},
    }
    state = train_state_for(convert_layout(params, config))
    checkpointer = Checkpointer(workdir, keep=1, async_save=False)
    try:
        checkpointer.save(STEP, state, initial_data_state(), metadata)
    finally:
        checkpointer.close()
    return checkpointer.directory
