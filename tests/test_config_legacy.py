"""Configs and checkpoints written before ``ModelConfig`` had one section per mixer still load.

``tests/data/legacy_flat_config/`` was written by the code of that time (commit d3d1622):
``flat_presets.json`` holds every preset as the old flat record, and ``workdir/`` a 2-step
training run of a model with one layer of every mixer, with the logits that code computed from
the checkpoint (``logits.npy`` for ``tokens.npy``).
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import PRESETS, LanguageModel, ModelConfig
from jaxbased.config_legacy import LEGACY_FIELDS, upgrade_flat_config
from jaxbased.layers import MIXERS
from jaxbased.training.checkpointing import load_for_inference

DATA = pathlib.Path(__file__).parent / "data" / "legacy_flat_config"
FLAT_PRESETS = json.loads((DATA / "flat_presets.json").read_text())


def test_every_preset_of_the_old_flat_format_is_read_as_the_preset():
    # The record holds the presets of its time; presets added later have no flat form.
    assert set(FLAT_PRESETS) <= set(PRESETS)
    for name, flat in FLAT_PRESETS.items():
        assert ModelConfig.from_dict(flat) == PRESETS[name](), name


def test_every_old_field_has_a_new_place():
    flat_names = set(FLAT_PRESETS["based_360m"])
    model_fields = set(ModelConfig().to_dict()) - set(MIXERS)
    assert flat_names - model_fields == set(LEGACY_FIELDS)
    for targets in LEGACY_FIELDS.values():
        for section, field in targets:
            assert field in getattr(ModelConfig(), section).to_dict(), (section, field)


def test_shared_old_fields_fill_every_used_section_and_conflicts_are_named():
    flat = {**FLAT_PRESETS["mamba2_hybrid_tiny"], "attention_heads": 2, "chunk_size": 8}
    config = ModelConfig.from_dict(flat)
    assert config.attention.heads == 2 and config.attention.rotary_fraction == 0.0
    assert config.based.chunk_size == 64  # no based layer: the section keeps its default
    upgraded = upgrade_flat_config(flat, ["attention", "sliding_window", "based"])
    assert upgraded["sliding_window"]["heads"] == upgraded["attention"]["heads"] == 2
    assert upgraded["based"]["chunk_size"] == 8
    with pytest.raises(ValueError, match=r"attention.heads=4 disagrees with the old flat field"):
        upgrade_flat_config({"attention_heads": 2, "attention": {"heads": 4}}, ["attention"])


def test_a_checkpoint_of_the_old_format_loads_and_gives_its_logits():
    config, params, tokenizer = load_for_inference(DATA / "workdir")
    assert config.layer_pattern == (  # one layer of every mixer of that time
        "base_conv",
        "based",
        "sliding_window",
        "attention",
        "mamba",
        "mamba2",
        "decay_attention",
        "mlp",
    )
    assert config.based.feature_dim == 4 and config.sliding_window.window == 4
    assert config.mamba.scan_algorithm == "sequential" and config.mamba2.state_dim == 8
    assert tokenizer.vocab_size == config.vocab_size == 257
    logits = LanguageModel(config).apply(
        {"params": params}, jnp.asarray(np.load(DATA / "tokens.npy"))
    )
    # The recorded logits were computed on another machine: XLA's CPU code differs with the
    # instruction set (FMA contraction, vector widths), so the last float32 bit may differ. A
    # wrong parameter, mixer or norm would move them by far more than this.
    np.testing.assert_allclose(
        np.asarray(logits), np.load(DATA / "logits.npy"), rtol=1e-5, atol=1e-6
    )
