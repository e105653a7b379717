"""TransNormerLLM's gated linear attention against a float64 NumPy reference written from the
equations (docs/mixers/transnormer.md): the quadratic form with the decay matrix lambda^(t-s),
LRPE-d, ALiBi decays per layer; decode on ragged batches; the run-time layer index under
scanned layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig
from jaxbased.layer_layout import SCANNED_LAYERS, convert_layout, scan_plan
from jaxbased.layers.transnormer import alibi_slopes
from jaxbased.model import layer_mixer
from tests.conftest import relative_error

#: The section of the generic tests of tests/test_layers.py (one layer: the LRPE layer).
GENERIC_TEST_SECTION = dict(heads=2, chunk_size=4)


# The reference --------------------------------------------------------------------------------
def reference_slopes(num_heads: int) -> list[float]:
    """ALiBi's slopes from their definition (Press et al.), as the released code builds them."""
    if num_heads & (num_heads - 1) == 0:
        return [2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)]
    below = 1 << (num_heads.bit_length() - 1)
    return reference_slopes(below) + reference_slopes(2 * below)[0::2][: num_heads - below]


def reference_decay(num_heads: int, layer: int, num_layers: int) -> np.ndarray:
    depth = layer / (num_layers - 1) if num_layers > 1 else 0.0
    return np.exp(-np.asarray(reference_slopes(num_heads)) * (1 - depth + 1e-5))


def _silu(x):
    return x / (1 + np.exp(-x))


def numpy_mixer(params, x, config, layer_index=0, positions=None):
    """The mixer of layer ``layer_index`` in float64, attention in its quadratic form."""
    section = config.transnormer
    x = np.asarray(x, np.float64)
    batch, seq, _ = x.shape
    heads = section.heads
    kernel = np.asarray(params["qkvu_proj"]["kernel"], np.float64)  # [d, 4, H, e]
    qkvu = np.einsum("btd,dkhe->btkhe", x, kernel)
    q, k, v, u = _silu(qkvu[:, :, 0]), _silu(qkvu[:, :, 1]), qkvu[:, :, 2], qkvu[:, :, 3]
    if layer_index in section.lrpe_layers:
        theta = np.asarray(params["lrpe_theta"], np.float64)  # [H, e]
        t = np.arange(seq) if positions is None else positions
        angles = np.asarray(t, np.float64)[:, None, None] * theta  # [T, H, e]
        q = np.concatenate([q * np.cos(angles), q * np.sin(angles)], axis=-1)
        k = np.concatenate([k * np.cos(angles), k * np.sin(angles)], axis=-1)
    decay = reference_decay(heads, layer_index, config.num_layers)  # [H]
    offsets = np.arange(seq)[:, None] - np.arange(seq)[None, :]
    weights = np.where(offsets >= 0, decay[:, None, None] ** np.maximum(offsets, 0), 0.0)
    scores = np.einsum("bthe,bshe->bhts", q, k) * weights[None]
    o = np.einsum("bhts,bshe->bthe", scores, v).reshape(batch, seq, -1)
    eps = config.norm_eps
    normed = o / (np.linalg.norm(o, axis=-1, keepdims=True) / np.sqrt(o.shape[-1]) + eps)
    gated = normed.reshape(u.shape) * u
    return np.einsum("bthe,hed->btd", gated, np.asarray(params["out_proj"]["kernel"], np.float64))


def numpy_forward(params, x, config):
    """The generic tests' one-layer mixer (layer 0)."""
    return numpy_mixer(params, x, config, layer_index=0)


# Helpers ---------------------------------------------------------------------------------------
def model_config(num_layers=4, **overrides) -> ModelConfig:
    values = dict(
        vocab_size=32,
        d_model=8,
        num_layers=num_layers,
        layer_pattern=("transnormer",) * num_layers,
        use_mlp=False,
        norm="srmsnorm",
        norm_eps=1e-8,
        transnormer=dict(GENERIC_TEST_SECTION),
        init_std=0.3,
    )
    return ModelConfig(**(values | overrides))


def init_layer(config, layer_index):
    mixer = layer_mixer(config, "transnormer", layer_index, parent=None)
    x = jnp.zeros((1, 4, config.d_model), config.compute_dtype)
    return mixer, nn.meta.unbox(jax.jit(mixer.init)(jax.random.key(layer_index), x)["params"])


