"""The fused Taylor feature map and the per-chunk math shared by the TPU and GPU kernels.

Feature layout (identical to ``jaxbased.ops.feature_maps``, so states are interchangeable):
index 0 is the constant 1, indices ``1 .. F`` the linear features ``x_i / F**0.25``, then the
second-order features, ``D' = 1 + F + F2`` in all:

- ``taylor``: ``x_i x_j / (sqrt(2) sqrt(F))`` for every ``(i, j)``, row-major (``F2 = F**2``);
- ``taylor_symmetric``: the upper triangle ``i <= j`` in ``numpy.triu_indices`` order, scaled
  ``1 / (sqrt(2) sqrt(F))`` on the diagonal and ``1 / sqrt(F)`` off it (``F2 = F (F + 1) / 2``).

Both give ``phi(q) . phi(k) = 1 + s + s**2 / 2`` with ``s = q . k / sqrt(F)``.

Fusion: inside a kernel every feature is a product of two affine maps of ``x`` (a one-hot matmul
and a bias) and a scale,

    phi(x) = scale * (x @ left + left_bias) * (x @ right + right_bias)        [C, rows]

(constant: ``1 * 1``; linear ``i``: ``x_i * 1``; pair ``(i, j)``: ``x_i * x_j``). The two
matmuls have ``F`` as their contraction and exact one-hot weights, so with bfloat16 inputs they
are exact in one bfloat16 pass; the expanded ``[C, rows]`` tile exists only on chip.

State rows are grouped in *segments* (each a run of consecutive features padded to a size the
hardware likes): one segment of ``round_up(D', 128)`` rows on TPU; on GPU (Triton) a few segments
whose sizes are powers of two (e.g. 273 = 256 + 32 rows for F = 16) so that no matmul side is
padded to the next power of two of ``D'``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._common import matmul, next_power_of_two, round_up

TAYLOR_FEATURE_MAPS: tuple[str, ...] = ("taylor", "taylor_symmetric")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of expanded features stored in consecutive (padded) state rows.

    Attributes:
      feature_start: index of its first feature in the ``D'`` layout.
      feature_count: number of real features (the remaining rows are zero padding).
      row_offset: index of its first row in the padded state.
      rows: rows it occupies, padding included.
    """

    feature_start: int
    feature_count: int
    row_offset: int
    rows: int


