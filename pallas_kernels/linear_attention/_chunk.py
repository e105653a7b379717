"""The per-chunk math of the linear-attention kernels on loaded tiles, shared by TPU and GPU.

Everything here runs inside a kernel on ``jnp`` values of one chunk of ``C`` tokens: the
chunk's decay factors and one chunk of the forward scan, of the ``dq`` scan and of the reverse
``dk, dv`` scan. The feature map (fused Taylor expansion or elementwise) and the intra-chunk
kernel ``A`` come from :mod:`._features`; the expanded ``[C, rows]`` tiles exist only on chip.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import matmul, row_to_column
from pallas_kernels.linear_attention._features import ChunkFeatures, Segment, causal_mask


class SegmentState(NamedTuple):
    """One segment's running state: ``kv [rows, Dv_block]`` (sum of phi(k) ⊗ v) and
    ``k [1, rows]`` (sum of phi(k)), float32."""

    kv: jax.Array
    k: jax.Array


class ChunkDecay(NamedTuple):
    """The decay factors of one chunk, from its cumulative log decays ``g`` (float32).

    Attributes:
      weights: ``[C, C]``, ``exp(g_i - g_j)`` for key ``j <=`` query ``i``, else 0.
      query_scale: ``[C, 1]``, ``exp(g_i)``: how much of the state before the chunk query
        ``i`` reads.
      key_scale: ``[C, 1]``, ``exp(g_last - g_j)``: how much of key ``j`` the state after the
        chunk keeps.
      state_scale: ``[1, 1]``, ``exp(g_last)``: how much of the state before the chunk it keeps.
    """

    weights: jax.Array
    query_scale: jax.Array
    key_scale: jax.Array
    state_scale: jax.Array


def chunk_decay(cumulative: jax.Array) -> ChunkDecay:
    """:class:`ChunkDecay` of a chunk from its cumulative log decays as a row ``[1, C]``.

    The difference ``g_i - g_j`` is masked to 0 above the diagonal *before* the ``exp``, so that
    no positive number is exponentiated (``g`` decreases along the chunk).
    """
    chunk_size = cumulative.shape[1]
    column = row_to_column(cumulative)
    lanes = lax.broadcasted_iota(jnp.int32, (1, chunk_size), 1)
    last = jnp.sum(jnp.where(lanes == chunk_size - 1, cumulative, 0.0), axis=1, keepdims=True)
    causal = causal_mask(chunk_size)
    weights = jnp.where(causal, jnp.exp(jnp.where(causal, column - cumulative, 0.0)), 0.0)
    return ChunkDecay(weights, jnp.exp(column), jnp.exp(last - column), jnp.exp(last))


def kernel_cotangent(
    d_numerator: jax.Array,
    d_denominator: jax.Array | None,
    v: jax.Array,
    operand_dtype: jnp.dtype,
    decay: ChunkDecay | None,
) -> jax.Array:
    """``dA_ij = (dN_i . v_j + dD_i)`` times the causal (decay) weight."""
    d_kernel = matmul(d_numerator, v, operand_dtype, transpose_rhs=True)
    if d_denominator is not None:
        d_kernel = d_kernel + d_denominator
    if decay is not None:
        return d_kernel * decay.weights
    return jnp.where(causal_mask(v.shape[0]), d_kernel, 0.0)


def advance_state(
    state: SegmentState,
    k: jax.Array,
    v: jax.Array,
    segment: Segment,
    operand_dtype: jnp.dtype,
    key_valid: jax.Array | None,
    decay: ChunkDecay | None,
) -> SegmentState:
    """The state after the chunk: ``S' = a S + (w phi(k))^T v``, ``z' = a z + sum w phi(k)``
    (``a = exp(g_last)``, ``w_j = exp(g_last - g_j)``; both 1 without decay)."""
    key_features = segment.features(k)
    if key_valid is not None:
        key_features = jnp.where(key_valid, key_features, 0.0)
    kv, k_sum = state
    if decay is not None:
        key_features = key_features * decay.key_scale
        kv, k_sum = kv * decay.state_scale, k_sum * decay.state_scale
    return SegmentState(
        kv + matmul(key_features, v, operand_dtype, transpose_lhs=True),
        k_sum + jnp.sum(key_features, axis=0, keepdims=True),
    )


def chunk_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    states: list[SegmentState],
    features: ChunkFeatures,
    *,
    eps: float,
    key_valid: jax.Array | None,
    decay: ChunkDecay | None = None,
    normalize: bool = True,
) -> tuple[jax.Array, jax.Array, list[SegmentState]]:
    """One chunk of the forward scan.

    Args:
      q, k: ``[C, Fp]``; v: ``[C, Dv_block]``; states: the state before the chunk.
      features: the call's feature map.
      key_valid: ``[C, 1]`` bool (tokens past the sequence end are false) or None.
      decay: the chunk's :class:`ChunkDecay`, or None for no decay.
      normalize: divide by the denominator (else ``y = N``).

    Returns:
      ``y [C, Dv_block]`` float32 with ``y_i = N_i / (den_i + eps)``,
      ``N_i = sum_j A_ij v_j + exp(g_i) phi(q_i) S``, ``den [C, 1]`` float32
      (``sum_j A_ij + exp(g_i) phi(q_i) . z``, without eps), and the state after the chunk.
    """
    operand_dtype = features.operand_dtype
    _, kernel = features.kernel(q, k, None if decay is None else decay.weights)
    state_numerator = state_denominator = 0.0
    new_states = []
    for state, segment in zip(states, features.segments, strict=True):
        query_features = segment.features(q)
        state_numerator = state_numerator + matmul(query_features, state.kv, operand_dtype)
        state_denominator = state_denominator + jnp.sum(
            query_features * state.k, axis=1, keepdims=True
        )
        new_states.append(advance_state(state, k, v, segment, operand_dtype, key_valid, decay))
    if decay is not None:
        state_numerator = state_numerator * decay.query_scale
        state_denominator = state_denominator * decay.query_scale
    numerator = matmul(kernel, v, operand_dtype) + state_numerator
    denominator = jnp.sum(kernel, axis=1, keepdims=True) + state_denominator
    y = numerator / (denominator + eps) if normalize else numerator
    return y, denominator, new_states


def output_cotangents(
    dy: jax.Array, y_dot_dy: jax.Array, denominator: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    """Cotangents of the numerator and denominator from ``dy``.

    ``y = N / (D + eps)``: ``dN = dy / (D + eps)`` ``[C, Dv_block]`` and
    ``dD = -(dy . y) / (D + eps)`` ``[C, 1]``; ``y_dot_dy [C, 1]`` is ``sum_d dy_d y_d`` over the
    whole value dim.
    """
    inverse = 1.0 / (denominator + eps)
    return dy * inverse, -y_dot_dy * inverse


def chunk_backward_query(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    d_numerator: jax.Array,
    d_denominator: jax.Array | None,
    states: list[SegmentState],
    features: ChunkFeatures,
    *,
    key_valid: jax.Array | None,
    decay: ChunkDecay | None = None,
) -> tuple[jax.Array, list[SegmentState]]:
    """``dq [C, Fp]`` of one chunk (forward order), and the state after the chunk.

    ``dA_ij = dN_i . v_j + dD_i`` (j <= i, times the decay weight) pulled back through the
    intra-chunk kernel (Taylor: ``dq_i = sum_j dA_ij (1 + s_ij) k_j / sqrt(F)``), plus the
    pull-back of ``d phi(q_i) = exp(g_i) (S dN_i + z dD_i)`` through the feature map.
    ``d_denominator`` is None without the normalizer.
    """
    operand_dtype = features.operand_dtype
    residual = features.query_residual(q, k)
    d_kernel = kernel_cotangent(d_numerator, d_denominator, v, operand_dtype, decay)
    dq = features.query_pullback(q, k, residual, d_kernel)
    new_states = []
    for state, segment in zip(states, features.segments, strict=True):
        d_features = matmul(d_numerator, state.kv, operand_dtype, transpose_rhs=True)
        if d_denominator is not None:
            d_features = d_features + d_denominator * state.k
        if decay is not None:
            d_features = d_features * decay.query_scale
        dq = dq + segment.pullback(q, d_features)
        new_states.append(advance_state(state, k, v, segment, operand_dtype, key_valid, decay))
    return dq, new_states


def chunk_backward_key_value(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    d_numerator: jax.Array,
    d_denominator: jax.Array | None,
    d_states: list[SegmentState],
    features: ChunkFeatures,
    *,
    decay: ChunkDecay | None = None,
) -> tuple[jax.Array, jax.Array, list[SegmentState], jax.Array | None]:
    """``dk [C, Fp]`` and ``dv [C, Dv_block]`` of one chunk (reverse order).

    ``d_states`` is the cotangent of the state *after* the chunk (all later queries plus the
    final-state cotangent). Returns it moved to *before* the chunk:
    ``dS' = a dS + (exp(g) phi(q))^T dN``, ``dz' = a dz + sum_i exp(g_i) phi(q_i) dD_i``.

    With decay, also returns ``key_term [C, 1]`` float32: the cotangent of the factor
    ``exp(-g_j)`` that every contribution of key ``j`` carries, ``v_j . dv_j`` plus the
    normalizer's ``sum_i A_ij dD_i + w_j phi(k_j) . dz`` (see ``log_decay_cotangent``); None
    without decay.
    """
    operand_dtype = features.operand_dtype
    residual, kernel = features.kernel(q, k, None if decay is None else decay.weights)
    dv = matmul(kernel, d_numerator, operand_dtype, transpose_lhs=True)
    d_kernel = kernel_cotangent(d_numerator, d_denominator, v, operand_dtype, decay)
    dk = features.key_pullback(q, k, residual, d_kernel)
    key_term = None
    if decay is not None and d_denominator is not None:
        key_term = row_to_column(jnp.sum(kernel * d_denominator, axis=0, keepdims=True))
    new_states = []
    for d_state, segment in zip(d_states, features.segments, strict=True):
        key_features = segment.features(k)
        d_key_features = matmul(v, d_state.kv, operand_dtype, transpose_rhs=True) + d_state.k
        query_features = segment.features(q)
        d_kv, d_k = d_state
        if decay is not None:
            key_features = key_features * decay.key_scale
            d_key_features = d_key_features * decay.key_scale
            query_features = query_features * decay.query_scale
            d_kv, d_k = d_kv * decay.state_scale, d_k * decay.state_scale
            normalizer_term = jnp.sum(key_features * d_state.k, axis=1, keepdims=True)
            key_term = normalizer_term if key_term is None else key_term + normalizer_term
        dv = dv + matmul(key_features, d_state.kv, operand_dtype)
        dk = dk + segment.pullback(k, d_key_features)
        d_kv = d_kv + matmul(query_features, d_numerator, operand_dtype, transpose_lhs=True)
        if d_denominator is not None:
            d_k = d_k + jnp.sum(query_features * d_denominator, axis=0, keepdims=True)
        new_states.append(SegmentState(d_kv, d_k))
    if decay is not None:
        key_term = key_term + jnp.sum(v.astype(jnp.float32) * dv, axis=1, keepdims=True)
    return dk, dv, new_states, key_term
