"""Mamba-1's selective scan: every parallel algorithm == sequential == the float64 recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased.ops import selective_scan, selective_scan_step
from tests import reference_numpy as ref
from tests.conftest import relative_error

CHUNK = 8
BATCH, CHANNELS, STATE_DIM = 2, 6, 4


def make_inputs(rng, seq, strong=False):
    u = rng.normal(size=(BATCH, seq, CHANNELS))
    # softplus of a normal: positive step sizes around 0.1-1; strong: up to about 12.
    delta = np.log1p(np.exp(rng.normal(-1.0, 1.0, size=(BATCH, seq, CHANNELS))))
    if strong:
        delta = delta * 10.0
    # S4D-real: a[d, n] = -(n + 1).
    a = -np.tile(np.arange(1, STATE_DIM + 1, dtype=np.float64), (CHANNELS, 1))
    b = rng.normal(size=(BATCH, seq, STATE_DIM))
    c = rng.normal(size=(BATCH, seq, STATE_DIM))
    return tuple(arr.astype(np.float32) for arr in (u, delta, a, b, c))


@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("seq", [2 * CHUNK, 2 * CHUNK + 5])
@pytest.mark.parametrize("algorithm", ["chunked", "associative", "sequential"])
def test_matches_float64_recurrence(algorithm, seq, with_initial_state, rng):
    u, delta, a, b, c = make_inputs(rng, seq)
    initial = (
        rng.normal(size=(BATCH, CHANNELS, STATE_DIM)).astype(np.float32)
        if with_initial_state
        else None
    )
    want, want_state = ref.selective_scan(u, delta, a, b, c, initial)
    got, state = selective_scan(
        u,
        delta,
        a,
        b,
        c,
        algorithm=algorithm,
        chunk_size=CHUNK,
        initial_state=initial,
        return_state=True,
    )
    assert got.shape == u.shape and got.dtype == jnp.float32
    assert state.shape == (BATCH, CHANNELS, STATE_DIM) and state.dtype == jnp.float32
    assert relative_error(got, want) <= 1e-5
    assert relative_error(state, want_state) <= 1e-5


def test_strong_decays_agree(rng):
    # delta * a down to about -50 per step.
    u, delta, a, b, c = make_inputs(rng, 21, strong=True)
    want, _ = ref.selective_scan(u, delta, a, b, c)
    for algorithm in ("chunked", "associative", "sequential"):
        got = selective_scan(u, delta, a, b, c, algorithm=algorithm, chunk_size=CHUNK)
        assert np.all(np.isfinite(got))
        assert relative_error(got, want) <= 1e-5


def test_parallel_gradients_match_sequential_gradients(rng):
    u, delta, a, b, c = make_inputs(rng, 13)
    initial = rng.normal(size=(BATCH, CHANNELS, STATE_DIM)).astype(np.float32)
    cotangent = rng.normal(size=u.shape).astype(np.float32)
    state_cotangent = rng.normal(size=initial.shape).astype(np.float32)

    def grads(algorithm):
        def loss(*arguments):
            y, state = selective_scan(
                *arguments[:5],
                algorithm=algorithm,
                chunk_size=4,
                initial_state=arguments[5],
                return_state=True,
            )
            return jnp.sum(y * cotangent) + jnp.sum(state * state_cotangent)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(u, delta, a, b, c, initial)

    want = grads("sequential")
    for algorithm in ("chunked", "associative"):
        for got, expected in zip(grads(algorithm), want, strict=True):
            assert relative_error(got, expected) <= 1e-4


def test_decode_steps_continue_a_prefix(rng):
    prefix, seq = 9, 13
    u, delta, a, b, c = make_inputs(rng, seq)
    whole, whole_state = selective_scan(u, delta, a, b, c, chunk_size=CHUNK, return_state=True)
    _, state = selective_scan(
        u[:, :prefix],
        delta[:, :prefix],
        a,
        b[:, :prefix],
        c[:, :prefix],
        chunk_size=CHUNK,
        return_state=True,
    )
    outputs, step = [], jax.jit(selective_scan_step)
    for t in range(prefix, seq):
        y, state = step(u[:, t], delta[:, t], a, b[:, t], c[:, t], state)
        outputs.append(y)
    assert relative_error(jnp.stack(outputs, 1), whole[:, prefix:]) <= 1e-5
    assert relative_error(state, whole_state) <= 1e-5


def test_bfloat16_inputs_keep_a_float32_state(rng):
    u, delta, a, b, c = make_inputs(rng, 11)
    y, state = selective_scan(
        jnp.asarray(u, jnp.bfloat16), delta, a, b, c, chunk_size=CHUNK, return_state=True
    )
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    want, _ = ref.selective_scan(np.float32(jnp.asarray(u, jnp.bfloat16)), delta, a, b, c)
    assert relative_error(y, want) <= 1e-2


def test_invalid_arguments_are_named(rng):
    u, delta, a, b, c = make_inputs(rng, 4)
    with pytest.raises(ValueError, match="algorithm='fast'"):
        selective_scan(u, delta, a, b, c, algorithm="fast")
    with pytest.raises(ValueError, match="chunk_size=0"):
        selective_scan(u, delta, a, b, c, chunk_size=0)
    with pytest.raises(ValueError, match="delta must have the shape of u"):
        selective_scan(u, delta[..., :2], a, b, c)
    with pytest.raises(ValueError, match=r"a must be \[D, N\] with D = 6"):
        selective_scan(u, delta, a[:2], b, c)
    with pytest.raises(ValueError, match=r"b must be \[B, T, N\]"):
        selective_scan(u, delta, a, b[..., :2], c)
    with pytest.raises(ValueError, match=r"c must be \[B, T, N\]"):
        selective_scan(u, delta, a, b, c[:, :2])
    with pytest.raises(ValueError, match="a must be <= 0"):
        selective_scan(u, delta, -a, b, c)
    with pytest.raises(ValueError, match="delta must be >= 0"):
        selective_scan(u, -delta, a, b, c)
    with pytest.raises(ValueError, match="initial_state has shape"):
        selective_scan(u, delta, a, b, c, initial_state=np.zeros((BATCH, STATE_DIM, CHANNELS)))
    with pytest.raises(ValueError, match="state has shape"):
        selective_scan_step(u[:, 0], delta[:, 0], a, b[:, 0], c[:, 0], np.zeros((BATCH, 2, 2)))