@dataclasses.dataclass(frozen=True)
class TaylorLayout:
    """Sizes of the fused Taylor expansion for one feature map, feature dim and backend.

    Attributes:
      feature_map: ``taylor`` or ``taylor_symmetric``.
      feature_dim: ``F``, the raw query/key dim.
      padded_feature_dim: ``F`` padded for the hardware (Triton: a power of two >= 16).
      segments: the state row groups (see the module docstring).
    """

    feature_map: str
    feature_dim: int
    padded_feature_dim: int
    segments: tuple[Segment, ...]

    @property
    def expanded_dim(self) -> int:
        """``D' = 1 + F + F2``."""
        return expanded_dim(self.feature_map, self.feature_dim)

    @property
    def rows(self) -> int:
        """Padded state rows, the sum of the segments' rows."""
        return sum(segment.rows for segment in self.segments)

    def factors(self) -> tuple[np.ndarray, ...]:
        """``left, right [Fp, rows]`` and ``left_bias, right_bias, scale [1, rows]``, float32."""
        rows = self.rows
        left = np.zeros((self.padded_feature_dim, rows), np.float32)
        right = np.zeros_like(left)
        left_bias, right_bias, scale = (np.zeros((1, rows), np.float32) for _ in range(3))
        for feature, (left_index, right_index, factor) in enumerate(self._feature_terms()):
            row = self._row_of(feature)
            scale[0, row] = factor
            if left_index is None:
                left_bias[0, row] = 1.0
            else:
                left[left_index, row] = 1.0
            if right_index is None:
                right_bias[0, row] = 1.0
            else:
                right[right_index, row] = 1.0
        return left, right, left_bias, right_bias, scale

    def _feature_terms(self) -> list[tuple[int | None, int | None, float]]:
        # (left input index or None for 1, right input index or None for 1, scale) per feature.
        feature_dim = self.feature_dim
        terms: list[tuple[int | None, int | None, float]] = [(None, None, 1.0)]
        terms += [(i, None, feature_dim**-0.25) for i in range(feature_dim)]
        diagonal = 1.0 / (math.sqrt(2.0) * math.sqrt(feature_dim))
        if self.feature_map == "taylor":
            terms += [(i, j, diagonal) for i in range(feature_dim) for j in range(feature_dim)]
        else:
            rows, cols = np.triu_indices(feature_dim)
            off_diagonal = 1.0 / math.sqrt(feature_dim)
            terms += [
                (int(i), int(j), diagonal if i == j else off_diagonal)
                for i, j in zip(rows, cols, strict=True)
            ]
        return terms

    def _row_of(self, feature: int) -> int:
        for segment in self.segments:
            if segment.feature_start <= feature < segment.feature_start + segment.feature_count:
                return segment.row_offset + feature - segment.feature_start
        raise AssertionError(feature)

    def to_rows(self, x: jax.Array, axis: int) -> jax.Array:
        """``[..., D', ...] -> [..., rows, ...]``: place each segment's features, zero padding."""
        pieces = []
        for segment in self.segments:
            piece = lax.slice_in_dim(
                x, segment.feature_start, segment.feature_start + segment.feature_count, axis=axis
            )
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, segment.rows - segment.feature_count)
            pieces.append(jnp.pad(piece, widths))
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)

    def from_rows(self, x: jax.Array, axis: int) -> jax.Array:
        """``[..., rows, ...] -> [..., D', ...]``, the inverse of :meth:`to_rows`."""
        pieces = [
            lax.slice_in_dim(
                x, segment.row_offset, segment.row_offset + segment.feature_count, axis=axis
            )
            for segment in self.segments
        ]
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)


def expanded_dim(feature_map: str, feature_dim: int) -> int:
    """``1 + F + F**2`` (``taylor``) or ``1 + F + F (F + 1) / 2`` (``taylor_symmetric``)."""
    if feature_map == "taylor":
        return 1 + feature_dim + feature_dim * feature_dim
    if feature_map == "taylor_symmetric":
        return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2
    raise ValueError(
        f"feature_map={feature_map!r} has no fused kernel; allowed: "
        f"{', '.join(TAYLOR_FEATURE_MAPS)}"
    )


def _power_of_two_segments(total: int, minimum: int = 16, tail: int = 32) -> list[int]:
    # Greedy: the largest power of two that fits, until the rest fits one segment of <= tail.
    sizes = []
    remaining = total
    while remaining > 0:
        if remaining <= tail:
            sizes.append(next_power_of_two(remaining, minimum))
            break
        size = 1 << (remaining.bit_length() - 1)
        sizes.append(size)
        remaining -= size
    return sizes


def make_layout(feature_map: str, feature_dim: int, backend: str) -> TaylorLayout:
    """The :class:`TaylorLayout` of ``feature_map`` for ``backend`` (``tpu`` or ``gpu``)."""
    total = expanded_dim(feature_map, feature_dim)
    if backend == "tpu":
        segments = (Segment(0, total, 0, round_up(total, 128)),)
        return TaylorLayout(feature_map, feature_dim, feature_dim, segments)
    segments = []
    start = offset = 0
    for size in _power_of_two_segments(total):
        count = min(size, total - start)
        segments.append(Segment(start, count, offset, size))
        start, offset = start + count, offset + size
    return TaylorLayout(
        feature_map, feature_dim, next_power_of_two(feature_dim, 16), tuple(segments)
    )


# ---------------------------------------------------------------------------------------------
# Per-chunk math on loaded tiles (jnp values), used inside both kernels.
# ---------------------------------------------------------------------------------------------
class Factors(NamedTuple):
    """One segment's expansion weights as loaded tiles: ``left, right [Fp, rows]``,
    ``left_bias, right_bias, scale [1, rows]`` (float32)."""

    left: jax.Array
    right: jax.Array
    left_bias: jax.Array
    right_bias: jax.Array
    scale: jax.Array


