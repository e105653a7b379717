"""The released TransNormerLLM layout: a random-weight ``TransnormerForCausalLM`` checkpoint
written here (config.json + model.safetensors, key names of the released modeling code)
imports through ``load_checkpoint`` and gives the logits of a float64 NumPy reference of the
released model, computed from the checkpoint's own tensors (docs/checkpoints.md)."""

import json

import jax
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig
from jaxbased.interop import (
    CheckpointMismatchError,
    UnsupportedCheckpointError,
    load_checkpoint,
    transnormer_config_from_reference,
)
from tests.conftest import relative_error
from tests.test_transnormer import reference_slopes


def released_config(**overrides) -> dict:
    """A config.json as the released TransNormerLLM-385M writes it (its fields and values)."""
    layers = overrides.pop("decoder_layers", 24)
    values = {
        "architectures": ["TransnormerForCausalLM"],
        "model_type": "transnormer",
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "vocab_size": 64000,
        "use_cache": True,
        "init_std": 0.02,
        "decoder_embed_dim": 1024,
        "decoder_layers": layers,
        "decoder_attention_heads": 8,
        "no_scale_embedding": False,
        "add_bos_token": False,
        "norm_type": "simplermsnorm",
        "linear_use_lrpe_list": [1] + [0] * (layers - 1),
        "hidden_dim": 1024,
        "linear_act_fun": "silu",
        "glu_dim": 2816,
        "bias": False,
        "torch_dtype": "bfloat16",
    }
    return values | overrides


TINY = dict(
    vocab_size=40,
    decoder_embed_dim=16,
    decoder_layers=3,
    decoder_attention_heads=2,
    hidden_dim=16,
    glu_dim=24,
)


def random_state_dict(values: dict, rng) -> dict[str, np.ndarray]:
    """Random float32 tensors under the released keys and shapes (``lm_head`` tied)."""
    d, n, glu = values["decoder_embed_dim"], values["hidden_dim"], values["glu_dim"]
    heads = values["decoder_attention_heads"]
    embedding = rng.normal(size=(values["vocab_size"], d)).astype(np.float32)
    state = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding.copy()}
    for i, lrpe in enumerate(values["linear_use_lrpe_list"]):
        prefix = f"model.layers.{i}."
        state[prefix + "token_mixer.qkvu_proj.weight"] = rng.normal(size=(4 * n, d)) * 0.3
        state[prefix + "token_mixer.out_proj.weight"] = rng.normal(size=(d, n)) * 0.3
        for name, shape in (("l1", (glu, d)), ("l2", (glu, d)), ("l3", (d, glu))):
            state[prefix + f"channel_mixer.{name}.weight"] = rng.normal(size=shape) * 0.3
        if lrpe:  # the released init, perturbed so that a transposed mapping would show
            base = 10000 ** (-2 / d * np.arange(d)).reshape(heads, 1, -1)
            state[prefix + "token_mixer.lrpe.theta"] = base * rng.uniform(0.5, 1.5, base.shape)
    return {key: np.asarray(value, np.float32) for key, value in state.items()}


