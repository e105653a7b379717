"""SSD (Mamba-2's scan): chunked == recurrent == the float64 recurrence of tests/reference_numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased.ops import ssd, ssd_step
from tests import reference_numpy as ref
from tests.conftest import relative_error

CHUNK = 8
BATCH, HEADS, HEAD_DIM, STATE_DIM = 2, 4, 3, 5


def make_inputs(rng, seq, groups, log_decay_range=(-3.0, -0.01)):
    """x, dt, a, b, c with dt * a spread over ``log_decay_range`` (a in [-4, -0.5])."""
    x = rng.normal(size=(BATCH, seq, HEADS, HEAD_DIM))
    a = -rng.uniform(0.5, 4.0, size=HEADS)
    log_decay = rng.uniform(*log_decay_range, size=(BATCH, seq, HEADS))
    dt = log_decay / a
    b = rng.normal(size=(BATCH, seq, groups, STATE_DIM))
    c = rng.normal(size=(BATCH, seq, groups, STATE_DIM))
    return tuple(arr.astype(np.float32) for arr in (x, dt, a, b, c))


def make_state(rng):
    return rng.normal(size=(BATCH, HEADS, HEAD_DIM, STATE_DIM)).astype(np.float32)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("seq", [2 * CHUNK, 2 * CHUNK + 5])
@pytest.mark.parametrize("algorithm", ["chunked", "recurrent"])
def test_matches_float64_recurrence(algorithm, seq, with_initial_state, groups, rng):
    x, dt, a, b, c = make_inputs(rng, seq, groups)
    initial = make_state(rng) if with_initial_state else None
    want, want_state = ref.ssd(x, dt, a, b, c, initial)
    got, state = ssd(
        x,
        dt,
        a,
        b,
        c,
        chunk_size=CHUNK,
        algorithm=algorithm,
        initial_state=initial,
        return_state=True,
    )
    assert got.shape == x.shape and got.dtype == jnp.float32
    assert state.shape == (BATCH, HEADS, HEAD_DIM, STATE_DIM) and state.dtype == jnp.float32
    assert relative_error(got, want) <= 1e-5
    assert relative_error(state, want_state) <= 1e-5


def test_chunked_gradients_match_recurrent_gradients(rng):
    x, dt, a, b, c = make_inputs(rng, 13, groups=2)
    initial = make_state(rng)
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    state_cotangent = rng.normal(size=initial.shape).astype(np.float32)

    def loss(algorithm):
        def function(*arguments):
            y, state = ssd(
                *arguments[:5],
                chunk_size=4,
                algorithm=algorithm,
                initial_state=arguments[5],
                return_state=True,
            )
            return jnp.sum(y * cotangent) + jnp.sum(state * state_cotangent)

        return jax.jit(jax.grad(function, argnums=tuple(range(6))))

    arguments = (x, dt, a, b, c, initial)
    for got, want in zip(loss("chunked")(*arguments), loss("recurrent")(*arguments), strict=True):
        assert np.all(np.isfinite(got))
        assert relative_error(got, want) <= 1e-4


def test_strong_decays_are_stable(rng):
    # dt * a down to -50 per step: one chunk's cumulative log decay reaches about -1000.
    x, dt, a, b, c = make_inputs(rng, 37, groups=1, log_decay_range=(-50.0, -0.001))
    initial = make_state(rng)
    want, want_state = ref.ssd(x, dt, a, b, c, initial)

    @jax.jit
    def forward_and_gradients(*arguments):
        def forward(*arguments):
            return ssd(*arguments[:5], chunk_size=32, initial_state=arguments[5], return_state=True)

        outputs, pullback = jax.vjp(forward, *arguments)
        return outputs, pullback((jnp.ones_like(outputs[0]), jnp.ones_like(outputs[1])))

    (got, state), grads = forward_and_gradients(x, dt, a, b, c, initial)
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(state))
    assert relative_error(got, want) <= 1e-5
    assert relative_error(state, want_state) <= 1e-5
    assert all(np.all(np.isfinite(grad)) for grad in grads)


def test_decode_steps_continue_a_prefix(rng):
    prefix, seq = 9, 13
    x, dt, a, b, c = make_inputs(rng, seq, groups=2)
    whole, whole_state = ssd(x, dt, a, b, c, chunk_size=CHUNK, return_state=True)
    _, state = ssd(
        x[:, :prefix],
        dt[:, :prefix],
        a,
        b[:, :prefix],
        c[:, :prefix],
        chunk_size=CHUNK,
        return_state=True,
    )
    outputs, step = [], jax.jit(ssd_step)
    for t in range(prefix, seq):
        y, state = step(x[:, t], dt[:, t], a, b[:, t], c[:, t], state)
        outputs.append(y)
    assert relative_error(jnp.stack(outputs, 1), whole[:, prefix:]) <= 1e-5
    assert relative_error(state, whole_state) <= 1e-5


def test_bfloat16_inputs_keep_a_float32_state(rng):
    x, dt, a, b, c = make_inputs(rng, 11, groups=1)
    y, state = ssd(jnp.asarray(x, jnp.bfloat16), dt, a, b, c, chunk_size=CHUNK, return_state=True)
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    want, _ = ref.ssd(np.float32(jnp.asarray(x, jnp.bfloat16)), dt, a, b, c)
    assert relative_error(y, want) <= 1e-2


def test_invalid_arguments_are_named(rng):
    x, dt, a, b, c = make_inputs(rng, 4, groups=1)
    with pytest.raises(ValueError, match="algorithm='fast'"):
        ssd(x, dt, a, b, c, algorithm="fast")
    with pytest.raises(ValueError, match="chunk_size=0"):
        ssd(x, dt, a, b, c, chunk_size=0)
    with pytest.raises(ValueError, match=r"dt must be \[B, T, H\]"):
        ssd(x, dt[:, :, :2], a, b, c)
    with pytest.raises(ValueError, match=r"a must be \[H\]"):
        ssd(x, dt, a[:2], b, c)
    with pytest.raises(ValueError, match="3 groups, which must divide the 4 heads"):
        ssd(x, dt, a, np.repeat(b, 3, axis=2), np.repeat(c, 3, axis=2))
    with pytest.raises(ValueError, match="c must have the shape of b"):
        ssd(x, dt, a, b, c[..., :2])
    with pytest.raises(ValueError, match="a must be <= 0"):
        ssd(x, dt, -a, b, c)
    with pytest.raises(ValueError, match="dt must be >= 0"):
        ssd(x, -dt, a, b, c)
    with pytest.raises(ValueError, match="initial_state has shape"):
        ssd(x, dt, a, b, c, initial_state=np.zeros((BATCH, HEADS, STATE_DIM, HEAD_DIM)))
    with pytest.raises(ValueError, match="state has shape"):
        ssd_step(x[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], np.zeros((BATCH, HEADS, 2, 2)))


def test_the_kernel_reads_b_and_c_by_group_and_matches_xla(rng):
    # implementation="pallas": the linear-attention kernel (identity map, decay, no
    # normalizer) interpreted on CPU, 2 groups of 2 heads; outputs, final state and gradients
    # of every input against the XLA path.
    x, dt, a, b, c = make_inputs(rng, 2 * CHUNK + 3, groups=2)
    initial = make_state(rng)
    weights = rng.normal(size=x.shape).astype(np.float32)

    def run(implementation):
        def forward(x, dt, a, b, c, initial):
            return ssd(
                x, dt, a, b, c, chunk_size=CHUNK, initial_state=initial, return_state=True,
                implementation=implementation,
            )  # fmt: skip

        def loss(*args):
            y, state = forward(*args)
            return jnp.sum(y * weights) + jnp.sum(state**2)

        grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))
        return jax.jit(lambda *args: (forward(*args), grads(*args)))(x, dt, a, b, c, initial)

    got, want = jax.tree.leaves(run("pallas")), jax.tree.leaves(run("xla"))
    assert len(got) == len(want) == 8
    for got_leaf, want_leaf in zip(got, want, strict=True):
        assert got_leaf.shape == want_leaf.shape
        assert relative_error(got_leaf, want_leaf) <= 1e-5