class SegmentState(NamedTuple):
    """One segment's running state: ``kv [rows, Dv_block]`` (sum of phi(k) ⊗ v) and
    ``k [1, rows]`` (sum of phi(k)), float32."""

    kv: jax.Array
    k: jax.Array


def expand(x: jax.Array, factors: Factors, operand_dtype: jnp.dtype) -> jax.Array:
    """``phi(x)`` for one segment: ``[C, Fp] -> [C, rows]`` float32 (see module docstring)."""
    left = matmul(x, factors.left, operand_dtype) + factors.left_bias
    right = matmul(x, factors.right, operand_dtype) + factors.right_bias
    return factors.scale * left * right


def expand_transpose(
    x: jax.Array, cotangent: jax.Array, factors: Factors, operand_dtype: jnp.dtype
) -> jax.Array:
    """Pull back ``d phi(x) [C, rows]`` to ``dx [C, Fp]`` float32.

    ``phi = scale * a * b`` with ``a = x @ left + left_bias``, ``b = x @ right + right_bias``:
    ``dx = (g * scale * b) @ left.T + (g * scale * a) @ right.T``.
    """
    left = matmul(x, factors.left, operand_dtype) + factors.left_bias
    right = matmul(x, factors.right, operand_dtype) + factors.right_bias
    scaled = cotangent * factors.scale
    return matmul(scaled * right, factors.left, operand_dtype, transpose_rhs=True) + matmul(
        scaled * left, factors.right, operand_dtype, transpose_rhs=True
    )


def causal_mask(chunk_size: int) -> jax.Array:
    """``[C, C]`` bool, true where key ``j <= `` query ``i``."""
    rows = lax.broadcasted_iota(jnp.int32, (chunk_size, chunk_size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (chunk_size, chunk_size), 1)
    return cols <= rows


def intra_chunk_kernel(
    q: jax.Array, k: jax.Array, feature_dim: int, operand_dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """``s = q k^T / sqrt(F)`` and the causal kernel ``A = 1 + s + s**2 / 2`` (zero above the
    diagonal), both ``[C, C]`` float32, from raw ``F``-dim dots (no expansion needed)."""
    scores = matmul(q, k, operand_dtype, transpose_rhs=True) * (1.0 / math.sqrt(feature_dim))
    kernel = 1.0 + scores + 0.5 * scores * scores
    return scores, jnp.where(causal_mask(q.shape[0]), kernel, 0.0)


def chunk_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    states: list[SegmentState],
    factors: list[Factors],
    *,
    feature_dim: int,
    eps: float,
    operand_dtype: jnp.dtype,
    key_valid: jax.Array | None,
) -> tuple[jax.Array, jax.Array, list[SegmentState]]:
    """One chunk of the forward scan.

    Args:
      q, k: ``[C, Fp]``; v: ``[C, Dv_block]``; states: the state before the chunk.
      key_valid: ``[C, 1]`` bool (tokens past the sequence end are false) or None.

    Returns:
      ``y [C, Dv_block]`` float32 with ``y_i = (sum_j A_ij v_j + phi(q_i) S) / (den_i + eps)``,
      ``den [C, 1]`` float32 (``sum_j A_ij + phi(q_i) . z``, without eps), and the state after
      the chunk (``S += phi(k)^T v``, ``z += sum phi(k)``).
    """
    _, kernel = intra_chunk_kernel(q, k, feature_dim, operand_dtype)
    numerator = matmul(kernel, v, operand_dtype)
    denominator = jnp.sum(kernel, axis=1, keepdims=True)
    new_states = []
    for state, factor in zip(states, factors, strict=True):
        query_features = expand(q, factor, operand_dtype)
        numerator = numerator + matmul(query_features, state.kv, operand_dtype)
        denominator = denominator + jnp.sum(query_features * state.k, axis=1, keepdims=True)
        key_features = expand(k, factor, operand_dtype)
        if key_valid is not None:
            key_features = jnp.where(key_valid, key_features, 0.0)
        new_states.append(
            SegmentState(
                state.kv + matmul(key_features, v, operand_dtype, transpose_lhs=True),
                state.k + jnp.sum(key_features, axis=0, keepdims=True),
            )
        )
    return numerator / (denominator + eps), denominator, new_states


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
    d_denominator: jax.Array,
    states: list[SegmentState],
    factors: list[Factors],
    *,
    feature_dim: int,
    operand_dtype: jnp.dtype,
    key_valid: jax.Array | None,
) -> tuple[jax.Array, list[SegmentState]]:
    """``dq [C, Fp]`` of one chunk (forward order), and the state after the chunk.

    ``dA_ij = dN_i . v_j + dD_i`` (j <= i), ``dq_i = sum_j dA_ij (1 + s_ij) k_j / sqrt(F)`` plus
    the pull-back of ``d phi(q_i) = S dN_i + z dD_i`` through the feature map.
    """
    scores, _ = intra_chunk_kernel(q, k, feature_dim, operand_dtype)
    d_kernel = matmul(d_numerator, v, operand_dtype, transpose_rhs=True) + d_denominator
    d_kernel = jnp.where(causal_mask(q.shape[0]), d_kernel, 0.0)
    d_scores = d_kernel * (1.0 + scores) * (1.0 / math.sqrt(feature_dim))
    dq = matmul(d_scores, k, operand_dtype)
    new_states = []
    for state, factor in zip(states, factors, strict=True):
        d_features = (
            matmul(d_numerator, state.kv, operand_dtype, transpose_rhs=True)
            + d_denominator * state.k
        )
        dq = dq + expand_transpose(q, d_features, factor, operand_dtype)
        key_features = expand(k, factor, operand_dtype)
        if key_valid is not None:
            key_features = jnp.where(key_valid, key_features, 0.0)
        new_states.append(
            SegmentState(
                state.kv + matmul(key_features, v, operand_dtype, transpose_lhs=True),
                state.k + jnp.sum(key_features, axis=0, keepdims=True),
            )
        )
    return dq, new_states


