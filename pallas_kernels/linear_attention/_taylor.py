"""The fused Taylor feature map and the per-chunk math shared by the TPU and GPU kernels.

The kernels compute with the symmetric (upper-triangle) form of the second-order features,
``D' = 1 + F + F (F + 1) / 2`` (153 rows for F = 16 instead of 273): index 0 is the constant 1,
indices ``1 .. F`` the linear features ``x_i / F**0.25``, then ``x_i x_j`` for ``i <= j`` in
``numpy.triu_indices`` order, scaled ``1 / (sqrt(2) sqrt(F))`` on the diagonal and
``1 / sqrt(F)`` off it, exactly ``jaxbased.ops.feature_maps``' ``taylor_symmetric``. It gives
the same ``phi(q) . phi(k) = 1 + s + s**2 / 2`` (``s = q . k / sqrt(F)``) as the full
``taylor`` map with half the state; :mod:`._symmetric` converts ``taylor`` states at the call
boundary.

Fusion: inside a kernel every feature is a product of two affine maps of ``x`` (a one-hot matmul
and a bias) and a scale,

    phi(x) = scale * (x @ left + left_bias) * (x @ right + right_bias)        [C, rows]

(constant: ``1 * 1``; linear ``i``: ``x_i * 1``; pair ``(i, j)``: ``x_i * x_j``). The two
matmuls have ``F`` as their contraction and exact one-hot weights, so with bfloat16 inputs they
are exact in one bfloat16 pass; the expanded ``[C, rows]`` tile exists only on chip.

State rows are grouped in *segments* (each a run of consecutive features padded to a size the
hardware likes): one segment of ``round_up(D', 128)`` rows on TPU; on GPU (Triton) a few segments
whose sizes are powers of two (e.g. 153 = 128 + 32 rows for F = 16) so that no matmul side is
padded to the next power of two of ``D'``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import matmul, next_power_of_two, pad_axis, round_up, row_to_column

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
    """Sizes of the fused (symmetric) Taylor expansion for one feature dim and backend.

    Attributes:
      feature_dim: ``F``, the raw query/key dim.
      padded_feature_dim: ``F`` padded for the hardware (Triton: a power of two >= 16).
      segments: the state row groups (see the module docstring).
    """

    feature_dim: int
    padded_feature_dim: int
    segments: tuple[Segment, ...]

    @property
    def expanded_dim(self) -> int:
        """``D' = 1 + F + F (F + 1) / 2``."""
        return expanded_dim("taylor_symmetric", self.feature_dim)

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
        off_diagonal = 1.0 / math.sqrt(feature_dim)
        rows, cols = np.triu_indices(feature_dim)
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


def make_layout(feature_dim: int, backend: str) -> TaylorLayout:
    """The symmetric :class:`TaylorLayout` of ``feature_dim`` for ``backend`` (``tpu``/``gpu``)."""
    total = expanded_dim("taylor_symmetric", feature_dim)
    if backend == "tpu":
        segments = (Segment(0, total, 0, round_up(total, 128)),)
        return TaylorLayout(feature_dim, feature_dim, segments)
    segments = []
    start = offset = 0
    for size in _power_of_two_segments(total):
        count = min(size, total - start)
        segments.append(Segment(start, count, offset, size))
        start, offset = start + count, offset + size
    return TaylorLayout(feature_dim, next_power_of_two(feature_dim, 16), tuple(segments))


