"""The elementwise feature maps (``identity``, ``elu``, ``relu``) and groups of heads sharing
queries and keys (SSD's ``b``, ``c``) in the linear-attention kernels.

Each kernel (TPU and GPU; interpreted on CPU, compiled where that accelerator is present) is
compared with the XLA reference op ``jaxbased.ops.linear_attention(implementation="xla")`` on
the outputs, the final state and the gradients of every input (queries, keys, values, the
initial state, the log decays), with and without decay and the normalizer; the outputs also
with the float64 token recurrence of ``tests/reference_numpy.py``. Tolerances: float32 1e-5
relative, bfloat16 2e-2. Shapes are tiny (the interpreter is slow): ``T = 24`` is one full
chunk of 16 and a tail; ``F = 5`` pads the key lanes (8 on TPU, 16 on GPU), where ``elu``
would give 1 unless masked.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxbased.ops import LinearAttentionState, expanded_dim, linear_attention
from pallas_kernels.linear_attention import linear_attention as pallas_linear_attention
from tests import reference_numpy as ref
from tests.conftest import kernel_interpret, relative_error

MAPS = ("identity", "elu", "relu")
CHUNK = 16


def make_inputs(
    rng, feature_map, *, seq=24, heads=2, groups=None, feature_dim=5, value_dim=6, positive=False
):
    groups = heads if groups is None else groups
    q, k = (rng.normal(size=(1, seq, groups, feature_dim)).astype(np.float32) for _ in range(2))
    if positive:  # identity features normalized: keep phi(q) . z away from 0
        q, k = np.abs(q) + 0.5, np.abs(k) + 0.5
    v = rng.normal(size=(1, seq, heads, value_dim)).astype(np.float32)
    log_decay = np.log(rng.uniform(0.6, 1.0, size=(1, seq, heads))).astype(np.float32)
    expanded = expanded_dim(feature_map, feature_dim)
    kv_state = (0.1 * rng.normal(size=(1, heads, expanded, value_dim))).astype(np.float32)
    k_state = np.abs(rng.normal(size=(1, heads, expanded))).astype(np.float32)
    return q, k, v, log_decay, (kv_state, k_state)


def results(attention, inputs, weights):
    """Jitted ``(y, (kv_state, k_state))`` and the gradients of a loss reading all of them."""

    def loss(*inputs):
        y, (kv_state, k_state) = attention(*inputs)
        return (
            jnp.sum(y.astype(jnp.float32) * weights[0])
            + 0.1 * jnp.sum(kv_state * weights[1])
            + 0.1 * jnp.sum(k_state * weights[2])
        )

    argnums = tuple(i for i, x in enumerate(inputs) if x is not None)
    return jax.jit(lambda *a: (attention(*a), jax.grad(loss, argnums=argnums)(*a)))(*inputs)


def compare(backend, feature_map, inputs, rng, *, normalize, tolerance):
    q, k, v, log_decay, state = inputs

    def kernel(q, k, v, log_decay, state):
        return pallas_linear_attention(
            q,
            k,
            v,
            state,
            log_decay=log_decay,
            normalize=normalize,
            feature_map=feature_map,
            chunk_size=CHUNK,
            backend=backend,
            interpret=kernel_interpret(backend),
        )

    def reference(q, k, v, log_decay, state):
        y, final = linear_attention(
            q,
            k,
            v,
            feature_map=feature_map,
            chunk_size=CHUNK,
            initial_state=None if state is None else LinearAttentionState(*state),
            return_state=True,
            log_decay=log_decay,
            normalize=normalize,
            implementation="xla",
        )
        return y, (final.kv_state, final.k_state)

    expanded = expanded_dim(feature_map, q.shape[-1])
    heads = v.shape[2]
    weights = (
        rng.normal(size=v.shape).astype(np.float32),
        rng.normal(size=(1, heads, expanded, v.shape[-1])).astype(np.float32),
        rng.normal(size=(1, heads, expanded)).astype(np.float32),
    )
    got, want = results(kernel, inputs, weights), results(reference, inputs, weights)
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    # y, kv, k; dq, dk, dv (+ d log_decay) (+ d kv_state, d k_state)
    assert (
        len(got_leaves) == len(want_leaves) == 6 + (log_decay is not None) + 2 * (state is not None)
    )
    assert got_leaves[0].dtype == v.dtype and got_leaves[1].dtype == jnp.float32
    for index, (got_leaf, want_leaf) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        assert got_leaf.shape == want_leaf.shape, index
        assert relative_error(got_leaf, want_leaf) <= tolerance, index
    heads_per_group = heads // q.shape[2]
    numpy_y, _ = ref.decayed_linear_attention(
        np.repeat(np.asarray(q, np.float64), heads_per_group, axis=2),
        np.repeat(np.asarray(k, np.float64), heads_per_group, axis=2),
        v,
        None if log_decay is None else log_decay,
        feature_map,
        normalize,
        kv_state=None if state is None else np.float64(state[0]),
        k_state=None if state is None else np.float64(state[1]),
    )
    assert relative_error(got_leaves[0], numpy_y) <= max(tolerance, 1e-5)


# (decay, normalize) per map: together the three maps run all four combinations in float32.
FLOAT32_CASES = {
    "identity": [(True, False), (False, True)],
    "elu": [(True, True), (False, False)],
    "relu": [(True, False), (False, True)],
}


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("feature_map", MAPS)
def test_float32_outputs_states_and_gradients_match_xla(backend, feature_map, rng):
    # With decay: an initial state (its cotangent too); without: none.
    for decay, normalize in FLOAT32_CASES[feature_map]:
        q, k, v, log_decay, state = make_inputs(
            rng, feature_map, positive=normalize and feature_map == "identity"
        )
        inputs = (q, k, v, log_decay, state) if decay else (q, k, v, None, None)
        compare(backend, feature_map, inputs, rng, normalize=normalize, tolerance=1e-5)


def test_float16_operands_on_gpu(rng):
    # Triton multiplies float16 operands (the GPU kernels' float16 path, which auto uses on a
    # GPU); float16 keeps 10 mantissa bits, so 1e-2 is generous.
    q, k, v, log_decay, state = make_inputs(rng, "identity", value_dim=16, groups=1)
    q, k, v = (jnp.asarray(x, jnp.float16) for x in (q, k, v))
    compare("gpu", "identity", (q, k, v, log_decay, state), rng, normalize=False, tolerance=1e-2)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_groups_of_heads_read_their_group_of_queries_and_keys(backend, rng):
    # SSD's layout (b, c shared by the heads of a group; identity map, decay, no normalizer)
    # in bfloat16 as a bfloat16 Mamba-2 runs it, and a grouped BASED (Taylor, normalized) in
    # float32: 1 group of 2 heads; against the XLA op with the same groups (which sees the same
    # rounded inputs) and the float64 recurrence on queries and keys repeated per head.
    q, k, v, log_decay, state = make_inputs(rng, "identity", groups=1, value_dim=16)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    compare(backend, "identity", (q, k, v, log_decay, state), rng, normalize=False, tolerance=2e-2)
    q, k, v, _, _ = make_inputs(rng, "taylor", groups=1, feature_dim=4)
    compare(backend, "taylor", (q, k, v, None, None), rng, normalize=True, tolerance=1e-5)


def test_elementwise_tpu_kernels_have_no_races_in_the_tpu_interpreter(rng):
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    # 2 heads reading 1 query/key group: the grouped block index maps too.
    q, k, v, log_decay, state = make_inputs(rng, "elu", seq=12, heads=2, groups=1, value_dim=4)

    def attention(q, k, v, log_decay, state):
        return pallas_linear_attention(
            q, k, v, state, log_decay=log_decay, feature_map="elu", chunk_size=8,
            backend="tpu", interpret=params,
        )  # fmt: skip

    (got, _), pullback = jax.vjp(attention, q, k, v, log_decay, state)
    zero_state = (jnp.zeros_like(state[0]), jnp.zeros_like(state[1]))
    jax.block_until_ready(pullback((jnp.ones_like(got), zero_state)))
    assert not interpret_pallas_call.races.races_found
    want = ref.decayed_linear_attention(
        q.repeat(2, axis=2), k.repeat(2, axis=2), v, log_decay, "elu", True, 1e-12, *state
    )[0]
    assert relative_error(got, want) <= 1e-5
