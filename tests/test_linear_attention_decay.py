"""Linear attention with a decay (fixed per head or per step and head) and without the
normalizer, against the float64 recurrence S_t = a_t S_{t-1} + phi(k_t) v_t^T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased.ops import (
    LinearAttentionState,
    expanded_dim,
    init_linear_attention_state,
    linear_attention,
    linear_attention_step,
)
from tests import reference_numpy as ref
from tests.conftest import relative_error

ALGORITHMS = ("quadratic", "chunked", "recurrent")
CHUNK = 8
BATCH, HEADS = 2, 3


def make_inputs(rng, feature_map, seq, feature_dim=4, value_dim=5):
    q = rng.normal(size=(BATCH, seq, HEADS, feature_dim))
    k = rng.normal(size=(BATCH, seq, HEADS, feature_dim))
    v = rng.normal(size=(BATCH, seq, HEADS, value_dim))
    if feature_map == "identity":
        # Keep the kernel positive so that the normalizer is well conditioned.
        q, k = np.abs(q) + 0.1, np.abs(k) + 0.1
    return tuple(a.astype(np.float32) for a in (q, k, v))


def make_log_decay(rng, kind, seq):
    if kind == "per_head":
        return np.log(np.array([0.5, 0.9, 0.99], np.float32))
    # Per step and head: mostly mild, some strong (down to -12), some exactly 0 (no decay).
    log_decay = -rng.exponential(0.3, size=(BATCH, seq, HEADS))
    log_decay[:, ::7, 0] = -12.0
    log_decay[:, 3::5, 1] = 0.0
    return log_decay.astype(np.float32)


def as_state(state) -> LinearAttentionState:
    kv, z = state
    return LinearAttentionState(jnp.asarray(kv, jnp.float32), jnp.asarray(z, jnp.float32))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("decay_kind", ["per_head", "per_step"])
@pytest.mark.parametrize("feature_map", ["taylor", "identity"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matches_float64_recurrence(algorithm, feature_map, decay_kind, normalize, rng):
    # 5 tokens of prefix (the initial state), then 19 tokens: not a multiple of the chunk.
    prefix, seq = 5, 24
    q, k, v = make_inputs(rng, feature_map, seq)
    log_decay = make_log_decay(rng, decay_kind, seq)
    prefix_decay = log_decay if decay_kind == "per_head" else log_decay[:, :prefix]
    suffix_decay = log_decay if decay_kind == "per_head" else log_decay[:, prefix:]
    want, want_state = ref.decayed_linear_attention(
        q, k, v, log_decay, feature_map, normalize=normalize
    )
    _, prefix_state = ref.decayed_linear_attention(
        q[:, :prefix], k[:, :prefix], v[:, :prefix], prefix_decay, feature_map, normalize=normalize
    )
    got, state = linear_attention(
        q[:, prefix:],
        k[:, prefix:],
        v[:, prefix:],
        feature_map=feature_map,
        algorithm=algorithm,
        chunk_size=CHUNK,
        initial_state=as_state(prefix_state),
        return_state=True,
        log_decay=suffix_decay,
        normalize=normalize,
    )
    assert got.shape == v[:, prefix:].shape and got.dtype == jnp.float32
    assert relative_error(got, want[:, prefix:]) <= 2e-5
    assert relative_error(state.kv_state, want_state[0]) <= 2e-5
    assert relative_error(state.k_state, want_state[1]) <= 2e-5


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_without_initial_state_and_without_normalizer(algorithm, rng):
    # No decay and no normalizer: plain causal sums of K_ij v_j, from the start.
    q, k, v = make_inputs(rng, "taylor", 13)
    want, (want_kv, _) = ref.decayed_linear_attention(q, k, v, None, "taylor", normalize=False)
    got, state = linear_attention(
        q, k, v, algorithm=algorithm, chunk_size=CHUNK, return_state=True, normalize=False
    )
    assert relative_error(got, want) <= 2e-5
    assert relative_error(state.kv_state, want_kv) <= 2e-5


def test_zero_log_decay_is_no_decay(rng):
    q, k, v = make_inputs(rng, "taylor", 19)
    plain = linear_attention(q, k, v, chunk_size=CHUNK)
    zero = jnp.zeros((BATCH, 19, HEADS), jnp.float32)
    assert (
        relative_error(linear_attention(q, k, v, chunk_size=CHUNK, log_decay=zero), plain) <= 1e-6
    )


def test_strong_decays_stay_finite(rng):
    # Every step forgets almost everything (down to exp(-60)); the chunk's cumulative log
    # decay reaches about -1000, and no exp ever sees a large positive number.
    seq = 37
    q, k, v = make_inputs(rng, "identity", seq)
    log_decay = -rng.uniform(0.0, 60.0, size=(BATCH, seq, HEADS)).astype(np.float32)
    want, _ = ref.decayed_linear_attention(q, k, v, log_decay, "identity", normalize=False)
    got = linear_attention(
        q, k, v, feature_map="identity", chunk_size=32, log_decay=log_decay, normalize=False
    )
    assert np.all(np.isfinite(got))
    assert relative_error(got, want) <= 2e-5
    grads = jax.jit(
        jax.grad(
            lambda log_decay: jnp.sum(
                linear_attention(
                    q,
                    k,
                    v,
                    feature_map="identity",
                    chunk_size=32,
                    log_decay=log_decay,
                    normalize=False,
                )
            )
        )
    )(jnp.asarray(log_decay))
    assert np.all(np.isfinite(grads))


@pytest.mark.parametrize("decay_kind", ["per_head", "per_step"])
def test_decode_steps_continue_a_prefix(decay_kind, rng):
    prefix, seq = 11, 16
    q, k, v = make_inputs(rng, "taylor", seq)
    log_decay = make_log_decay(rng, decay_kind, seq)
    whole = linear_attention(q, k, v, chunk_size=CHUNK, log_decay=log_decay)
    _, state = linear_attention(
        q[:, :prefix],
        k[:, :prefix],
        v[:, :prefix],
        chunk_size=CHUNK,
        return_state=True,
        log_decay=log_decay if decay_kind == "per_head" else log_decay[:, :prefix],
    )
    outputs, step = [], jax.jit(linear_attention_step)
    for t in range(prefix, seq):
        step_decay = log_decay if decay_kind == "per_head" else log_decay[:, t]
        y, state = step(q[:, t], k[:, t], v[:, t], state, log_decay=step_decay)
        outputs.append(y)
    assert relative_error(jnp.stack(outputs, 1), whole[:, prefix:]) <= 1e-5


def test_decode_steps_without_normalizer(rng):
    q, k, v = make_inputs(rng, "identity", 6)
    log_decay = make_log_decay(rng, "per_step", 6)
    want, _ = ref.decayed_linear_attention(q, k, v, log_decay, "identity", normalize=False)
    state = init_linear_attention_state(BATCH, HEADS, expanded_dim("identity", 4), 5)
    outputs = []
    for t in range(6):
        y, state = linear_attention_step(
            q[:, t],
            k[:, t],
            v[:, t],
            state,
            feature_map="identity",
            log_decay=log_decay[:, t],
            normalize=False,
        )
        outputs.append(y)
    assert relative_error(jnp.stack(outputs, 1), want) <= 1e-5


def test_chunked_gradients_match_quadratic_gradients(rng):
    seq = 19
    q, k, v = make_inputs(rng, "taylor", seq)
    log_decay = make_log_decay(rng, "per_step", seq)
    weights = rng.normal(size=v.shape).astype(np.float32)

    def loss(algorithm):
        return lambda q, k, v, log_decay: jnp.sum(
            linear_attention(q, k, v, algorithm=algorithm, chunk_size=CHUNK, log_decay=log_decay)
            * weights
        )

    arguments = (q, k, v, jnp.asarray(log_decay))
    grads_chunked = jax.jit(jax.grad(loss("chunked"), argnums=(0, 1, 2, 3)))(*arguments)
    grads_quadratic = jax.jit(jax.grad(loss("quadratic"), argnums=(0, 1, 2, 3)))(*arguments)
    for got, want in zip(grads_chunked, grads_quadratic, strict=True):
        assert relative_error(got, want) <= 1e-4


def test_invalid_log_decay_is_named(rng):
    q, k, v = make_inputs(rng, "taylor", 4)
    with pytest.raises(ValueError, match=r"log_decay has shape \(4,\).*\[H\]=\(3,\)"):
        linear_attention(q, k, v, log_decay=jnp.zeros((4,)))
    with pytest.raises(ValueError, match=r"log_decay has shape \(2, 3\).*\[B, T, H\]"):
        linear_attention(q, k, v, log_decay=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"log_decay must be <= 0.*0\.5"):
        linear_attention(q, k, v, log_decay=jnp.array([0.0, -1.0, 0.5]))
    state = init_linear_attention_state(BATCH, HEADS, expanded_dim("taylor", 4), 5)
    with pytest.raises(ValueError, match=r"log_decay has shape \(2, 4, 3\).*\[B, H\]=\(2, 3\)"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, log_decay=jnp.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, log_decay=jnp.ones((3,)))


def test_groups_of_heads_share_queries_and_keys(rng):
    # One query/key group read by all 3 heads (SSD's b and c with G = 1): every algorithm's
    # outputs and final state against the float64 recurrence on keys repeated per head; the
    # chunked gradients against the op on repeated keys (whose dq, dk summed over the heads
    # are the group's).
    seq = 19
    q, k, v = make_inputs(rng, "identity", seq)
    q, k = q[:, :, :1], k[:, :, :1]
    log_decay = make_log_decay(rng, "per_step", seq)
    initial = (
        rng.normal(size=(BATCH, HEADS, 4, 5)).astype(np.float32),
        rng.normal(size=(BATCH, HEADS, 4)).astype(np.float32),
    )

    def repeat(x):
        return jnp.repeat(x, HEADS, axis=2)

    want, (want_kv, want_z) = ref.decayed_linear_attention(
        repeat(q), repeat(k), v, log_decay, "identity", False, kv_state=initial[0],
        k_state=initial[1],
    )  # fmt: skip

    def attention(q, k, v, log_decay, initial, algorithm="chunked"):
        return linear_attention(
            q, k, v, feature_map="identity", algorithm=algorithm, chunk_size=CHUNK,
            log_decay=log_decay, normalize=False, initial_state=LinearAttentionState(*initial),
            return_state=True, implementation="xla",
        )  # fmt: skip

    every_algorithm = jax.jit(
        lambda *args: [attention(*args, algorithm=algorithm) for algorithm in ALGORITHMS]
    )
    for algorithm, (got, state) in zip(
        ALGORITHMS, every_algorithm(q, k, v, log_decay, initial), strict=True
    ):
        assert got.shape == v.shape and state.kv_state.shape == want_kv.shape
        assert relative_error(got, want) <= 1e-5, algorithm
        assert relative_error(state.kv_state, want_kv) <= 1e-5, algorithm
        assert relative_error(state.k_state, want_z) <= 1e-5, algorithm

    weights = rng.normal(size=v.shape).astype(np.float32)

    def loss(q, k, v, log_decay, initial):
        y, state = attention(q, k, v, log_decay, initial)
        return jnp.sum(y * weights) + jnp.sum(state.kv_state) + jnp.sum(state.k_state**2)

    argnums = (0, 1, 2, 3, 4)
    got_grads = jax.jit(jax.grad(loss, argnums=argnums))(q, k, v, log_decay, initial)
    want_grads = jax.jit(
        jax.grad(lambda q, k, *rest: loss(repeat(q), repeat(k), *rest), argnums=argnums)
    )(q, k, v, log_decay, initial)
    for got_grad, want_grad in zip(
        jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True
    ):
        assert got_grad.shape == want_grad.shape
        assert relative_error(got_grad, want_grad) <= 1e-5
    with pytest.raises(ValueError, match="2 groups, which must divide the 3 heads"):
        linear_attention(q.repeat(2, axis=2), k.repeat(2, axis=2), v)
