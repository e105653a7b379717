"""Decay in the Pallas linear-attention kernels, against float64 recurrences, on CPU.

    S_t = a_t S_{t-1} + phi(k_t) v_t^T,   z_t = a_t z_{t-1} + phi(k_t),   a_t = exp(log_decay_t)
    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)      (normalize=False: y_t = phi(q_t)^T S_t)

The forward is checked against a float64 NumPy loop over tokens written from that recurrence,
the gradients (q, k, v, log_decay, initial state) against ``jax.grad`` of the same token loop
in float64 (``jax.enable_x64``): a different algorithm from the kernels' chunked one. Kernels run
in Pallas' interpreter, jitted (interpreting eagerly is several times slower), or compiled where
their accelerator is present (``tests.conftest.kernel_interpret``).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxbased.ops import expanded_dim
from pallas_kernels.linear_attention import linear_attention as pallas_linear_attention
from tests import reference_numpy as ref
from tests.conftest import kernel_interpret, relative_error

BACKENDS = ("tpu", "gpu")
CHUNK = 16
#: A near-reset (a = e^-100) at the last token of the first chunk: inside that chunk
#: ``g_i - g_15 = +100`` for i < 15, whose exp overflows float32 unless masked before the exp.
RESET_POSITION, RESET_LOG_DECAY = 15, -100.0


def make_inputs(
    rng, *, batch=2, seq=40, heads=2, feature_dim=8, value_dim=16, feature_map="taylor"
):
    q = rng.normal(size=(batch, seq, heads, feature_dim)).astype(np.float32)
    k = rng.normal(size=(batch, seq, heads, feature_dim)).astype(np.float32)
    v = rng.normal(size=(batch, seq, heads, value_dim)).astype(np.float32)
    log_decay = np.log(rng.uniform(0.6, 1.0, size=(batch, seq, heads))).astype(np.float32)
    if seq > RESET_POSITION:
        log_decay[:, RESET_POSITION, 0] = RESET_LOG_DECAY
    expanded = expanded_dim(feature_map, feature_dim)
    kv_state = (0.1 * rng.normal(size=(batch, heads, expanded, value_dim))).astype(np.float32)
    k_state = np.abs(rng.normal(size=(batch, heads, expanded))).astype(np.float32)
    return q, k, v, log_decay, (kv_state, k_state)


def numpy_recurrence(q, k, v, log_decay, feature_map, state=None, normalize=True, eps=1e-12):
    """The recurrence token by token in float64: ``y [B, T, H, Dv]``, final ``(S, z)``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    phi_q, phi_k = ref.phi(q, feature_map), ref.phi(k, feature_map)
    decay = np.exp(np.asarray(log_decay, np.float64))
    batch, seq, heads, _ = q.shape
    expanded, value_dim = phi_q.shape[-1], v.shape[-1]
    if state is None:
        kv, z = np.zeros((batch, heads, expanded, value_dim)), np.zeros((batch, heads, expanded))
    else:
        kv, z = (np.array(x, np.float64) for x in state)
    y = np.zeros((batch, seq, heads, value_dim))
    for t in range(seq):
        kv = decay[:, t, :, None, None] * kv + phi_k[:, t, :, :, None] * v[:, t, :, None, :]
        z = decay[:, t, :, None] * z + phi_k[:, t]
        numerator = np.einsum("bhf,bhfd->bhd", phi_q[:, t], kv)
        denominator = np.einsum("bhf,bhf->bh", phi_q[:, t], z)
        y[:, t] = numerator / (denominator + eps)[..., None] if normalize else numerator
    return y, (kv, z)


def taylor_features(x, feature_map):
    """``phi(x)`` in jnp, the layout of ``ref.phi`` (1, x / F**0.25, scaled products)."""
    feature_dim = x.shape[-1]
    products = x[..., :, None] * x[..., None, :]
    if feature_map == "taylor":
        second = products.reshape(*x.shape[:-1], feature_dim**2) / math.sqrt(2 * feature_dim)
    else:
        rows, cols = np.triu_indices(feature_dim)
        scale = np.where(rows == cols, 1 / math.sqrt(2 * feature_dim), 1 / math.sqrt(feature_dim))
        second = products[..., rows, cols] * scale
    ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
    return jnp.concatenate([ones, x / feature_dim**0.25, second], axis=-1)