def chunk_backward_key_value(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    d_numerator: jax.Array,
    d_denominator: jax.Array,
    d_states: list[SegmentState],
    factors: list[Factors],
    *,
    feature_dim: int,
    operand_dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array, list[SegmentState]]:
    """``dk [C, Fp]`` and ``dv [C, Dv_block]`` of one chunk (reverse order).

    ``d_states`` is the cotangent of the state *after* the chunk (all later queries plus the
    final-state cotangent). Returns it moved to *before* the chunk:
    ``dS += phi(q)^T dN``, ``dz += phi(q)^T dD``.
    """
    scores, kernel = intra_chunk_kernel(q, k, feature_dim, operand_dtype)
    dv = matmul(kernel, d_numerator, operand_dtype, transpose_lhs=True)
    d_kernel = matmul(d_numerator, v, operand_dtype, transpose_rhs=True) + d_denominator
    d_kernel = jnp.where(causal_mask(q.shape[0]), d_kernel, 0.0)
    d_scores = d_kernel * (1.0 + scores) * (1.0 / math.sqrt(feature_dim))
    dk = matmul(d_scores, q, operand_dtype, transpose_lhs=True)
    new_states = []
    for d_state, factor in zip(d_states, factors, strict=True):
        key_features = expand(k, factor, operand_dtype)
        dv = dv + matmul(key_features, d_state.kv, operand_dtype)
        d_key_features = matmul(v, d_state.kv, operand_dtype, transpose_rhs=True) + d_state.k
        dk = dk + expand_transpose(k, d_key_features, factor, operand_dtype)
        query_features = expand(q, factor, operand_dtype)
        new_states.append(
            SegmentState(
                d_state.kv + matmul(query_features, d_numerator, operand_dtype, transpose_lhs=True),
                d_state.k + jnp.sum(query_features * d_denominator, axis=0, keepdims=True),
            )
        )
    return dk, dv, new_states
