"""The Pallas windowed-softmax kernels against the XLA reference.

Values and gradients compiled where the kernel's accelerator is present and in interpret mode
elsewhere (``tests.conftest.kernel_interpret``), the TPU interpreter for races, ``jax.export`` for
lowering (Pallas -> Mosaic / Triton IR only; see ``test_pallas_linear_attention.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels.window_attention as pallas_window_module
from jaxbased.ops import sliding_window_attention
from pallas_kernels.window_attention import window_attention
from tests import reference_numpy as ref
from tests.conftest import kernel_interpret, relative_error

BACKENDS = ("tpu", "gpu")
PLATFORMS = {"tpu": "tpu", "gpu": "cuda"}


def qkv(rng, seq, batch=2, heads=3, head_dim=8, value_dim=None):
    shapes = [(batch, seq, heads, head_dim)] * 2 + [(batch, seq, heads, value_dim or head_dim)]
    return tuple(rng.normal(size=shape).astype(np.float32) for shape in shapes)


def kernel(backend, window, block_size, interpret=None):
    def run(q, k, v):
        return window_attention(
            q, k, v, window=window, block_size=block_size, backend=backend,
            interpret=kernel_interpret(backend) if interpret is None else interpret,
        )  # fmt: skip

    return run


def reference(window):
    def run(q, k, v):
        return sliding_window_attention(q, k, v, window=window, implementation="xla")

    return run


def gradients(attention, q, k, v, weights):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * weights)

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("seq", "window"),
    [
        (45, 5),  # T not a multiple of the block; the window reaches into the previous block
        (45, 20),  # the window spans two earlier blocks
        (37, None),  # full causal attention
    ],
)
def test_float32_forward_and_gradients_match_xla(backend, seq, window, rng):
    q, k, v = qkv(rng, seq, value_dim=6)
    attention = kernel(backend, window, block_size=16)
    got = attention(q, k, v)
    assert got.shape == v.shape and got.dtype == jnp.float32
    assert relative_error(got, reference(window)(q, k, v)) <= 1e-5
    assert relative_error(got, ref.window_attention(q, k, v, window)) <= 1e-5
    weights = rng.normal(size=v.shape).astype(np.float32)
    got_grads = gradients(attention, q, k, v, weights)
    want_grads = gradients(reference(window), q, k, v, weights)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        assert relative_error(got_grad, want_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs(backend, rng):
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv(rng, 40, head_dim=16))
    attention = kernel(backend, 9, block_size=16)
    got = attention(q, k, v)
    assert got.dtype == jnp.bfloat16
    assert relative_error(got, reference(9)(q, k, v)) <= 2e-2
    weights = rng.normal(size=v.shape).astype(np.float32)
    got_grads = gradients(attention, q, k, v, weights)
    want_grads = gradients(reference(9), q, k, v, weights)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        assert relative_error(got_grad, want_grad) <= 2e-2


def test_window_longer_than_the_sequence_and_default_blocks(rng):
    q, k, v = qkv(rng, 20, head_dim=12)
    for window in (1, 100):
        got = kernel("tpu", window, block_size=None)(q, k, v)
        assert relative_error(got, ref.window_attention(q, k, v, window)) <= 1e-5


def test_tpu_kernels_have_no_races_in_the_tpu_interpreter(rng):
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    q, k, v = qkv(rng, 24, batch=1, heads=2, head_dim=8)
    attention = kernel("tpu", 10, block_size=8, interpret=params)
    weights = jnp.asarray(rng.normal(size=v.shape).astype(np.float32))
    got, pullback = jax.vjp(attention, q, k, v)  # forward, then dq and dk/dv kernels
    got_grads = jax.block_until_ready(pullback(weights))
    assert not interpret_pallas_call.races.races_found
    assert relative_error(got, ref.window_attention(q, k, v, 10)) <= 1e-5
    _, want_pullback = jax.vjp(reference(10), q, k, v)
    for got_grad, want_grad in zip(got_grads, want_pullback(weights), strict=True):
        assert relative_error(got_grad, want_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("head_dim", "window", "dtype"),
    [(64, 129, jnp.bfloat16), (112, 129, jnp.bfloat16), (64, None, jnp.float32)],
)
def test_kernels_lower_for_the_hardware(backend, head_dim, window, dtype):
    q = jax.ShapeDtypeStruct((2, 1000, 4, head_dim), dtype)

    def forward_and_backward(q, k, v):
        def loss(q, k, v):
            out = window_attention(q, k, v, window=window, backend=backend)
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    checks = []
    if backend == "gpu":
        checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(
        jax.jit(forward_and_backward), platforms=[PLATFORMS[backend]], disabled_checks=checks
    )(q, q, q)
    marker = "tpu_custom_call" if backend == "tpu" else "__gpu$xla.gpu.triton"
    assert exported.mlir_module().count(marker) >= 3


def test_illegal_block_sizes_name_the_dimension(rng):
    q, k, v = qkv(rng, 8)
    with pytest.raises(ValueError, match="block_size=12 must be a multiple of 8"):
        window_attention(q, k, v, window=4, block_size=12, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="block_size=8 must be a power of two >= 16"):
        window_attention(q, k, v, window=4, block_size=8, backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="window=0"):
        window_attention(q, k, v, window=0, backend="tpu", interpret=True)


def test_ops_dispatch(rng, monkeypatch):
    q, k, v = qkv(rng, 19)
    forced = sliding_window_attention(q, k, v, window=4, implementation="pallas")
    assert relative_error(forced, ref.window_attention(q, k, v, 4)) <= 1e-5
    with pytest.raises(ValueError, match=r"implementation='pallas' cannot run.*block_size=3"):
        sliding_window_attention(q, k, v, window=4, block_size=3, implementation="pallas")

    def fail(*args, **kwargs):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(pallas_window_module, "window_attention", fail)
    sliding_window_attention(q, k, v, window=4, implementation="auto")


def test_key_blocks_outside_the_window_are_not_visited():
    from pallas_kernels.window_attention._blocks import make_plan

    # based-360m's window (129 keys) in 128-token blocks: the diagonal block and one before it.
    assert make_plan(16384, 128, 129).steps == 2
    assert make_plan(16384, 64, 129).steps == 3
    assert make_plan(16384, 128, 128).steps == 2 and make_plan(16384, 128, 1).steps == 1
    assert make_plan(1000, 128, None).steps == 8  # full causal: every earlier block
    assert make_plan(100, 128, 129).steps == 1  # one block holds the whole sequence
