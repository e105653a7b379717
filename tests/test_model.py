import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig, count_parameters
from tests import reference_numpy as ref
from tests.conftest import init_model, relative_error


def abstract_parameter_count(preset: str) -> int:
    model = LanguageModel(ModelConfig.from_preset(preset))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return count_parameters(shapes["params"])


@pytest.mark.parametrize(("preset", "published"), [("based_360m", 362.6e6), ("based_1b", 1.35e9)])
def test_parameter_count_of_released_models(preset, published):
    assert abs(abstract_parameter_count(preset) - published) / published <= 0.005


def test_transformer_presets_are_in_their_size_class():
    # Transformer++ of the reference: 24 x d1024 (≈360M) and 36 x d1680 (≈1.33B).
    assert abs(abstract_parameter_count("attn_360m") - 360e6) / 360e6 <= 0.01
    assert abs(abstract_parameter_count("attn_1b") - 1.33e9) / 1.33e9 <= 0.01


def test_parameter_shapes_map_onto_the_reference_tensors():
    # docs/checkpoints.md shapes of based-360m, reached from ours by transpose + reshape.
    model = LanguageModel(ModelConfig.from_preset("based_360m"))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = jax.tree.map(
        lambda box: box.value if hasattr(box, "value") else box,
        shapes["params"],
        is_leaf=lambda x: hasattr(x, "names"),
    )
    size = lambda leaf: math.prod(leaf.shape)
    assert params["embedding"].shape == (50264, 1024)
    conv, linear, window = params["layers_0"], params["layers_1"], params["layers_2"]
    assert size(conv["mixer"]["in_proj"]["kernel"]) == 4096 * 1024
    assert size(conv["mixer"]["in_proj"]["bias"]) == 4096
    assert conv["mixer"]["conv_weight"].shape == (3, 2048)
    assert conv["mixer"]["out_proj"]["kernel"].shape == (2048, 1024)
    assert linear["mixer"]["proj_q"]["kernel"].shape == (1024, 16, 16)
    assert size(linear["mixer"]["proj_v"]["kernel"]) == 1024 * 1024
    assert window["mixer"]["qkv_proj"]["kernel"].shape == (1024, 3, 16, 64)
    assert conv["mlp"]["fc1"]["kernel"].shape == (1024, 2, 2048)
    assert conv["mlp"]["fc2"]["kernel"].shape == (2048, 1024)


def test_initialisation_follows_the_spec():
    config = ModelConfig.from_preset("based_tiny", init_std=0.05)
    _, params = init_model(config)
    layer = params["layers_0"]
    assert abs(np.std(params["embedding"]) - 0.05) < 0.005
    assert abs(np.std(layer["mlp"]["fc1"]["kernel"]) - 0.05) < 0.005
    expected_output_std = 0.05 / math.sqrt(2 * config.num_layers)
    assert abs(np.std(layer["mlp"]["fc2"]["kernel"]) - expected_output_std) < 0.002
    np.testing.assert_array_equal(layer["norm1"]["weight"], 1.0)
    np.testing.assert_array_equal(layer["mixer"]["in_proj"]["bias"], 0.0)


@pytest.mark.parametrize("preset", ["based_tiny", "attn_tiny"])
def test_model_matches_float64_numpy_forward(preset, rng):
    config = ModelConfig.from_preset(preset, init_std=0.2, sliding_window={"window": 5})
    model, params = init_model(config)
    tokens = rng.integers(0, config.vocab_size, size=(2, 13))
    logits = model.apply({"params": params}, jnp.asarray(tokens))
    assert logits.shape == (2, 13, config.padded_vocab_size) and logits.dtype == jnp.float32
    assert relative_error(logits, ref.model_forward(params, tokens, config)) <= 1e-5


def test_logits_at_positions_match_the_float64_forward_there(rng):
    config = ModelConfig.from_preset("based_tiny", init_std=0.2, sliding_window={"window": 5})
    model, params = init_model(config)
    tokens = rng.integers(0, config.vocab_size, size=(2, 13))
    positions = np.array([[0, 12, 5], [7, 7, 3]])
    got = model.apply(
        {"params": params}, jnp.asarray(tokens), jnp.asarray(positions), method="logits_at"
    )
    want = ref.model_forward(params, tokens, config)[np.arange(2)[:, None], positions]
    assert got.shape == (2, 3, config.padded_vocab_size)
    assert relative_error(got, want) <= 1e-5
    with pytest.raises(ValueError, match=r"positions must be \[batch, count\] with batch 2"):
        model.apply(
            {"params": params}, jnp.asarray(tokens), jnp.zeros((3,), int), method="logits_at"
        )
    with pytest.raises(TypeError, match="positions must be integers"):
        model.apply({"params": params}, jnp.asarray(tokens), jnp.zeros((2, 1)), method="logits_at")


