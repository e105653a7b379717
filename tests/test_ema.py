"""MEGA's multi-dimensional damped EMA (jaxbased.ops.ema) against a float64 NumPy recurrence:
the chunked forward, any token's state from the chunk states, and the one-token step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased.ops.ema import ema_state_at, ema_step, multi_head_ema
from tests.conftest import relative_error


def reference_ema(x, decay, input_scale, output_scale):
    """``h_t = a h_{t-1} + b x_t``, ``y_t = sum_n w h_t``, token by token in float64; also every
    state ``[B, T, D, N]``."""
    x = np.asarray(x, np.float64)
    state = np.zeros(x.shape[:1] + decay.shape)
    ys, states = [], []
    for t in range(x.shape[1]):
        state = decay * state + input_scale * x[:, t, :, None]
        ys.append(np.einsum("dn,bdn->bd", output_scale, state))
        states.append(state)
    return np.stack(ys, 1), np.stack(states, 1)


def parameters(rng, channels=5, ema_dim=3):
    decay = rng.uniform(0.3, 0.99, (channels, ema_dim))
    return decay, rng.normal(size=(channels, ema_dim)), rng.normal(size=(channels, ema_dim))


@pytest.mark.parametrize(("seq", "chunk_size"), [(13, 4), (8, 8), (5, 16)])
def test_chunked_ema_and_states_match_the_recurrence(seq, chunk_size, rng):
    decay, input_scale, output_scale = parameters(rng)
    x = rng.normal(size=(2, seq, 5))
    want, states = reference_ema(x, decay, input_scale, output_scale)
    cast = [jnp.asarray(a, jnp.float32) for a in (x, decay, input_scale, output_scale)]
    y, chunk_states = jax.jit(
        lambda *a: multi_head_ema(*a, chunk_size=chunk_size, return_chunk_states=True)
    )(*cast)
    assert relative_error(y, want) <= 1e-5
    positions = np.array([seq - 1, seq // 2])
    got = ema_state_at(cast[0], chunk_states, cast[1], cast[2], positions, chunk_size=chunk_size)
    assert relative_error(got, states[np.arange(2), positions]) <= 1e-5


def test_steps_continue_the_chunked_ema(rng):
    decay, input_scale, output_scale = parameters(rng)
    x = rng.normal(size=(2, 10, 5))
    want, _ = reference_ema(x, decay, input_scale, output_scale)
    cast = [jnp.asarray(a, jnp.float32) for a in (decay, input_scale, output_scale)]
    xs = jnp.asarray(x, jnp.float32)
    _, starts = multi_head_ema(xs[:, :6], *cast, chunk_size=4, return_chunk_states=True)
    state = ema_state_at(xs[:, :6], starts, cast[0], cast[1], np.array([5, 5]), chunk_size=4)
    step = jax.jit(ema_step)
    for t in range(6, 10):
        y, state = step(xs[:, t], state, *cast)
        assert relative_error(y, want[:, t]) <= 1e-5
    y = multi_head_ema(xs[:, 6:], *cast, chunk_size=3, initial_state=state)
    assert y.shape == (2, 4, 5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"decay must be \[channels, ema_dim\]"):
        multi_head_ema(
            jnp.zeros((1, 3, 4)), jnp.zeros((3, 2)), jnp.zeros((4, 2)), jnp.zeros((4, 2))
        )
    with pytest.raises(ValueError, match="chunk_size=0"):
        multi_head_ema(jnp.zeros((1, 3, 4)), *(jnp.ones((4, 2)) * 0.5,) * 3, chunk_size=0)