def jax_recurrence(q, k, v, initial_state, log_decay, feature_map, normalize, eps=1e-12):
    """The same recurrence with ``lax.scan`` over tokens (differentiable, any float dtype)."""
    phi_q, phi_k = taylor_features(q, feature_map), taylor_features(k, feature_map)
    batch, _, heads, _ = q.shape
    if initial_state is None:
        shape = (batch, heads, phi_q.shape[-1])
        initial_state = (jnp.zeros((*shape, v.shape[-1]), q.dtype), jnp.zeros(shape, q.dtype))

    def step(state, token):
        kv, z = state
        phi_q_t, phi_k_t, v_t, log_decay_t = token
        decay = jnp.exp(log_decay_t)
        kv = decay[..., None, None] * kv + phi_k_t[..., :, None] * v_t[..., None, :]
        z = decay[..., None] * z + phi_k_t
        numerator = jnp.einsum("bhf,bhfd->bhd", phi_q_t, kv)
        if not normalize:
            return (kv, z), numerator
        return (kv, z), numerator / (jnp.einsum("bhf,bhf->bh", phi_q_t, z) + eps)[..., None]

    tokens = tuple(jnp.moveaxis(x, 1, 0) for x in (phi_q, phi_k, v, log_decay))
    final, y = jax.lax.scan(step, initial_state, tokens)
    return jnp.moveaxis(y, 0, 1), final


def random_weights(rng, v, feature_map, feature_dim):
    batch, _, heads, value_dim = v.shape
    expanded = expanded_dim(feature_map, feature_dim)
    return (
        rng.normal(size=v.shape).astype(np.float32),
        rng.normal(size=(batch, heads, expanded, value_dim)).astype(np.float32),
        rng.normal(size=(batch, heads, expanded)).astype(np.float32),
    )


def weighted_loss(attention, weights):
    # Reads the outputs and the final state, so that every cotangent is non-zero.
    out_weights, kv_weights, k_weights = weights

    def loss(q, k, v, log_decay, initial_state):
        y, (kv_state, k_state) = attention(q, k, v, log_decay, initial_state)
        return (
            jnp.sum(y.astype(kv_state.dtype) * out_weights)
            + 0.01 * jnp.sum(kv_state * kv_weights)
            + 0.01 * jnp.sum(k_state * k_weights)
        )

    return loss


def kernel_results(backend, feature_map, normalize, weights, inputs, **options):
    """Jitted kernel forward (y, final state) and gradients w.r.t. every input."""

    def attention(q, k, v, log_decay, initial_state):
        return pallas_linear_attention(
            q,
            k,
            v,
            initial_state,
            log_decay=log_decay,
            normalize=normalize,
            feature_map=feature_map,
            chunk_size=options.get("chunk_size", CHUNK),
            backend=backend,
            interpret=options.get("interpret", kernel_interpret(backend)),
            value_block_size=options.get("value_block_size"),
        )

    loss = weighted_loss(attention, weights)
    argnums = (0, 1, 2, 3) if inputs[4] is None else (0, 1, 2, 3, 4)

    @jax.jit
    def run(*inputs):
        return attention(*inputs), jax.grad(loss, argnums=argnums)(*inputs)

    return run(*inputs)


def reference_gradients(feature_map, normalize, weights, inputs):
    """``jax.grad`` of the token recurrence in float64 (inputs converted exactly)."""
    with jax.enable_x64(True):
        as64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), inputs)
        weights64 = tuple(jnp.asarray(w, jnp.float64) for w in weights)

        def attention(q, k, v, log_decay, initial_state):
            return jax_recurrence(q, k, v, initial_state, log_decay, feature_map, normalize)

        argnums = (0, 1, 2, 3) if inputs[4] is None else (0, 1, 2, 3, 4)
        gradients = jax.grad(weighted_loss(attention, weights64), argnums=argnums)(*as64)
        return jax.tree.map(np.asarray, gradients)


