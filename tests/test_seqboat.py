"""SeqBoat against a float64 NumPy reference written from the equations
(docs/mixers/seqboat.md): EMA recurrence, router, attention over the last ``window`` active
tokens at full length (no packing), scatter and gate; the packed path against the masked one;
dropped tokens; decode on ragged batches; the reported activation rate."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbased import LanguageModel, ModelConfig
from jaxbased.layers.mixer import METRICS_COLLECTION
from jaxbased.layers.seqboat import SeqBoatCache
from jaxbased.model import layer_mixer
from tests import reference_numpy as ref
from tests.conftest import relative_error

#: The section of the generic tests of tests/test_layers.py (d_model 8, up to 12 tokens).
GENERIC_TEST_SECTION = dict(
    ema_dim=4, attention_dim=4, value_dim=8, window=3, capacity_bucket=4, ema_chunk_size=4
)


# The reference --------------------------------------------------------------------------------
def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _silu(x):
    return x * _sigmoid(x)


def _linear(x, params):
    return x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)


def reference_parts(params, x, section):
    """``mx``, ``hx``, ``active`` and the gate of every token (float64, token by token)."""
    get = {key: np.asarray(value, np.float64) for key, value in params.items() if "ema" in key}
    p = _sigmoid(get["ema_delta"])
    decay, input_scale = 1 - p * _sigmoid(get["ema_alpha"]), p * get["ema_beta"]
    output_scale = get["ema_gamma"] / np.sqrt(section.ema_dim)
    x = np.asarray(x, np.float64)
    state = np.zeros((x.shape[0], *decay.shape))
    ema = []
    for t in range(x.shape[1]):
        state = decay * state + input_scale * x[:, t, :, None]
        ema.append(np.einsum("dn,bdn->bd", output_scale, state))
    mx = _silu(np.stack(ema, 1) + get["ema_omega"] * x)
    base = _linear(mx, params["hx_proj"])
    logits, hx = base[..., :2] / np.exp(float(params["log_temperature"])), base[..., 2:]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    active = probs[..., 1] > probs[..., 0]
    return mx, hx, active, np.where(active, probs.max(-1), 0.0)


def numpy_forward(params, x, config, capacity=None):
    """SeqBoat's layer in float64 at full length: active query ``t`` attends the active keys
    ``s <= t`` among the last ``window`` active tokens; with ``capacity``, only the first
    ``capacity`` active tokens of a row attend (the rest are dropped: ``h = 0``)."""
    section, d = config.seqboat, config.d_model
    z, values = section.attention_dim, section.values(d)
    mx, hx, active, gate = reference_parts(params, x, section)
    zrv = _silu(_linear(mx, params["mx_proj"]))
    base, r, v = zrv[..., :z], zrv[..., z : z + values], zrv[..., z + values :]
    scale, offset = (np.asarray(params[name], np.float64) for name in ("qk_scale", "qk_offset"))
    seq = x.shape[1]
    q = ref.rotary((base * scale[0] + offset[0])[:, :, None], range(seq), z, section.rotary_base)
    k = ref.rotary((base * scale[1] + offset[1])[:, :, None], range(seq), z, section.rotary_base)
    q, k = q[:, :, 0], k[:, :, 0]
    h = np.zeros_like(hx)
    for b in range(x.shape[0]):
        order = np.flatnonzero(active[b])
        attending = order if capacity is None else order[:capacity]
        for rank, t in enumerate(attending):
            keys = order[max(0, rank - section.window + 1) : rank + 1]
            scores = k[b, keys] @ q[b, t] / np.sqrt(z)
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            attended = weights @ v[b, keys]
            h[b, t] = _linear(attended * r[b, t], params["h_proj"])
    return hx + h * gate[..., None]


# Helpers ---------------------------------------------------------------------------------------
def seqboat_config(**section) -> ModelConfig:
    return ModelConfig(
        vocab_size=32,
        d_model=8,
        num_layers=1,
        layer_pattern=("seqboat",),
        use_mlp=False,
        seqboat=dict(GENERIC_TEST_SECTION) | section,
        init_std=0.3,
    )


def init_seqboat(config, seed=0):
    mixer = layer_mixer(config, "seqboat", parent=None)
    x = jnp.zeros((1, 4, config.d_model), config.compute_dtype)
    return mixer, nn.meta.unbox(jax.jit(mixer.init)(jax.random.key(seed), x)["params"])


# Tests -----------------------------------------------------------------------------------------
def test_packed_and_masked_match_the_float64_reference_and_each_other(rng):
    """With a capacity that holds every active token the packed path is the masked full-length
    one: the same numbers, summed in another order."""
    config = seqboat_config(capacity_fraction=1.0, capacity_bucket=1)
    packed, params = init_seqboat(config)
    masked = layer_mixer(config.replace(seqboat={"algorithm": "masked"}), "seqboat", parent=None)
    x = rng.normal(size=(2, 13, 8)).astype(np.float32)
    _, _, active, _ = reference_parts(params, x, config.seqboat)
    assert 0.05 < active.mean() < 0.95  # the router sends some tokens, not all
    want = numpy_forward(params, x, config)
    got_packed = jax.jit(packed.apply)({"params": params}, x)
    got_masked = jax.jit(masked.apply)({"params": params}, x)
    assert relative_error(got_packed, want) <= 1e-5
    assert relative_error(got_masked, want) <= 1e-5
    assert relative_error(got_packed, got_masked) <= 1e-6


def test_tokens_beyond_the_capacity_are_dropped_and_counted(rng):
    config = seqboat_config(capacity_fraction=0.25, capacity_bucket=2)
    assert config.seqboat.packed_capacity(16) == 4
    mixer, params = init_seqboat(config, seed=2)
    x = rng.normal(size=(2, 16, 8)).astype(np.float32)
    _, _, active, _ = reference_parts(params, x, config.seqboat)
    got, variables = jax.jit(lambda p, x: mixer.apply(p, x, mutable=[METRICS_COLLECTION]))(
        {"params": params}, x
    )
    assert relative_error(got, numpy_forward(params, x, config, capacity=4)) <= 1e-5
    metrics = variables[METRICS_COLLECTION]
    dropped = np.maximum(active.sum(-1) - 4, 0).sum() / active.size
    assert dropped > 0
    np.testing.assert_allclose(metrics["dropped_tokens"], dropped, rtol=1e-6)
    np.testing.assert_allclose(metrics["activation_rate"], active.mean(), rtol=1e-6)


def test_float32_gradients_match_float64(rng):
    config = seqboat_config()
    _, params = init_seqboat(config, seed=3)
    x = rng.normal(size=(2, 9, 8))
    weights = rng.normal(size=x.shape)

    def gradients(dtype):
        mixer = layer_mixer(config.replace(dtype=np.dtype(dtype).name), "seqboat", parent=None)
        cast = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)

        def loss(params, x):
            return jnp.sum(mixer.apply({"params": params}, x) * jnp.asarray(weights, dtype))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(cast, jnp.asarray(x, dtype))

    with jax.enable_x64(True):
        want, got = gradients(jnp.float64), gradients(jnp.float32)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert relative_error(got_leaf, want_leaf) <= 1e-5


def test_prefill_then_decode_equals_forward_on_ragged_rows(rng):
    config = seqboat_config()
    mixer, params = init_seqboat(config, seed=4)
    lengths, total = np.array([1, 5, 10]), 16
    x = rng.normal(size=(3, total, 8)).astype(np.float32)
    forward = np.asarray(mixer.apply({"params": params}, x))
    prompts = x[:, :10].copy()
    for row, length in enumerate(lengths):
        prompts[row, length:] = rng.normal(size=(10 - length, 8)) * 30  # must not leak
    prefill = jax.jit(lambda p, x, n: mixer.apply(p, x, total, n, method="prefill"))
    decode = jax.jit(lambda p, x, c, t: mixer.apply(p, x, c, t, method="decode_step"))
    y, cache = prefill({"params": params}, prompts, jnp.asarray(lengths))
    assert isinstance(cache, SeqBoatCache) and cache.keys.shape == (3, 3, 4)
    for row, length in enumerate(lengths):
        assert relative_error(y[row, :length], forward[row, :length]) <= 1e-5
    positions = lengths.copy()
    for _ in range(6):
        y, cache = decode({"params": params}, x[np.arange(3), positions], cache, positions)
        assert relative_error(y, forward[np.arange(3), positions]) <= 1e-5, positions
        positions += 1


def test_training_reports_the_activation_rate_of_every_layer():
    from jaxbased.training.optimizer import make_optimizer
    from jaxbased.training.state import TrainState
    from jaxbased.training.steps import make_train_step

    config = ModelConfig.from_preset(
        "seqboat_tiny",
        d_model=16,
        num_layers=2,
        layer_pattern=("seqboat",) * 2,
        seqboat=dict(attention_dim=8, value_dim=32, window=8),
    )
    model = LanguageModel(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 17)), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])["params"])
    schedule = optax.constant_schedule(1e-3)
    state = TrainState.create(params, make_optimizer(schedule))
    step = make_train_step(model, make_optimizer(schedule), schedule)
    _, metrics = step(state, tokens)
    rates = {key: float(value) for key, value in metrics.items() if "activation_rate" in key}
    assert sorted(rates) == [f"mixer/layer{i}/activation_rate" for i in range(2)]
    assert all(0.0 <= rate <= 1.0 for rate in rates.values())


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"capacity_fraction": 0.0}, r"seqboat\.capacity_fraction=0\.0 must be in \(0, 1\]"),
        ({"window": 0}, "seqboat.window=0 must be an integer >= 1"),
        ({"attention_dim": 5}, "seqboat.attention_dim=5 must be even"),
        ({"capacity_bucket": 0}, "seqboat.capacity_bucket=0 must be an integer >= 1"),
    ],
)
def test_bad_sections_name_the_field(section, message):
    with pytest.raises(ValueError, match=message):
        seqboat_config(**section)


def test_a_ring_shorter_than_the_window_is_refused():
    mixer = layer_mixer(seqboat_config(window=4), "seqboat", parent=None)
    small = layer_mixer(seqboat_config(window=2), "seqboat", parent=None).init_cache(1, 8)
    with pytest.raises(ValueError, match="window=4 is longer than the cache's ring of 2"):
        mixer.decode_step(jnp.zeros((1, 8)), small, jnp.zeros((1,), jnp.int32))