@pytest.mark.parametrize("pattern", [("base_conv", "based"), ("base_conv", "sliding_window")])
def test_mixer_only_layernorm_model_matches_float64_numpy_forward(pattern, rng):
    # The Zoology MQAR shape: no MLP, LayerNorm (with bias) instead of RMSNorm.
    config = ModelConfig.from_preset(
        "based_tiny",
        num_layers=2,
        layer_pattern=pattern,
        use_mlp=False,
        norm="layernorm",
        init_std=0.2,
        sliding_window={"window": 5},
    )
    model, params = init_model(config)
    params = jax.tree_util.tree_map(  # non-trivial norm weights and biases
        lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params
    )
    assert "mlp" not in params["layers_0"] and set(params["final_norm"]) == {"weight", "bias"}
    tokens = rng.integers(0, config.vocab_size, size=(2, 13))
    logits = model.apply({"params": params}, jnp.asarray(tokens))
    assert relative_error(logits, ref.model_forward(params, tokens, config)) <= 1e-5


@pytest.mark.parametrize("preset", ["based_tiny", "attn_tiny"])
def test_model_is_causal(preset, rng):
    config = ModelConfig.from_preset(preset, init_std=0.2)
    model, params = init_model(config)
    tokens = rng.integers(0, config.vocab_size, size=(1, 24))
    forward = jax.jit(lambda t: model.apply({"params": params}, t))
    base = np.asarray(forward(tokens))
    for t in (0, 7, 23):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 1) % config.vocab_size
        out = np.asarray(forward(changed))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-4


@pytest.mark.parametrize("preset", ["based_tiny", "attn_tiny"])
@pytest.mark.parametrize("prompt", [3, 11, 29])  # window of the tiny presets: 16
def test_prefill_and_decode_give_the_forward_logits(preset, prompt, rng):
    config = ModelConfig.from_preset(preset)
    model, params = init_model(config)
    total = 40
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(2, total)))
    forward = model.apply({"params": params}, tokens)
    prefill = jax.jit(
        lambda t: model.apply({"params": params}, t, total, method=LanguageModel.prefill)
    )
    decode = jax.jit(
        lambda t, c: model.apply({"params": params}, t, c, method=LanguageModel.decode_step)
    )
    logits, cache = prefill(tokens[:, :prompt])
    assert np.abs(logits - forward[:, :prompt]).max() <= 1e-4
    for t in range(prompt, total):
        logits, cache = decode(tokens[:, t], cache)
        assert np.abs(logits - forward[:, t]).max() <= 1e-4, t
    np.testing.assert_array_equal(cache.positions, [total, total])


def test_based_cache_size_does_not_depend_on_the_length():
    model = LanguageModel(ModelConfig.from_preset("based_tiny"))

    def nbytes(cache):
        return sum(leaf.nbytes for leaf in jax.tree.leaves(cache))

    assert nbytes(model.init_cache(2, 64)) == nbytes(model.init_cache(2, 65536))
    # Full attention keeps max_len keys and values: 16x the length, 16x the KV bytes (the
    # [batch] int32 positions, 8 bytes, are counted once).
    attention = LanguageModel(ModelConfig.from_preset("attn_tiny"))
    long, short = nbytes(attention.init_cache(2, 1024)), nbytes(attention.init_cache(2, 64))
    assert long - 8 == 16 * (short - 8)


def test_bfloat16_activations_stay_close_to_float32(rng):
    config = ModelConfig.from_preset("based_tiny", init_std=0.2)
    model, params = init_model(config)
    tokens = jnp.asarray(rng.integers(0, 256, size=(2, 20)))
    reference = model.apply({"params": params}, tokens)
    low = LanguageModel(config.replace(dtype="bfloat16")).apply({"params": params}, tokens)
    assert low.dtype == jnp.float32
    assert relative_error(low, reference) <= 5e-2


def test_bad_inputs_are_rejected(rng):
    config = ModelConfig.from_preset("based_tiny")
    model, params = init_model(config)
    with pytest.raises(ValueError, match="tokens must be"):
        model.apply({"params": params}, jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="tokens must be integers"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="max_len=3 is shorter than the prompt length 4"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), 3, method="prefill")
