"""The quantized Mamba (Quamba): the Hadamard fold leaves the float model unchanged, real int8
and fake-quant agree to float rounding, both agree with a float64 NumPy model of the quantized
arithmetic, calibration's scales are the observed ones, decoding continues the prefill, and a
model of another family is refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import ModelConfig
from jaxbased.generation import decode_cache_bytes, generate
from jaxbased.quantization.calibration import QuantizationSettings, calibrate, quantize_model
from jaxbased.quantization.hadamard import hadamard_matrix
from jaxbased.quantization.mamba import (
    SCHEMES,
    QuantizedLanguageModel,
    check_quantizable,
    fold_hadamard,
    parameter_bytes,
)
from tests import reference_numpy as ref
from tests.conftest import init_model, relative_error
from tests.reference_ssm_numpy import depthwise_causal_conv, model_forward, softplus

# init_std 0.1: the mixers' outputs are not negligible next to the embedding
CONFIG = ModelConfig.from_preset(
    "mamba_tiny", d_model=32, num_layers=2, layer_pattern=("mamba",) * 2, init_std=0.1
)


@pytest.fixture(scope="module")
def setup():
    model, params = init_model(CONFIG, seed=3)
    rng = np.random.default_rng(7)
    calibration = rng.integers(0, CONFIG.vocab_size, size=(4, 24))
    tokens = rng.integers(0, CONFIG.vocab_size, size=(2, 12))
    return model, params, calibration, tokens


@pytest.fixture(scope="module")
def int8_model(setup):
    _, params, calibration, _ = setup
    return quantize_model(CONFIG, params, calibration, QuantizationSettings(arithmetic="int8"))


def logits(model, params, tokens):
    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))


@pytest.mark.parametrize("hadamard", [True, False])
def test_rotation_folded_without_quantization_is_the_float_model(setup, hadamard):
    model, params, _, tokens = setup
    folded = fold_hadamard(CONFIG, params, hadamard)
    float_model = QuantizedLanguageModel(CONFIG, arithmetic="float", hadamard=hadamard)
    expected = model_forward(params, tokens, CONFIG)  # float64, no rotation
    assert relative_error(logits(float_model, folded, tokens), expected) < 1e-5
    assert relative_error(logits(model, params, tokens), expected) < 1e-5
    if hadamard:  # the weight really changed
        assert not np.allclose(
            folded["layers_0"]["mixer"]["out_proj_kernel"],
            params["layers_0"]["mixer"]["out_proj"]["kernel"],
        )


def test_int8_and_fake_quant_agree_to_float_rounding(setup, int8_model):
    _, _, _, tokens = setup
    model, params, _ = int8_model
    fake = QuantizedLanguageModel(CONFIG, arithmetic="fake", hadamard=True)
    real_logits, fake_logits = logits(model, params, tokens), logits(fake, params, tokens)
    assert relative_error(real_logits, fake_logits) < 1e-5
    real_cache = model.apply({"params": params}, jnp.asarray(tokens), 16, method="prefill")[1]
    fake_cache = fake.apply({"params": params}, jnp.asarray(tokens), 16, method="prefill")[1]
    for real_layer, fake_layer in zip(real_cache.layers, fake_cache.layers, strict=True):
        assert real_layer.conv_state.dtype == jnp.int8
        np.testing.assert_array_equal(real_layer.conv_state, fake_layer.conv_state)
        np.testing.assert_allclose(real_layer.ssm_state, fake_layer.ssm_state, rtol=1e-5, atol=1e-6)


def observed_codes(model, params, tokens):
    """``[(layer, point, int8 codes)]`` of every activation point, in the order they occur
    (caught at the quantized layers' rounding step)."""
    found = []

    def catch(next_fun, args, kwargs, context):
        result = next_fun(*args, **kwargs)
        if context.method_name == "_observe":
            found.append((context.module.path[0], args[0], np.asarray(result[0])))
        return result

    with nn.intercept_methods(catch):
        model.apply({"params": params}, jnp.asarray(tokens))
    return found


def test_int8_and_fake_round_every_activation_alike_to_one_unit(setup, int8_model):
    _, _, _, tokens = setup
    model, params, _ = int8_model
    fake = QuantizedLanguageModel(CONFIG, arithmetic="fake", hadamard=True)
    real, faked = observed_codes(model, params, tokens), observed_codes(fake, params, tokens)
    assert len(real) == CONFIG.num_layers * len(SCHEMES["mamba"].activation_points)
    differing = 0
    for (layer, point, real_codes), (fake_layer, fake_point, fake_codes) in zip(
        real, faked, strict=True
    ):
        assert (layer, point) == (fake_layer, fake_point)
        assert real_codes.dtype == fake_codes.dtype == np.int8
        steps = np.abs(real_codes.astype(np.int32) - fake_codes.astype(np.int32))
        assert steps.max() <= 1, (layer, point)  # at most one rounding unit apart
        differing += int(np.count_nonzero(steps))
    total = sum(codes.size for _, _, codes in real)
    assert differing <= 1e-3 * total  # a flip needs a value within float rounding of a half-step


def quantized_numpy_forward(params, tokens, config, hadamard=True, rounded=None):
    """Float64 NumPy logits of the quantized model (the steps of docs/quantization.md), from the
    int8 codes and scales of ``params``; only the activation points in ``rounded`` (None: all)
    are rounded."""

    def w(mixer, name):
        return np.asarray(mixer[name], np.float64) * float(mixer[f"{name}_scale"])

    embedding = np.asarray(params["embedding"], np.float64)
    x = embedding[np.asarray(tokens)]
    section, d = config.mamba, config.d_model
    inner, rank, state = section.inner_dim(d), section.time_step_rank(d), section.state_dim
    for i in range(config.num_layers):
        layer = params[f"layers_{i}"]
        m = layer["mixer"]

        def q(values, point, mixer=m):
            if rounded is not None and point not in rounded:
                return values
            scale = float(mixer[f"{point}_scale"])
            return np.clip(np.round(values / scale), -127, 127) * scale

        h = q(ref._norm(x, layer["norm1"], config), "in_proj_input")
        xz = q(h @ w(m, "in_proj_kernel").reshape(d, 2 * inner), "in_proj_output")
        conv_in, gate = xz[..., :inner], xz[..., inner:]
        u = ref.silu(
            depthwise_causal_conv(
                conv_in, w(m, "conv_weight"), np.asarray(m["conv_bias"], np.float64)
            )
        )
        u = q(u, "ssm_input")
        sel = q(u @ w(m, "x_proj_kernel"), "x_proj_output")
        dt = q(sel[..., :rank] @ w(m, "dt_proj_kernel"), "dt_proj_output")
        delta = softplus(dt + np.asarray(m["dt_bias"], np.float64))
        b, c = sel[..., rank : rank + state], sel[..., rank + state :]
        a = -np.exp(np.asarray(m["A_log"], np.float64))
        hstate = np.zeros((x.shape[0], inner, state))
        y = np.zeros((*x.shape[:2], inner))
        for t in range(x.shape[1]):
            hstate = (
                np.exp(delta[:, t, :, None] * a) * hstate
                + (delta[:, t] * u[:, t])[:, :, None] * b[:, t, None, :]
            )
            y[:, t] = np.einsum("bdn,bn->bd", hstate, c[:, t])
        y = (y + np.asarray(m["D"], np.float64) * u) * ref.silu(gate)
        if hadamard:
            y = y @ hadamard_matrix(inner).astype(np.float64) / np.sqrt(inner)
        x = x + q(y, "out_proj_input") @ w(m, "out_proj_kernel")
    return ref._norm(x, params["final_norm"], config) @ embedding.T


def test_int8_model_matches_a_float64_numpy_model_of_the_quantized_arithmetic(setup, int8_model):
    _, _, _, tokens = setup
    model, params, _ = int8_model
    expected = quantized_numpy_forward(params, tokens, CONFIG)
    # float32 vs float64 may round an activation that sits on a half-step the other way
    assert relative_error(logits(model, params, tokens), expected) < 1e-3


@pytest.mark.parametrize(
    "rounded", [(), ("in_proj_output",), ("ssm_input", "out_proj_input")], ids=str
)
def test_rounding_only_some_activation_points_matches_numpy(setup, int8_model, rounded):
    _, _, _, tokens = setup
    _, params, _ = int8_model
    model = QuantizedLanguageModel(CONFIG, arithmetic="int8", rounded_points=rounded)
    got = logits(model, params, tokens)
    expected = quantized_numpy_forward(params, tokens, CONFIG, rounded=rounded)
    assert relative_error(got, expected) < (1e-5 if not rounded else 1e-3)
    everything = quantized_numpy_forward(params, tokens, CONFIG)
    assert relative_error(got, everything) > 10 * relative_error(got, expected)


def test_rounding_every_point_is_the_default_and_decoding_follows_the_points(setup, int8_model):
    from jaxbased.quantization.mamba import ACTIVATION_POINTS

    _, _, _, tokens = setup
    default, params, _ = int8_model
    named = QuantizedLanguageModel(CONFIG, rounded_points=ACTIVATION_POINTS)
    np.testing.assert_array_equal(logits(named, params, tokens), logits(default, params, tokens))
    partial = QuantizedLanguageModel(CONFIG, rounded_points=("ssm_input",))
    variables, full = {"params": params}, logits(partial, params, tokens)
    step_logits, cache = partial.apply(variables, jnp.asarray(tokens[:, :8]), 12, method="prefill")
    empty = partial.init_cache(2, 12)
    for layer, fresh in zip(cache.layers, empty.layers, strict=True):
        assert layer.conv_state.dtype == fresh.conv_state.dtype == jnp.float32
    np.testing.assert_allclose(step_logits, full[:, :8], rtol=1e-4, atol=1e-4)
    for t in range(8, 12):
        step, cache = partial.apply(
            variables, jnp.asarray(tokens[:, t]), cache, method="decode_step"
        )
        np.testing.assert_allclose(step, full[:, t], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"rounded_points=\('ssm_bc',\).*unknown: \['ssm_bc'\]"):
        logits(QuantizedLanguageModel(CONFIG, rounded_points=("ssm_bc",)), params, tokens)
    with pytest.raises(ValueError, match="needs arithmetic 'int8' or 'fake'"):
        QuantizedLanguageModel(CONFIG, arithmetic="float", rounded_points=()).init(
            jax.random.key(0), jnp.zeros((1, 2), jnp.int32)
        )


def test_int8_model_is_close_to_float_and_stores_int8_weights(setup, int8_model):
    model_fp, params_fp, _, tokens = setup
    model, params, calibration = int8_model
    mixer = params["layers_0"]["mixer"]
    for name in (
        "in_proj_kernel",
        "conv_weight",
        "x_proj_kernel",
        "dt_proj_kernel",
        "out_proj_kernel",
    ):
        assert mixer[name].dtype == np.int8
        assert np.abs(mixer[name].astype(np.int32)).max() == 127  # the absmax maps to 127
    error = relative_error(logits(model, params, tokens), logits(model_fp, params_fp, tokens))
    assert 0 < error < 0.05
    assert parameter_bytes(params).by_dtype["int8"] > 0
    assert parameter_bytes(params).total < parameter_bytes(params_fp).total
    assert decode_cache_bytes(model, 1, 8) < decode_cache_bytes(model_fp, 1, 8)
    assert calibration.num_sequences == 4 and calibration.num_batches == 4


def test_int8_decoding_continues_the_prefill(setup, int8_model):
    _, _, _, tokens = setup
    model, params, _ = int8_model
    variables = {"params": params}
    prefill = jax.jit(lambda v, x: model.apply(v, x, 12, method="prefill"))
    decode = jax.jit(lambda v, x, c: model.apply(v, x, c, method="decode_step"))
    full = logits(model, params, tokens)
    step_logits, cache = prefill(variables, jnp.asarray(tokens[:, :8]))
    np.testing.assert_allclose(step_logits, full[:, :8], rtol=1e-4, atol=1e-4)
    for t in range(8, 12):
        step, cache = decode(variables, jnp.asarray(tokens[:, t]), cache)
        np.testing.assert_allclose(step, full[:, t], rtol=1e-4, atol=1e-4)


def test_generate_runs_the_int8_model_greedily_as_its_forward(setup, int8_model):
    _, _, _, tokens = setup
    model, params, _ = int8_model
    prompt = [int(token) for token in tokens[0, :6]]
    result = generate(model, params, [prompt], max_new_tokens=4, temperature=0.0)
    sequence = prompt + [int(token) for token in result.tokens[0]]
    assert len(sequence) == 10
    forward = logits(model, params, [sequence])[0, 5:-1, : CONFIG.vocab_size]
    np.testing.assert_array_equal(np.argmax(forward, axis=-1), sequence[6:])


def test_calibration_scales_are_the_observed_ones(setup):
    _, params, calibration, _ = setup
    folded = fold_hadamard(CONFIG, params)
    result = calibrate(CONFIG, folded, calibration, batch_size=2, percentile=0.9, momentum=0.5)
    embedded = np.asarray(params["embedding"], np.float64)[calibration]
    normed = ref._norm(embedded, params["layers_0"]["norm1"], CONFIG)
    assert result.min_max["layers_0"]["in_proj_input"] == pytest.approx(
        np.abs(normed).max() / 127, rel=1e-5
    )
    assert result.num_batches == 2
    scales = result.activation_scales("min_max")
    assert scales["layers_1"]["ssm_input"] == result.min_max["layers_1"]["ssm_input"]
    assert result.activation_scales()["layers_1"]["ssm_input"] == result.percentile["layers_1"]
    assert result.percentile["layers_1"] < result.min_max["layers_1"]["ssm_input"]


def test_other_model_families_and_widths_are_refused_with_one_clear_error():
    based = ModelConfig(vocab_size=64, d_model=32, num_layers=2, layer_pattern=("based", "mamba"))
    with pytest.raises(ValueError, match=r"quantization supports .*'mamba'.*\['based'\]"):
        check_quantizable(based)
    with pytest.raises(ValueError, match="quantization supports"):
        quantize_model(based, {}, np.zeros((1, 4), np.int32))
    odd = CONFIG.replace(d_model=36)  # inner 72 = 9 · 8
    with pytest.raises(ValueError, match=r"inner width of 2\^k.*72.*hadamard=False"):
        check_quantizable(odd)
    check_quantizable(odd, hadamard=False)
    with pytest.raises(ValueError, match="arithmetic"):
        QuantizationSettings(arithmetic="int4")
    with pytest.raises(ValueError, match="ssm_input_observer"):
        QuantizationSettings(ssm_input_observer="mse")
    with pytest.raises(ValueError, match="calibration sequences"):
        calibrate(CONFIG, {}, np.zeros((0, 4), np.int32))


# Mamba-2, in a model that mixes both kinds of layer ------------------------------------------
MIXED = ModelConfig.from_preset(
    "mamba2_tiny",
    d_model=32,
    num_layers=2,
    layer_pattern=("mamba2", "mamba"),
    init_std=0.1,
    mamba={"state_dim": 8, "chunk_size": 16},
    mamba2={"state_dim": 16, "head_dim": 16, "chunk_size": 8},
)


@pytest.fixture(scope="module")
def mixed(setup):
    model, params = init_model(MIXED, seed=5)
    _, _, calibration, tokens = setup
    quantized = quantize_model(MIXED, params, calibration, QuantizationSettings())
    return model, params, quantized, tokens


def test_mamba2_rotation_folded_without_quantization_is_the_float_model(mixed):
    _, params, _, tokens = mixed
    folded = fold_hadamard(MIXED, params)
    assert "norm_weight" in folded["layers_0"]["mixer"]
    float_model = QuantizedLanguageModel(MIXED, arithmetic="float", hadamard=True)
    expected = model_forward(params, tokens, MIXED)  # float64, mamba_ssm's Mamba2 math
    assert relative_error(logits(float_model, folded, tokens), expected) < 1e-5


def test_mamba2_int8_and_fake_agree_and_decode_continues_the_prefill(mixed):
    float_model, float_params, (model, params, calibration), tokens = mixed
    assert set(calibration.min_max["layers_0"]) == {
        "in_proj_input", "in_proj_output", "ssm_input", "ssm_bc", "out_proj_input",
    }  # fmt: skip
    assert params["layers_0"]["mixer"]["in_proj_kernel"].dtype == np.int8
    fake = QuantizedLanguageModel(MIXED, arithmetic="fake", hadamard=True)
    full = logits(model, params, tokens)
    assert relative_error(full, logits(fake, params, tokens)) < 1e-5
    assert 0 < relative_error(full, logits(float_model, float_params, tokens)) < 0.05
    variables = {"params": params}
    prefill = jax.jit(lambda v, x: model.apply(v, x, 12, method="prefill"))
    decode = jax.jit(lambda v, x, c: model.apply(v, x, c, method="decode_step"))
    step_logits, cache = prefill(variables, jnp.asarray(tokens[:, :9]))
    assert cache.layers[0].conv_state.dtype == jnp.int8
    np.testing.assert_allclose(step_logits, full[:, :9], rtol=1e-4, atol=1e-4)
    for t in range(9, 12):
        step, cache = decode(variables, jnp.asarray(tokens[:, t]), cache)
        np.testing.assert_allclose(step, full[:, t], rtol=1e-4, atol=1e-4)


def dequantized(config, params):
    """The ``float`` arithmetic's parameters holding the int8 model's weights (codes x scale)."""
    result = {}
    for key, value in params.items():
        if not key.startswith("layers_"):
            result[key] = value
            continue
        scheme = SCHEMES[config.layer_pattern[int(key.split("_")[1])]]
        mixer = {
            name: np.asarray(value["mixer"][name], np.float32)
            * np.float32(value["mixer"][f"{name}_scale"])
            if name in scheme.quantized_weights
            else value["mixer"][name]
            for name in (*scheme.quantized_weights, *scheme.float_parameters)
        }
        result[key] = {**value, "mixer": mixer}
    return result


def test_mamba2_unrounded_activations_are_the_float_model_of_the_int8_weights(mixed):
    _, _, (_, params, _), tokens = mixed
    none = QuantizedLanguageModel(MIXED, rounded_points=())
    float_model = QuantizedLanguageModel(MIXED, arithmetic="float")
    expected = logits(float_model, dequantized(MIXED, params), tokens)
    unrounded_error = relative_error(logits(none, params, tokens), expected)
    assert unrounded_error < 1e-6
    for point in ("x_proj_output", "ssm_bc"):  # a point of the Mamba-1, of the Mamba-2 layer
        one = logits(QuantizedLanguageModel(MIXED, rounded_points=(point,)), params, tokens)
        assert relative_error(one, expected) > 5 * max(unrounded_error, 1e-7)


def test_the_serving_engine_runs_the_int8_model_as_generate_does(setup, int8_model):
    from jaxbased.serving import Engine, EngineConfig, SamplingParams

    _, _, _, tokens = setup
    model, params, _ = int8_model
    prompt = [int(token) for token in tokens[1, :7]]
    engine = Engine(model, params, EngineConfig(num_slots=2, max_len=32, prefill_chunk=0))
    engine.start()
    try:
        served = engine.complete(
            prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        )
    finally:
        engine.stop(timeout=10)
    expected = generate(model, params, [prompt], max_new_tokens=4, temperature=0.0)
    assert served.token_ids[0] == list(expected.tokens[0])


def test_a_scanned_model_is_folded_into_the_unrolled_layout(setup):
    from jaxbased.layer_layout import convert_layout

    _, params, _, _ = setup
    scanned = CONFIG.replace(scan_layers=True)
    stacked = convert_layout(params, scanned)
    assert "layers_0" not in stacked  # really the stacked layout
    folded, expected = fold_hadamard(scanned, stacked), fold_hadamard(CONFIG, params)
    assert sorted(folded) == sorted(expected)
    for got, want in zip(jax.tree.leaves(folded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="unrolled"):
        QuantizedLanguageModel(scanned).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
