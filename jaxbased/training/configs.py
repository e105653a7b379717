"""The sections of a training config, shared by the files in ``configs/``.

Sections: ``model`` (every ``ModelConfig`` field), ``data``, ``train``, ``mesh``, ``sample`` and
``distill`` (EchoAtt distillation from a teacher workdir, off by default).
Each ``configs/<name>.py`` is read with absl ``config_flags``; any field can be overridden on the
command line, e.g. ``--config=configs/based_360m.py --config.model.d_model=512
--config.train.num_steps=100 --config.data.path=/data/pile``. Unknown fields are rejected.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxbased.config import ModelConfig


def data_defaults(**overrides: Any) -> ml_collections.ConfigDict:
    """Data section: ``path`` empty = the built-in corpus (stdlib sources, byte tokenizer)."""
    values = dict(
        path="",
        seq_len=2048,
        batch_size=256,  # global, in sequences
        seed=0,
        prefetch_threads=2,
        builtin_max_bytes=4_000_000,
        validation_fraction=0.02,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def train_defaults(**overrides: Any) -> ml_collections.ConfigDict:
    """Train section with the released recipe (docs/training.md)."""
    values = dict(
        num_steps=20_000,
        learning_rate=8e-4,
        final_learning_rate=8e-5,
        warmup_steps=200,
        warmup_init=1e-6,
        beta1=0.9,
        beta2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,
        grad_accum_steps=1,
        seed=0,
        log_every=10,
        eval_every=1000,
        eval_batches=8,
        checkpoint_every=1000,
        keep_checkpoints=3,
        async_checkpoints=True,
        tensorboard=True,
        peak_flops=0.0,  # FLOP/s for utilisation; 0 = measure a float32 matmul at start
        profile_steps="",  # "START,END": a jax.profiler trace of those steps; "" = none
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def mesh_defaults(**overrides: Any) -> ml_collections.ConfigDict:
    """Device mesh ``(data, fsdp, tensor, sequence)``; one size may be -1 (all remaining
    devices). ``sequence`` splits each sequence's tokens (docs/sequence_parallelism.md)."""
    values = dict(data=-1, fsdp=1, tensor=1, sequence=1)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def sample_defaults(**overrides: Any) -> ml_collections.ConfigDict:
    """What ``train.py`` generates after training (``max_new_tokens=0`` skips it)."""
    values = dict(prompt="def ", max_new_tokens=0, temperature=0.8, top_k=0, seed=0)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def distill_defaults(**overrides: Any) -> ml_collections.ConfigDict:
    """EchoAtt distillation (docs/echoatt.md#distillation-in-trainpy); off while
    ``teacher_workdir`` is empty.

    ``teacher_workdir``: a ``train.py`` workdir of the unshared teacher (its model must be
    ``config.model``). ``steps``: distillation steps, then plain language-model training for the
    rest of ``train.num_steps`` (-1: every step distills; 0: none, the student only starts from
    the teacher's weights). The student shares the layers ``shared_layers`` (``"2,3"``, or
    ``"2:1,3:1"`` with anchors) or, with ``share_fraction`` in (0, 1), the ``round(fraction *
    L)`` full-attention layers whose maps are most alike on ``similarity_sequences``
    validation rows; set one of the two. ``hidden_weight``, ``kl_weight``, ``hard_weight``:
    the loss's weights (jaxbased.training.distillation).
    """
    values = dict(
        teacher_workdir="",
        steps=-1,
        shared_layers="",
        share_fraction=0.0,
        similarity_sequences=16,
        hidden_weight=0.25,
        kl_weight=0.25,
        hard_weight=0.5,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def preset_config(preset: str, **model_overrides: Any) -> ml_collections.ConfigDict:
    """A config whose model is ``preset`` (plus ``model_overrides``), with the released recipe."""
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.model = ml_collections.ConfigDict(
        ModelConfig.from_preset(preset, **model_overrides).to_dict()
    )
    config.data = data_defaults()
    config.train = train_defaults()
    config.mesh = mesh_defaults()
    config.sample = sample_defaults()
    config.distill = distill_defaults()
    return config