# Tests -----------------------------------------------------------------------------------------
def test_alibi_slopes_and_the_decays_of_each_layer():
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)], rtol=1e-12)
    six = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]  # 4 heads' slopes, then every other of 8
    np.testing.assert_allclose(alibi_slopes(6), six, rtol=1e-12)
    for heads in (1, 3, 12, 16):
        np.testing.assert_allclose(alibi_slopes(heads), reference_slopes(heads), rtol=1e-12)
    config = model_config(num_layers=4)
    bottom = layer_mixer(config, "transnormer", 0, parent=None)._log_decay(None)
    top = layer_mixer(config, "transnormer", 3, parent=None)._log_decay(None)
    np.testing.assert_allclose(np.exp(bottom), reference_decay(2, 0, 4), rtol=1e-6)
    np.testing.assert_allclose(np.exp(top), reference_decay(2, 3, 4), rtol=1e-6)
    assert np.all(np.exp(top) > 0.99999)  # the top layer barely forgets


@pytest.mark.parametrize(
    ("layer_index", "algorithm"), [(0, "chunked"), (2, "chunked"), (3, "recurrent")]
)
def test_layers_match_the_float64_reference(layer_index, algorithm, rng):
    config = model_config(transnormer=dict(GENERIC_TEST_SECTION, algorithm=algorithm))
    mixer, params = init_layer(config, layer_index)
    assert ("lrpe_theta" in params) == (layer_index == 0)
    x = rng.normal(size=(2, 11, 8)).astype(np.float32)
    want = numpy_mixer(params, x, config, layer_index)
    assert relative_error(jax.jit(mixer.apply)({"params": params}, x), want) <= 1e-5
    # The run-time index (traced, as under a scan) gives the same layer.
    traced = jax.jit(lambda p, x, i: mixer.apply(p, x, i))
    got = traced({"params": params}, x, jnp.asarray(layer_index, jnp.int32))
    assert relative_error(got, want) <= 1e-5


def test_float32_gradients_match_float64(rng):
    config = model_config()
    _, params = init_layer(config, 0)
    x = rng.normal(size=(2, 9, 8))
    weights = rng.normal(size=x.shape)

    def gradients(dtype):
        typed = config.replace(dtype=np.dtype(dtype).name)
        mixer = layer_mixer(typed, "transnormer", 0, parent=None)
        cast = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)

        def loss(params, x):
            return jnp.sum(mixer.apply({"params": params}, x) * jnp.asarray(weights, dtype))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(cast, jnp.asarray(x, dtype))

    with jax.enable_x64(True):
        want, got = gradients(jnp.float64), gradients(jnp.float32)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert relative_error(got_leaf, want_leaf) <= 1e-5


@pytest.mark.parametrize("layer_index", [0, 1])
def test_prefill_then_decode_equals_forward_on_ragged_rows(layer_index, rng):
    config = model_config()
    mixer, params = init_layer(config, layer_index)
    lengths, total = np.array([2, 6, 9]), 14
    x = rng.normal(size=(3, total, 8)).astype(np.float32)
    forward = np.asarray(mixer.apply({"params": params}, x))
    prompts = x[:, :9].copy()
    for row, length in enumerate(lengths):
        prompts[row, length:] = rng.normal(size=(9 - length, 8)) * 30  # must not leak
    prefill = jax.jit(lambda p, x, n: mixer.apply(p, x, total, n, method="prefill"))
    decode = jax.jit(lambda p, x, c, t: mixer.apply(p, x, c, t, method="decode_step"))
    y, cache = prefill({"params": params}, prompts, jnp.asarray(lengths))
    assert cache.kv_state.shape == (3, 2, 8 if layer_index == 0 else 4, 4)  # LRPE doubles it
    for row, length in enumerate(lengths):
        assert relative_error(y[row, :length], forward[row, :length]) <= 1e-5
    positions = lengths.copy()
    for _ in range(5):
        y, cache = decode({"params": params}, x[np.arange(3), positions], cache, positions)
        assert relative_error(y, forward[np.arange(3), positions]) <= 1e-5, positions
        positions += 1