def assert_matches(backend, feature_map, normalize, inputs, rng, tolerance, **options):
    q, k, v, log_decay, state = inputs
    weights = random_weights(rng, v, feature_map, q.shape[-1])
    (got, (got_kv, got_k)), got_grads = kernel_results(
        backend, feature_map, normalize, weights, inputs, **options
    )
    want, (want_kv, want_k) = numpy_recurrence(
        q, k, v, log_decay, feature_map, state, normalize=normalize
    )
    assert got.shape == v.shape and got.dtype == v.dtype
    assert got_kv.dtype == jnp.float32 and got_k.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    assert relative_error(got, want) <= tolerance
    assert relative_error(got_kv, want_kv) <= tolerance
    assert relative_error(got_k, want_k) <= tolerance
    want_grads = reference_gradients(feature_map, normalize, weights, inputs)
    names = ["q", "k", "v", "log_decay", "kv_state", "k_state"]
    got_leaves, want_leaves = jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)
    assert len(got_leaves) == len(want_leaves) == (6 if state is not None else 4)
    for name, got_grad, want_grad in zip(names, got_leaves, want_leaves, strict=False):
        assert got_grad.shape == want_grad.shape, name
        assert relative_error(got_grad, want_grad) <= tolerance, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("feature_map", "value_dim", "with_state", "normalize"),
    [("taylor", 16, True, True), ("taylor_symmetric", 32, False, False)],
)
def test_float32_decay_forward_state_and_gradients(
    backend, feature_map, value_dim, with_state, normalize, rng
):
    # T = 40: two full chunks of 16 and a tail of 8. On GPU, Dv = 32 runs two value blocks of
    # 16 (partial sums of dq, dk and the decay's key term).
    q, k, v, log_decay, state = make_inputs(rng, value_dim=value_dim, feature_map=feature_map)
    inputs = (q, k, v, log_decay, state if with_state else None)
    value_block_size = 16 if backend == "gpu" else None
    assert_matches(
        backend, feature_map, normalize, inputs, rng, 1e-5, value_block_size=value_block_size
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs_with_decay(backend, rng):
    q, k, v, log_decay, state = make_inputs(rng, seq=37)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    # The references see the same (rounded) inputs, in float64.
    assert_matches(backend, "taylor", True, (q, k, v, log_decay, state), rng, 2e-2)


def test_decay_tpu_kernels_have_no_races_in_the_tpu_interpreter(rng):
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    q, k, v, log_decay, state = make_inputs(rng, seq=12, heads=1, value_dim=8)
    # Every kernel (forward, dq, dk/dv with the decay's key term) runs in the TPU interpreter.
    inputs = (q, k, v, log_decay, state)
    assert_matches("tpu", "taylor", True, inputs, rng, 1e-5, chunk_size=8, interpret=params)
    assert not interpret_pallas_call.races.races_found


PLATFORMS = {"tpu": "tpu", "gpu": "cuda"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_decay_kernels_lower_for_the_hardware(backend):
    chunk = 64 if backend == "tpu" else 16
    q = jax.ShapeDtypeStruct((2, 300, 4, 16), jnp.bfloat16)  # based-360m's heads
    v = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)
    log_decay = jax.ShapeDtypeStruct((2, 300, 4), jnp.float32)
    checks = []
    if backend == "gpu":
        checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    marker = "tpu_custom_call" if backend == "tpu" else "__gpu$xla.gpu.triton"
    for normalize in (True, False):

        def gradients(q, k, v, log_decay, normalize=normalize):
            def loss(q, k, v, log_decay):
                y, (kv_state, _) = pallas_linear_attention(
                    q,
                    k,
                    v,
                    log_decay=log_decay,
                    normalize=normalize,
                    chunk_size=chunk,
                    backend=backend,
                )
                return jnp.sum(y.astype(jnp.float32)) + jnp.sum(kv_state)

            return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, log_decay)

        exported = jax.export.export(
            jax.jit(gradients), platforms=[PLATFORMS[backend]], disabled_checks=checks
        )(q, q, v, log_decay)
        assert exported.mlir_module().count(marker) >= 3  # forward, dq, dk/dv kernels


def test_decay_arguments_are_checked(rng):
    q, k, v, log_decay, _ = make_inputs(rng, seq=8)
    with pytest.raises(ValueError, match=r"log_decay has shape \(2, 8\); expected"):
        pallas_linear_attention(q, k, v, log_decay=log_decay[..., 0], interpret=True)
    with pytest.raises(TypeError, match="normalize=1 must be a bool"):
        pallas_linear_attention(q, k, v, log_decay=log_decay, normalize=1, interpret=True)


@pytest.mark.parametrize(
    ("per_step", "with_state", "normalize"), [(True, True, True), (False, False, False)]
)
def test_ops_dispatch_with_decay_matches_xla(per_step, with_state, normalize, rng):
    # jaxbased.ops.linear_attention(implementation="pallas") runs the kernel (interpreted on
    # CPU) with a per-step [B, T, H] or a fixed per-head [H] decay (broadcast for the kernel).
    from jaxbased.ops import LinearAttentionState, linear_attention

    q, k, v, log_decay, state = make_inputs(rng, seq=24, value_dim=8)
    if not per_step:
        log_decay = np.log(np.array([0.9, 0.6], np.float32))
    initial = LinearAttentionState(*state) if with_state else None
    weights = random_weights(rng, v, "taylor", q.shape[-1])

    def results(implementation):
        def attention(q, k, v, log_decay, initial_state):
            y, final = linear_attention(
                q,
                k,
                v,
                chunk_size=8,
                log_decay=log_decay,
                normalize=normalize,
                initial_state=initial_state,
                return_state=True,
                implementation=implementation,
            )
            return y, tuple(final)

        loss = weighted_loss(attention, weights)
        argnums = (0, 1, 2, 3, 4) if with_state else (0, 1, 2, 3)
        run = jax.jit(lambda *args: (attention(*args), jax.grad(loss, argnums=argnums)(*args)))
        return jax.tree.leaves(run(q, k, v, log_decay, initial))

    got, want = results("pallas"), results("xla")
    assert len(got) == len(want) == (9 if with_state else 7)
    for got_leaf, want_leaf in zip(got, want, strict=True):
        assert got_leaf.shape == want_leaf.shape
        assert relative_error(got_leaf, want_leaf) <= 1e-5
    # and the XLA op agrees with the float64 recurrence (so both match the definition)
    per_step_decay = np.broadcast_to(log_decay, q.shape[:3])
    want_y, _ = numpy_recurrence(
        q, k, v, per_step_decay, "taylor", state if with_state else None, normalize=normalize
    )
    assert relative_error(got[0], want_y) <= 1e-5