def released_logits(state: dict, values: dict, tokens: np.ndarray) -> np.ndarray:
    """The released model's forward in float64, from its equations and the state dict."""
    weights = {key: np.asarray(value, np.float64) for key, value in state.items()}
    d, heads, layers = (
        values["decoder_embed_dim"],
        values["decoder_attention_heads"],
        values["decoder_layers"],
    )
    eps = 1e-8

    def srms(z):
        return z / (np.linalg.norm(z, axis=-1, keepdims=True) * z.shape[-1] ** -0.5 + eps)

    def silu(z):
        return z / (1 + np.exp(-z))

    seq = tokens.shape[1]
    x = weights["model.embed_tokens.weight"][tokens] * np.sqrt(d)
    slopes = np.asarray(reference_slopes(heads))
    t = np.arange(seq)
    for i in range(layers):
        prefix = f"model.layers.{i}."
        h = srms(x)
        q, k, v, u = np.split(h @ weights[prefix + "token_mixer.qkvu_proj.weight"].T, 4, axis=-1)
        q, k, v = (z.reshape(*z.shape[:2], heads, -1).transpose(0, 2, 1, 3) for z in (q, k, v))
        q, k = silu(q), silu(k)
        if values["linear_use_lrpe_list"][i]:
            theta = weights[prefix + "token_mixer.lrpe.theta"] * t[None, :, None]  # [H, T, e]
            q = np.concatenate([q * np.cos(theta), q * np.sin(theta)], axis=-1)
            k = np.concatenate([k * np.cos(theta), k * np.sin(theta)], axis=-1)
        rate = slopes * (1 - i / (layers - 1) + 1e-5)
        distance = t[:, None] - t[None, :]
        decay = np.where(distance >= 0, np.exp(-rate[:, None, None] * distance), 0.0)
        o = np.einsum("bhts,bhse->bhte", np.einsum("bhte,bhse->bhts", q, k) * decay, v)
        o = srms(o.transpose(0, 2, 1, 3).reshape(*x.shape[:2], -1)) * u
        x = x + o @ weights[prefix + "token_mixer.out_proj.weight"].T
        h = srms(x)
        glu = (h @ weights[prefix + "channel_mixer.l1.weight"].T) * (
            h @ weights[prefix + "channel_mixer.l2.weight"].T
        )
        x = x + glu @ weights[prefix + "channel_mixer.l3.weight"].T
    return srms(x) @ weights["lm_head.weight"].T


def write_checkpoint(folder, values, state):
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(values))
    save_file(state, str(folder / "model.safetensors"))


def test_a_released_layout_checkpoint_imports_and_gives_the_reference_logits(tmp_path, rng):
    values = released_config(**TINY)
    state = random_state_dict(values, rng)
    write_checkpoint(tmp_path / "tnl", values, state)
    imported = load_checkpoint(tmp_path / "tnl", implementation="xla")
    assert imported.family == "transnormer"
    assert imported.ignored_keys == ("lm_head.weight",)
    config = imported.config
    assert config.transnormer.lrpe_layers == (0,) and config.scale_embedding
    assert config.padded_vocab_size == 40 and config.mlp_hidden_dim == 24
    tokens = np.asarray(rng.integers(0, 40, (2, 13)), np.int32)
    got = jax.jit(LanguageModel(config).apply)({"params": imported.params}, tokens)
    assert relative_error(got, released_logits(state, values, tokens)) <= 1e-5
    # The same checkpoint into a scanned model: layer 0 (LRPE) unrolled, layers 1-2 scanned.
    scanned = load_checkpoint(tmp_path / "tnl", implementation="xla", scan_layers=True)
    logits = LanguageModel(scanned.config).apply({"params": scanned.params}, tokens)
    assert relative_error(logits, got) <= 1e-5


def test_the_presets_are_the_released_configs():
    assert transnormer_config_from_reference(released_config()) == ModelConfig.from_preset(
        "transnormer_385m"
    )
    one_b = released_config(
        decoder_embed_dim=2048,
        decoder_layers=16,
        decoder_attention_heads=16,
        hidden_dim=2048,
        glu_dim=5632,
    )
    assert transnormer_config_from_reference(one_b) == ModelConfig.from_preset("transnormer_1b")


def test_mismatched_checkpoints_and_unsupported_configs_are_named(tmp_path, rng):
    values = released_config(**TINY)
    state = random_state_dict(values, rng)
    del state["model.layers.1.channel_mixer.l2.weight"]
    state["model.layers.2.token_mixer.lrpe.theta"] = np.zeros((2, 1, 8), np.float32)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    write_checkpoint(tmp_path / "bad", values, state)
    with pytest.raises(CheckpointMismatchError) as error:
        load_checkpoint(tmp_path / "bad")
    message = str(error.value)
    assert "missing: model.layers.1.channel_mixer.l2.weight" in message
    assert "unexpected: model.layers.2.token_mixer.lrpe.theta" in message
    assert "untied head" in message
    with pytest.raises(UnsupportedCheckpointError, match=r"bias=true .*norm_type='layernorm'"):
        transnormer_config_from_reference(released_config(bias=True, norm_type="layernorm"))
