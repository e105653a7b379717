"""mamba_ssm checkpoints (the reference's mamba-360m layout, state-spaces' mamba2): config.json
and state dict import/export, checked against a NumPy forward on the PyTorch-layout tensors."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig
from jaxbased.interop import CheckpointMismatchError, UnsupportedCheckpointError
from jaxbased.interop.mamba_checkpoint import (
    export_mamba_state_dict,
    import_mamba_state_dict,
    mamba_config_from_reference,
)
from tests.conftest import relative_error

# The reference's mamba-360m: MambaConfig defaults plus train/configs/experiment/reference/
# mamba-360m.yaml (n_layer 46, rms_norm, pad_vocab_size_multiple 16).
MAMBA_360M_JSON = {
    "d_model": 1024,
    "n_layer": 46,
    "vocab_size": 50277,
    "ssm_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 16,
}
# state-spaces/mamba2-370m's config.json.
MAMBA2_370M_JSON = {
    "d_model": 1024,
    "d_intermediate": 0,
    "n_layer": 48,
    "vocab_size": 50277,
    "ssm_cfg": {"layer": "Mamba2"},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 16,
    "tie_embeddings": True,
}
TINY_JSON = {"d_model": 16, "n_layer": 2, "vocab_size": 37, "ssm_cfg": {"d_state": 4}}


def test_reference_configs_give_the_presets():
    assert mamba_config_from_reference(MAMBA_360M_JSON) == ModelConfig.from_preset("mamba_360m")
    assert mamba_config_from_reference(MAMBA2_370M_JSON) == ModelConfig.from_preset("mamba2_360m")
    with pytest.raises(UnsupportedCheckpointError, match="attn_layer_idx"):
        mamba_config_from_reference({**MAMBA2_370M_JSON, "attn_layer_idx": [3]})
    with pytest.raises(UnsupportedCheckpointError, match="d_intermediate"):
        mamba_config_from_reference({**MAMBA2_370M_JSON, "d_intermediate": 4096})


def synthetic_mamba_state_dict(config: ModelConfig, rng) -> dict[str, np.ndarray]:
    """Random tensors in mamba_ssm's layout and shapes (PyTorch [out, in])."""
    d, inner, rank, state = 16, 32, 1, 4
    assert (config.d_model, config.ssm_inner_dim, config.mamba_time_step_rank) == (d, inner, rank)

    def normal(*shape, scale=0.3):
        return (scale * rng.normal(size=shape)).astype(np.float32)

    embedding = normal(40, d)  # 37 padded to a multiple of 8
    sd = {"backbone.embedding.weight": embedding}
    for i in range(2):
        prefix = f"backbone.layers.{i}"
        sd[f"{prefix}.norm.weight"] = 1 + normal(d)
        sd[f"{prefix}.mixer.in_proj.weight"] = normal(2 * inner, d)
        sd[f"{prefix}.mixer.conv1d.weight"] = normal(inner, 1, 4)
        sd[f"{prefix}.mixer.conv1d.bias"] = normal(inner)
        sd[f"{prefix}.mixer.x_proj.weight"] = normal(rank + 2 * state, inner)
        sd[f"{prefix}.mixer.dt_proj.weight"] = normal(inner, rank)
        sd[f"{prefix}.mixer.dt_proj.bias"] = normal(inner) - 3
        a = np.arange(1, state + 1) + normal(inner, state) ** 2
        sd[f"{prefix}.mixer.A_log"] = np.log(a).astype(np.float32)
        sd[f"{prefix}.mixer.D"] = 1 + normal(inner)
        sd[f"{prefix}.mixer.out_proj.weight"] = normal(d, inner)
    sd["backbone.norm_f.weight"] = 1 + normal(d)
    sd["lm_head.weight"] = embedding.copy()
    return sd