# ---------------------------------------------------------------------------------------------
# One kernel call: its static parameters, the state layout conversions and residuals.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChunkedCall:
    """Compile-time parameters of one kernel call, common to both backends.

    Attributes:
      layout: the feature layout (state rows).
      seq_len: ``T``; chunk_size: ``C``; num_chunks: ``ceil(T / C)``.
      value_dim: ``Dv``; padded_value_dim: ``Dv`` padded as the backend wants it.
      eps, operand_dtype, normalize, interpret: from the op's config.
      has_initial_state, has_decay: which optional inputs this call has.
    """

    layout: TaylorLayout
    seq_len: int
    chunk_size: int
    num_chunks: int
    value_dim: int
    padded_value_dim: int
    eps: float
    operand_dtype: Any
    normalize: bool
    has_initial_state: bool
    has_decay: bool
    interpret: Any

    @classmethod
    def create(
        cls,
        config: Any,
        seq_len: int,
        value_dim: int,
        padded_value_dim: int,
        *,
        has_initial_state: bool,
        has_decay: bool,
        **extra: Any,
    ):
        """From a ``LinearAttentionConfig`` and the shapes (``extra``: a backend's own fields)."""
        return cls(
            layout=config.layout,
            seq_len=seq_len,
            chunk_size=config.chunk_size,
            num_chunks=-(-seq_len // config.chunk_size),
            value_dim=value_dim,
            padded_value_dim=padded_value_dim,
            eps=config.eps,
            operand_dtype=config.operand_dtype,
            normalize=config.normalize,
            has_initial_state=has_initial_state,
            has_decay=has_decay,
            interpret=config.interpret,
            **extra,
        )

    @property
    def rows(self) -> int:
        return self.layout.rows

    @property
    def padded_seq(self) -> int:
        return self.num_chunks * self.chunk_size

    def state_to_kernel(self, kv: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(kv [B, H, D', Dv], k [B, H, D'])`` -> ``([B, H, rows, Dp], [B, H, 1, rows])``."""
        kv = pad_axis(self.layout.to_rows(kv.astype(jnp.float32), axis=2), 3, self.padded_value_dim)
        k = self.layout.to_rows(k.astype(jnp.float32), axis=2)[:, :, None, :]
        return kv, k

    def state_from_kernel(self, kv: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The inverse of :meth:`state_to_kernel`."""
        kv = self.layout.from_rows(kv[..., : self.value_dim], axis=2)
        k = self.layout.from_rows(k[:, :, 0, :], axis=2)
        return kv, k

    def factor_arrays(self) -> list[jax.Array]:
        """The feature map's ``left, right, left_bias, right_bias, scale`` (kernel inputs)."""
        return [jnp.asarray(a) for a in self.layout.factors()]

    def factor_specs(self) -> list[pl.BlockSpec]:
        """Whole-array blocks of :meth:`factor_arrays`, the same for every grid point."""
        feature_dim, rows = self.layout.padded_feature_dim, self.rows
        shapes = [(feature_dim, rows)] * 2 + [(1, rows)] * 3
        return [pl.BlockSpec(shape, lambda *grid: (0, 0)) for shape in shapes]

    def key_valid(self, start) -> jax.Array | None:
        """In a kernel: ``[C, 1]`` bool, token ``start + i`` is before ``T`` (None when every
        chunk is full)."""
        if self.seq_len % self.chunk_size == 0:
            return None
        positions = start + lax.broadcasted_iota(jnp.int32, (self.chunk_size, 1), 0)
        return positions < self.seq_len


def kernel_inputs(
    call: ChunkedCall,
    operands: list[tuple[jax.Array, pl.BlockSpec]],
    decay: tuple[jax.Array, pl.BlockSpec] | None,
    state: tuple[jax.Array, jax.Array] | None,
    state_specs: list[pl.BlockSpec],
) -> tuple[list[jax.Array], list[pl.BlockSpec]]:
    """The inputs of a kernel and their block specs, in the order :func:`split_kernel_refs`
    reads them: the per-token ``operands`` (array, spec), the cumulative log decays (if any),
    the feature map's factors, a state ``(kv, k)`` in kernel layout (if any)."""
    pairs = [*operands, *([decay] if decay is not None else [])]
    pairs += zip(call.factor_arrays(), call.factor_specs(), strict=True)
    pairs += zip(state or (), state_specs if state is not None else (), strict=True)
    return [array for array, _ in pairs], [spec for _, spec in pairs]


def split_kernel_refs(call: ChunkedCall, refs: list, reads_initial_state: bool = True):
    """In a kernel, after the per-token operands' refs: ``(decay_ref or None, factor_refs,
    initial-state refs (empty if none), the remaining refs)``, as :func:`kernel_inputs` orders
    them."""
    decay_ref = refs.pop(0) if call.has_decay else None
    factor_refs, refs = refs[:5], refs[5:]
    initial_refs = ()
    if call.has_initial_state and reads_initial_state:
        initial_refs, refs = refs[:2], refs[2:]
    return decay_ref, factor_refs, initial_refs, refs


class Residuals(NamedTuple):
    """What the forward keeps for the backward kernels (layouts are the backend's).

    Attributes:
      q, k, v: the padded kernel operands.
      initial_state: the initial state in kernel layout, or None.
      y: the output; denominator: ``phi(q) . z + sum_j A_ij`` per token (float32).
      cumulative_decay: the chunk-local cumulative log decays in kernel layout, or None.
      final_state: ``(kv, k)`` as returned (only with decay, for ``d log_decay``), or None.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    initial_state: tuple[jax.Array, jax.Array] | None
    y: jax.Array
    denominator: jax.Array
    cumulative_decay: jax.Array | None
    final_state: tuple[jax.Array, jax.Array] | None


# ---------------------------------------------------------------------------------------------
# Decay: chunk-local cumulative log decays (XLA, outside the kernels) and their cotangent.
# ---------------------------------------------------------------------------------------------
def chunk_cumulative_log_decay(log_decay: jax.Array, chunk_size: int, num_chunks: int) -> jax.Array:
    """``[B, T, H] -> [B, H, N, C]`` float32: ``g_i = sum_{s <= i} log a_s`` inside each chunk.

    Tokens past ``T`` get ``log a = 0`` (no decay), so the tail chunk's last ``g`` is the decay
    of its real tokens.
    """
    batch, _, heads = log_decay.shape
    padded = jnp.swapaxes(log_decay.astype(jnp.float32), 1, 2)  # [B, H, T]
    padded = jnp.pad(padded, ((0, 0), (0, 0), (0, num_chunks * chunk_size - padded.shape[2])))
    return jnp.cumsum(padded.reshape(batch, heads, num_chunks, chunk_size), axis=-1)


def log_decay_cotangent(
    call: ChunkedCall,
    y_dot_dy: jax.Array,
    denominator: jax.Array,
    key_term: jax.Array,
    final_state: tuple[jax.Array, jax.Array],
    d_final_state: tuple[jax.Array, jax.Array],
) -> jax.Array:
    """``d log_decay [B, T, H]`` float32 from per-token terms ``[B, H, T_pad]`` (XLA).

    With ``G_t = sum_{s <= t} log a_s`` over the whole sequence, token ``i``'s numerator
    ``N_i`` and denominator ``D_i`` carry a factor ``exp(G_i)`` and key ``j`` a factor
    ``exp(-G_j)`` in every term, and the final state carries ``exp(G_{T-1})``, so

        dG_i = (dN_i . N_i + dD_i D_i) - key_term_i + [i = T-1] (<dS_T, S_T> + <dz_T, z_T>)

    where ``key_term_j = v_j . dv_j + (the normalizer's share)`` comes from the ``dk, dv``
    kernel; ``dN . N + dD D = (dy . y) eps / (D + eps)`` (``dy . y`` unnormalized). Then
    ``d log a_t = sum_{s >= t} dG_s``.
    """
    seq_len, eps = call.seq_len, call.eps
    query_term = y_dot_dy * (eps / (denominator + eps)) if call.normalize else y_dot_dy
    d_cumulative = (query_term - key_term)[:, :, :seq_len]
    (kv_state, k_state), (d_kv_state, d_k_state) = final_state, d_final_state
    final_term = jnp.sum(kv_state * d_kv_state, axis=(2, 3)) + jnp.sum(k_state * d_k_state, axis=2)
    d_cumulative = d_cumulative.at[:, :, seq_len - 1].add(final_term)
    d_log_decay = jnp.flip(jnp.cumsum(jnp.flip(d_cumulative, axis=2), axis=2), axis=2)
    return jnp.swapaxes(d_log_decay, 1, 2)


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
    q: jax.Array,
    k: jax.Array,
    feature_dim: int,
    operand_dtype: jnp.dtype,
    decay: ChunkDecay | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``s = q k^T / sqrt(F)`` and the causal kernel ``A = 1 + s + s**2 / 2`` (zero above the
    diagonal, times ``exp(g_i - g_j)`` with decay), both ``[C, C]`` float32, from raw
    ``F``-dim dots (no expansion needed)."""
    scores = matmul(q, k, operand_dtype, transpose_rhs=True) * (1.0 / math.sqrt(feature_dim))
    kernel = 1.0 + scores + 0.5 * scores * scores
    if decay is not None:
        return scores, kernel * decay.weights
    return scores, jnp.where(causal_mask(q.shape[0]), kernel, 0.0)


def kernel_cotangent(
    d_numerator: jax.Array,
    d_denominator: jax.Array | None,
    v: jax.Array,
    operand_dtype: jnp.dtype,
    decay: ChunkDecay | None,
) -> jax.Array:
    """``d(1 + s + s**2 / 2)_ij = (dN_i . v_j + dD_i)`` times the causal (decay) weight."""
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
    factors: Factors,
    operand_dtype: jnp.dtype,
    key_valid: jax.Array | None,
    decay: ChunkDecay | None,
) -> SegmentState:
    """The state after the chunk: ``S' = a S + (w phi(k))^T v``, ``z' = a z + sum w phi(k)``
    (``a = exp(g_last)``, ``w_j = exp(g_last - g_j)``; both 1 without decay)."""
    key_features = expand(k, factors, operand_dtype)
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
    factors: list[Factors],
    *,
    feature_dim: int,
    eps: float,
    operand_dtype: jnp.dtype,
    key_valid: jax.Array | None,
    decay: ChunkDecay | None = None,
    normalize: bool = True,
) -> tuple[jax.Array, jax.Array, list[SegmentState]]:
    """One chunk of the forward scan.

    Args:
      q, k: ``[C, Fp]``; v: ``[C, Dv_block]``; states: the state before the chunk.
      key_valid: ``[C, 1]`` bool (tokens past the sequence end are false) or None.
      decay: the chunk's :class:`ChunkDecay`, or None for no decay.
      normalize: divide by the denominator (else ``y = N``).

    Returns:
      ``y [C, Dv_block]`` float32 with ``y_i = N_i / (den_i + eps)``,
      ``N_i = sum_j A_ij v_j + exp(g_i) phi(q_i) S``, ``den [C, 1]`` float32
      (``sum_j A_ij + exp(g_i) phi(q_i) . z``, without eps), and the state after the chunk.
    """
    _, kernel = intra_chunk_kernel(q, k, feature_dim, operand_dtype, decay)
    state_numerator = state_denominator = 0.0
    new_states = []
    for state, factor in zip(states, factors, strict=True):
        query_features = expand(q, factor, operand_dtype)
        state_numerator = state_numerator + matmul(query_features, state.kv, operand_dtype)
        state_denominator = state_denominator + jnp.sum(
            query_features * state.k, axis=1, keepdims=True
        )
        new_states.append(advance_state(state, k, v, factor, operand_dtype, key_valid, decay))
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
    factors: list[Factors],
    *,
    feature_dim: int,
    operand_dtype: jnp.dtype,
    key_valid: jax.Array | None,
    decay: ChunkDecay | None = None,
) -> tuple[jax.Array, list[SegmentState]]:
    """``dq [C, Fp]`` of one chunk (forward order), and the state after the chunk.

    ``dA_ij = dN_i . v_j + dD_i`` (j <= i, times the decay weight),
    ``dq_i = sum_j dA_ij (1 + s_ij) k_j / sqrt(F)`` plus the pull-back of
    ``d phi(q_i) = exp(g_i) (S dN_i + z dD_i)`` through the feature map. ``d_denominator`` is
    None without the normalizer.
    """
    scores, _ = intra_chunk_kernel(q, k, feature_dim, operand_dtype)
    d_kernel = kernel_cotangent(d_numerator, d_denominator, v, operand_dtype, decay)
    d_scores = d_kernel * (1.0 + scores) * (1.0 / math.sqrt(feature_dim))
    dq = matmul(d_scores, k, operand_dtype)
    new_states = []
    for state, factor in zip(states, factors, strict=True):
        d_features = matmul(d_numerator, state.kv, operand_dtype, transpose_rhs=True)
        if d_denominator is not None:
            d_features = d_features + d_denominator * state.k
        if decay is not None:
            d_features = d_features * decay.query_scale
        dq = dq + expand_transpose(q, d_features, factor, operand_dtype)
        new_states.append(advance_state(state, k, v, factor, operand_dtype, key_valid, decay))
    return dq, new_states