def test_scanned_layers_share_one_body_with_their_own_decays():
    """The LRPE layer 0 runs unrolled before the scan; layers 1-3 are one scanned body whose
    decays come from the scanned layer index: logits and generation equal the unrolled model's."""
    config = model_config(num_layers=4)
    scanned = config.replace(scan_layers=True)
    plan = scan_plan(scanned)
    assert (plan.start, plan.unit, plan.repeats) == (1, ("transnormer",), 3)
    model = LanguageModel(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 10)), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    stacked = convert_layout(params, scanned)
    assert "lrpe_theta" in stacked["layers_0"]["mixer"]
    assert "lrpe_theta" not in stacked[SCANNED_LAYERS]["block_0"]["mixer"]
    want = jax.jit(model.apply)({"params": params}, tokens)
    got = jax.jit(LanguageModel(scanned).apply)({"params": stacked}, tokens)
    assert relative_error(got, want) <= 1e-5
    # Each layer its own decay: the same weights in every layer give different outputs.
    same = dict(params)
    for index in (2, 3):
        same[f"layers_{index}"] = params["layers_1"]
    assert relative_error(model.apply({"params": same}, tokens), want) > 1e-4

    def decode_logits(config, params):
        model = LanguageModel(config)
        prefill = jax.jit(lambda p, t: model.apply(p, t, 10, method="prefill"))
        decode = jax.jit(lambda p, t, c: model.apply(p, t, c, method="decode_step"))
        logits, cache = prefill({"params": params}, tokens[:, :6])
        out = [logits[:, -1]]
        for t in range(6, 9):
            step, cache = decode({"params": params}, tokens[:, t], cache)
            out.append(step)
        return np.stack(out)

    np.testing.assert_allclose(
        decode_logits(scanned, stacked), decode_logits(config, params), rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        decode_logits(config, params)[1:], want[:, 6:9].swapaxes(0, 1), atol=1e-5
    )


def test_state_doubles_in_the_lrpe_layer_only():
    config = model_config(d_model=16, transnormer=dict(heads=2))
    lrpe, plain = (layer_mixer(config, "transnormer", i, parent=None) for i in (0, 1))
    # kv_state [H, Dk, e] plus the (unused) k_state [H, Dk], with e = 8 and Dk = 16 or 8.
    assert lrpe.state_size(100) == 2 * 16 * 8 + 2 * 16
    assert plain.state_size(100) == 2 * 8 * 8 + 2 * 8


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"lrpe_layers": (0, 4)}, r"transnormer\.lrpe_layers=\(0, 4\) has layers \[4\] outside"),
        ({"heads": 3}, "transnormer.heads=3 must divide hidden_dim=8"),
        ({"lrpe_layers": (-1,)}, "transnormer.lrpe_layers=.* must hold integers >= 0"),
        ({"chunk_size": 0}, "transnormer.chunk_size=0 must be an integer >= 1"),
    ],
)
def test_bad_sections_name_the_field(section, message):
    with pytest.raises(ValueError, match=message):
        model_config(transnormer=section)


# Presets ----------------------------------------------------------------------------------------
def released_parameter_count(
    vocab_size, decoder_embed_dim, decoder_layers, decoder_attention_heads, hidden_dim, glu_dim
):
    """Parameters of the released ``TransnormerForCausalLM`` from its config.json's shapes:
    ``embed_tokens [V, d]``; per layer ``qkvu_proj [4n, d]``, ``out_proj [d, n]``,
    ``channel_mixer.l1, l2 [glu, d]``, ``l3 [d, glu]`` (weightless norms); ``lrpe.theta
    [H, 1, d / H]`` in layer 0; ``lm_head`` tied."""
    d, n = decoder_embed_dim, hidden_dim
    per_layer = 4 * n * d + d * n + 3 * glu_dim * d
    head_dim = d // decoder_attention_heads
    return vocab_size * d + decoder_layers * per_layer + decoder_attention_heads * head_dim


@pytest.mark.parametrize(
    ("preset", "released"),
    [
        (
            "transnormer_385m",
            dict(
                vocab_size=64000,
                decoder_embed_dim=1024,
                decoder_layers=24,
                decoder_attention_heads=8,
                hidden_dim=1024,
                glu_dim=2816,
            ),
        ),
        (
            "transnormer_1b",
            dict(
                vocab_size=64000,
                decoder_embed_dim=2048,
                decoder_layers=16,
                decoder_attention_heads=16,
                hidden_dim=2048,
                glu_dim=5632,
            ),
        ),
    ],
)
def test_presets_have_the_released_parameter_counts(preset, released):
    from jaxbased import count_parameters

    config = ModelConfig.from_preset(preset)
    shapes = jax.eval_shape(
        lambda: LanguageModel(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    )
    assert count_parameters(shapes["params"]) == released_parameter_count(**released)
    assert config.padded_vocab_size == released["vocab_size"]