def torch_layout_forward(sd, tokens, eps=1e-5):
    """float64 logits of mamba_ssm's MambaLMHeadModel read straight from the state dict."""

    def w(key):
        return np.asarray(sd[key], np.float64)

    def rms(x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    def silu(x):
        return x / (1 + np.exp(-x))

    hidden = w("backbone.embedding.weight")[tokens]
    seq = tokens.shape[1]
    for i in range(2):
        p = f"backbone.layers.{i}.mixer"
        xz = rms(hidden, w(f"backbone.layers.{i}.norm.weight")) @ w(f"{p}.in_proj.weight").T
        inner = xz.shape[-1] // 2
        x, z = xz[..., :inner], xz[..., inner:]
        conv = w(f"{p}.conv1d.weight")[:, 0, :]  # [C, K], PyTorch cross-correlation, pad K-1
        padded = np.concatenate([np.zeros_like(x[:, :3]), x], axis=1)
        x = silu(sum(conv[:, k] * padded[:, k : k + seq] for k in range(4)) + w(f"{p}.conv1d.bias"))
        x_dbl = x @ w(f"{p}.x_proj.weight").T
        dt, b, c = x_dbl[..., :1], x_dbl[..., 1:5], x_dbl[..., 5:]
        delta = np.logaddexp(0, dt @ w(f"{p}.dt_proj.weight").T + w(f"{p}.dt_proj.bias"))
        a = -np.exp(w(f"{p}.A_log"))
        h = np.zeros((tokens.shape[0], inner, 4))
        y = np.zeros_like(x)
        for t in range(seq):
            h = (
                np.exp(delta[:, t, :, None] * a) * h
                + (delta[:, t] * x[:, t])[..., None] * b[:, t, None]
            )
            y[:, t] = (h * c[:, t, None]).sum(-1)
        y = (y + w(f"{p}.D") * x) * silu(z)
        hidden = hidden + y @ w(f"{p}.out_proj.weight").T
    return rms(hidden, w("backbone.norm_f.weight")) @ w("lm_head.weight").T


def test_imported_mamba_gives_the_reference_forward_and_exports_back_exactly(rng):
    config = mamba_config_from_reference(TINY_JSON, mamba_chunk_size=4)
    sd = synthetic_mamba_state_dict(config, rng)
    params, ignored = import_mamba_state_dict(sd, config)
    assert ignored == ["lm_head.weight"]
    tokens = rng.integers(0, 37, size=(2, 9))
    got = jax.jit(LanguageModel(config).apply)({"params": params}, tokens)
    assert relative_error(got, torch_layout_forward(sd, tokens)) <= 1e-5
    exported = export_mamba_state_dict(params, config)
    assert exported.keys() == sd.keys()
    for key, value in sd.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_mismatched_state_dicts_name_every_problem(rng):
    config = mamba_config_from_reference(TINY_JSON)
    sd = synthetic_mamba_state_dict(config, rng)
    del sd["backbone.layers.1.mixer.D"]
    sd["backbone.layers.0.mixer.A_log"] = sd["backbone.layers.0.mixer.A_log"][:, :3]
    sd["backbone.layers.0.mixer.rotary.inv_freq"] = np.zeros(4, np.float32)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(CheckpointMismatchError) as error:
        import_mamba_state_dict(sd, config)
    message = str(error.value)
    assert "missing: backbone.layers.1.mixer.D (expected shape [32])" in message
    assert "backbone.layers.0.mixer.A_log: checkpoint [32, 3], expected [32, 4]" in message
    assert "unexpected: backbone.layers.0.mixer.rotary.inv_freq" in message
    assert "untied head" in message


def test_mamba2_state_dict_round_trip_keeps_the_reference_column_order(rng):
    config = mamba_config_from_reference(
        {**MAMBA2_370M_JSON, "d_model": 16, "n_layer": 1, "vocab_size": 40},
        mamba2_state_dim=4,
        mamba2_head_dim=8,
    )
    model = LanguageModel(config)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 3), np.int32))["params"]
    params = jax.tree.map(
        lambda p: (np.asarray(p) + rng.normal(size=p.shape)).astype(np.float32),
        nn.meta.unbox(params),
    )
    sd = export_mamba_state_dict(params, config)
    in_proj = sd["backbone.layers.0.mixer.in_proj.weight"]  # rows z | x | B | C | dt
    assert in_proj.shape == (32 + 32 + 2 * 4 + 4, 16)
    np.testing.assert_array_equal(
        in_proj[-4:], params["layers_0"]["mixer"]["in_proj"]["kernel"][:, -4:].T
    )
    assert sd["backbone.layers.0.mixer.conv1d.weight"].shape == (40, 1, 4)
    assert sd["backbone.layers.0.mixer.norm.weight"].shape == (32,)
    back, _ = import_mamba_state_dict(sd, config)
    jax.tree.map(np.testing.assert_array_equal, back, params)