def chunk_backward_key_value(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    d_numerator: jax.Array,
    d_denominator: jax.Array | None,
    d_states: list[SegmentState],
    factors: list[Factors],
    *,
    feature_dim: int,
    operand_dtype: jnp.dtype,
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
    scores, kernel = intra_chunk_kernel(q, k, feature_dim, operand_dtype, decay)
    dv = matmul(kernel, d_numerator, operand_dtype, transpose_lhs=True)
    d_kernel = kernel_cotangent(d_numerator, d_denominator, v, operand_dtype, decay)
    d_scores = d_kernel * (1.0 + scores) * (1.0 / math.sqrt(feature_dim))
    dk = matmul(d_scores, q, operand_dtype, transpose_lhs=True)
    key_term = None
    if decay is not None and d_denominator is not None:
        key_term = row_to_column(jnp.sum(kernel * d_denominator, axis=0, keepdims=True))
    new_states = []
    for d_state, factor in zip(d_states, factors, strict=True):
        key_features = expand(k, factor, operand_dtype)
        d_key_features = matmul(v, d_state.kv, operand_dtype, transpose_rhs=True) + d_state.k
        query_features = expand(q, factor, operand_dtype)
        d_kv, d_k = d_state
        if decay is not None:
            key_features = key_features * decay.key_scale
            d_key_features = d_key_features * decay.key_scale
            query_features = query_features * decay.query_scale
            d_kv, d_k = d_kv * decay.state_scale, d_k * decay.state_scale
            normalizer_term = jnp.sum(key_features * d_state.k, axis=1, keepdims=True)
            key_term = normalizer_term if key_term is None else key_term + normalizer_term
        dv = dv + matmul(key_features, d_state.kv, operand_dtype)
        dk = dk + expand_transpose(k, d_key_features, factor, operand_dtype)
        d_kv = d_kv + matmul(query_features, d_numerator, operand_dtype, transpose_lhs=True)
        if d_denominator is not None:
            d_k = d_k + jnp.sum(query_features * d_denominator, axis=0, keepdims=True)
        new_states.append(SegmentState(d_kv, d_k))
    if decay is not None:
        key_term = key_term + jnp.sum(v.astype(jnp.float32) * dv, axis=1, keepdims=True)
    return dk, dv, new_states, key_term
