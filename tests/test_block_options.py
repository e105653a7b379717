"""Model-level options of TransNormerLLM's blocks against NumPy: the weightless simple RMSNorm,
the gated MLP without activation and the sqrt(d) embedding scale (docs/model.md#blocks)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig
from jaxbased.layers.common import SimpleRMSNorm, make_norm
from jaxbased.layers.mlp import GatedMLP
from tests.conftest import init_model, relative_error


def simple_rms_norm(x, eps):
    x = np.asarray(x, np.float64)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) / np.sqrt(x.shape[-1]) + eps)


def test_simple_rms_norm_has_no_parameters_and_matches_numpy(rng):
    x = rng.normal(size=(2, 3, 8)).astype(np.float32) * 3
    norm = make_norm("srmsnorm", 8, 1e-8, jnp.float32)
    assert isinstance(norm, SimpleRMSNorm)
    assert norm.init(jax.random.key(0), x) == {}
    assert relative_error(norm.apply({}, x), simple_rms_norm(x, 1e-8)) <= 1e-6
    tiny = np.full((1, 8), 1e-9, np.float32)  # eps outside the root: far below it, x / eps
    np.testing.assert_allclose(norm.apply({}, tiny), tiny / (1e-9 + 1e-8), rtol=1e-5)


def test_gated_mlp_without_activation_is_bilinear(rng):
    config = ModelConfig(
        vocab_size=16,
        d_model=8,
        num_layers=1,
        layer_pattern=("mlp",),
        use_mlp=False,
        mlp={"inner_dim": 16, "multiple_of": 8, "activation": "none"},
    )
    mlp = GatedMLP(config.mlp, config.mixer_context)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    params = nn.meta.unbox(mlp.init(jax.random.key(1), x)["params"])
    fc1 = np.asarray(params["fc1"]["kernel"], np.float64)  # [d, 2, n]
    value, gate = x @ fc1[:, 0], x @ fc1[:, 1]
    want = (value * gate) @ np.asarray(params["fc2"]["kernel"], np.float64)
    assert relative_error(mlp.apply({"params": params}, x), want) <= 1e-5
    with pytest.raises(ValueError, match=r"mlp\.activation='relu' is not known"):
        config.replace(mlp={"activation": "relu"})


def test_embedding_scale_multiplies_the_input_not_the_head():
    base = ModelConfig(
        vocab_size=16,
        d_model=16,
        num_layers=1,
        layer_pattern=("mlp",),
        use_mlp=False,
        norm="srmsnorm",
        norm_eps=1e-8,
        mlp={"inner_dim": 16, "multiple_of": 8},
    )
    scaled = base.replace(scale_embedding=True)
    _, params = init_model(scaled, seed=3)
    tokens = jnp.asarray([[1, 5, 7, 2]], jnp.int32)
    got = LanguageModel(scaled).apply({"params": params}, tokens)
    embedding = np.asarray(params["embedding"], np.float64)
    x = embedding[np.asarray(tokens)] * 4.0  # sqrt(16)
    fc1 = np.asarray(params["layers_0"]["mixer"]["fc1"]["kernel"], np.float64)
    h = simple_rms_norm(x, 1e-8)
    value, gate = h @ fc1[:, 0], h @ fc1[:, 1]
    x = x + (value * gate / (1 + np.exp(-gate))) @ np.asarray(
        params["layers_0"]["mixer"]["fc2"]["kernel"], np.float64
    )
    want = simple_rms_norm(x, 1e-8) @ embedding.T
    assert relative_error(got, want) <= 1e-5
    unscaled = LanguageModel(base).apply({"params": params}, tokens)
    assert relative_error(unscaled, want) > 1e-3
    with pytest.raises(ValueError, match="scale_embedding=1 must be True or False"):
        base.replace(scale_embedding=1)


def test_silu_on_the_residual_stream_after_the_mixer():
    config = ModelConfig(
        vocab_size=16,
        d_model=8,
        num_layers=1,
        layer_pattern=("mlp",),
        use_mlp=False,
        norm="srmsnorm",
        norm_eps=1e-8,
        mlp={"inner_dim": 8, "multiple_of": 8, "activation": "none"},
        residual_activation="silu",
    )
    _, params = init_model(config, seed=4)
    tokens = jnp.asarray([[3, 1, 4, 1, 5]], jnp.int32)
    embedding = np.asarray(params["embedding"], np.float64)
    x = embedding[np.asarray(tokens)]
    fc1 = np.asarray(params["layers_0"]["mixer"]["fc1"]["kernel"], np.float64)
    h = simple_rms_norm(x, 1e-8)
    x = x + (h @ fc1[:, 0]) * (h @ fc1[:, 1]) @ np.asarray(
        params["layers_0"]["mixer"]["fc2"]["kernel"], np.float64
    )
    x = x / (1 + np.exp(-x))  # silu(x + mixer(norm(x)))
    want = simple_rms_norm(x, 1e-8) @ embedding.T
    got = LanguageModel(config).apply({"params": params}, tokens)
    assert relative_error(got, want) <= 1e-5
    with pytest.raises(ValueError, match="residual_activation='gelu' is not known"):
        config.replace(residual_activation="gelu")


def test_mixer_metrics_are_named_by_layer_in_both_layouts():
    from jaxbased.model import mixer_metrics

    config = ModelConfig(
        vocab_size=16,
        d_model=8,
        num_layers=5,
        layer_pattern=("attention",) + ("mlp", "attention") * 2,
        attention={"heads": 2},
        mlp={"inner_dim": 8, "multiple_of": 8},
    )
    unrolled = {"layers_2": {"mixer": {"rate": 0.5}}, "layers_4": {"mixer": {"rate": 0.25}}}
    assert mixer_metrics(config, unrolled) == {
        "mixer/layer2/rate": 0.5,
        "mixer/layer4/rate": 0.25,
    }
    scanned = config.replace(scan_layers=True)  # ("attention", "mlp") x 2, then "attention"
    stacked = {
        "scanned_layers": {"block_1": {"mixer": {"rate": np.array([0.5, 0.25])}}},
        "layers_4": {"mixer": {"rate": 0.125}},
    }
    assert mixer_metrics(scanned, stacked) == {
        "mixer/layer1/rate": 0.5,
        "mixer/layer3/rate": 0.25,
        "mixer/layer4/rate": 0.125,
    }
