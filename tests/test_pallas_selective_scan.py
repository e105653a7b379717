"""The selective-scan kernels (Mamba-1) against the XLA scan of ``jaxbased.ops.selective_scan``.

Each kernel (TPU and GPU; interpreted on CPU, compiled where that accelerator is present)
computes the output, the final state and the gradients of every input (``u``, ``delta``,
``a``, ``b``, ``c``, the initial state); they are compared with the XLA chunked scan and the
outputs with the float64 token loop of ``tests/reference_numpy.py``. Tolerances: float32 1e-5
relative, bfloat16 2e-2. Shapes are tiny (each chunk is unrolled, which the interpreter pays
for): ``T = 20`` is two chunks of 8 and a tail; ``D = 6`` and ``N = 5`` pad both the channel
lanes and the state rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxbased.ops import selective_scan
from pallas_kernels.selective_scan import selective_scan as pallas_selective_scan
from tests import reference_numpy as ref
from tests.conftest import kernel_interpret, relative_error

CHUNK = 8


def make_inputs(rng, *, batch=2, seq=20, channels=6, state_dim=5):
    u = rng.normal(size=(batch, seq, channels)).astype(np.float32)
    delta = rng.uniform(0.01, 0.8, size=(batch, seq, channels)).astype(np.float32)
    a = -rng.uniform(0.5, 3.0, size=(channels, state_dim)).astype(np.float32)
    b, c = (rng.normal(size=(batch, seq, state_dim)).astype(np.float32) for _ in range(2))
    state = rng.normal(size=(batch, channels, state_dim)).astype(np.float32)
    return u, delta, a, b, c, state


def results(scan, inputs, weights):
    def loss(*args):
        y, final = scan(*args)
        return jnp.sum(y.astype(jnp.float32) * weights[0]) + jnp.sum(final * weights[1])

    argnums = tuple(range(len(inputs)))
    return jax.jit(lambda *args: (scan(*args), jax.grad(loss, argnums=argnums)(*args)))(*inputs)


def compare(backend, inputs, rng, tolerance, interpret=None):
    def kernel(u, delta, a, b, c, *state):
        return pallas_selective_scan(
            u, delta, a, b, c, state[0] if state else None, chunk_size=CHUNK, backend=backend,
            interpret=kernel_interpret(backend) if interpret is None else interpret,
        )  # fmt: skip

    def reference(u, delta, a, b, c, *state):
        return selective_scan(
            u, delta, a, b, c, initial_state=state[0] if state else None, return_state=True,
            implementation="xla",
        )  # fmt: skip

    u, _, a = inputs[:3]
    weights = (
        rng.normal(size=u.shape).astype(np.float32),
        rng.normal(size=(u.shape[0], *a.shape)).astype(np.float32),
    )
    got, want = results(kernel, inputs, weights), results(reference, inputs, weights)
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves) == 2 + len(inputs)  # y, state; the gradients
    assert got_leaves[0].dtype == u.dtype and got_leaves[1].dtype == jnp.float32
    for index, (got_leaf, want_leaf) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        assert got_leaf.shape == want_leaf.shape, index
        assert relative_error(got_leaf, want_leaf) <= tolerance, index
    numpy_y, numpy_state = ref.selective_scan(*inputs)
    assert relative_error(got_leaves[0], numpy_y) <= max(tolerance, 1e-5)
    assert relative_error(got_leaves[1], numpy_state) <= max(tolerance, 1e-5)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_float32_outputs_state_and_gradients_match_xla(backend, rng):
    u, delta, a, b, c, state = make_inputs(rng)
    compare(backend, (u, delta, a, b, c, state), rng, 1e-5)  # with an initial state


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bfloat16_inputs_without_a_state(backend, rng):
    u, delta, a, b, c, _ = make_inputs(rng, batch=1, seq=16)  # whole chunks, no state
    u, b, c = (jnp.asarray(x, jnp.bfloat16) for x in (u, b, c))
    # delta stays float32, as the Mamba layer computes it; the references see the rounded inputs
    compare(backend, (u, delta, a, b, c), rng, 2e-2)


def test_tpu_kernels_have_no_races_in_the_tpu_interpreter(rng):
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    inputs = make_inputs(rng, seq=12, channels=4, state_dim=3)
    compare("tpu", inputs, rng, 1e-5, interpret=params)
    assert not interpret_pallas_call.races.races_found


def test_arguments_are_checked(rng):
    u, delta, a, b, c, state = make_inputs(rng, seq=8)
    with pytest.raises(ValueError, match="chunk_size=12 must be a multiple of 8"):
        pallas_selective_scan(u, delta, a, b, c, chunk_size=12, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match=r"a must be \[D, N\] with D = 6"):
        pallas_selective_scan(u, delta, a.T, b, c, interpret=True)
    with pytest.raises(ValueError, match=r"initial_state has shape \(2, 5, 6\)"):
        pallas_selective_scan(u, delta, a, b, c, state.swapaxes(1, 2), interpret=True)
    with pytest.raises(ValueError, match="float64 inputs"):
        pallas_selective_scan(u.astype(np.float64), delta, a, b, c, interpret=True)
    with pytest.raises(ValueError, match="channel_block_size=64 must be a multiple of 128"):
        pallas_selective_scan(u, delta, a, b, c, channel_block_size=64, interpret=True)


def test_ops_dispatch_runs_the_kernel(rng):
    # selective_scan(implementation="pallas") runs the kernel (interpreted on CPU) for the
    # chunked algorithm; the other algorithms cannot.
    u, delta, a, b, c, state = make_inputs(rng, batch=1)
    got, got_state = selective_scan(
        u, delta, a, b, c, initial_state=state, return_state=True, implementation="pallas"
    )
    want, want_state = ref.selective_scan(u, delta, a, b, c, state)
    assert relative_error(got, want) <= 1e-5 and relative_error(got_state, want_state) <= 1e-5
    with pytest.raises(ValueError, match="algorithm='chunked', not 'sequential'"):
        selective_scan(u, delta, a, b, c, algorithm="sequential", implementation="pallas")
