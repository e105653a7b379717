"""One kernel call of chunked linear attention, shared by the TPU and GPU kernels.

Its static parameters (:class:`ChunkedCall`), the state's conversion to and from the kernels'
padded row layout, the order of the kernels' inputs, the residuals the backward kernels read,
and the decay's XLA parts around the kernels (chunk-local cumulative log decays and the
``log_decay`` cotangent).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import pad_axis
from pallas_kernels.linear_attention._features import (
    ChunkFeatures,
    ElementwiseSegment,
    Factors,
    TaylorSegment,
)
from pallas_kernels.linear_attention._layout import FeatureLayout


@dataclasses.dataclass(frozen=True)
class ChunkedCall:
    """Compile-time parameters of one kernel call, common to both backends.

    Attributes:
      layout: the feature layout (state rows).
      seq_len: ``T``; chunk_size: ``C``; num_chunks: ``ceil(T / C)``.
      value_dim: ``Dv``; padded_value_dim: ``Dv`` padded as the backend wants it.
      eps, operand_dtype, normalize, interpret: from the op's config.
      has_initial_state, has_decay: which optional inputs this call has.
      heads_per_group: ``H / G``: head ``h`` reads the queries and keys of group
        ``h // (H / G)`` (1: one group per head).
    """

    layout: FeatureLayout
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
    heads_per_group: int

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
        heads_per_group: int,
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
            heads_per_group=heads_per_group,
            **extra,
        )

    def group_of(self, head):
        """The query/key group that head ``head`` (a grid index) reads. Truncating division
        (``lax.div``; grid indices are >= 0): Python's ``//`` lowers to a floor with a sign
        correction, which Mosaic's lowering of ``sign`` cannot do without a TPU attached."""
        if self.heads_per_group == 1:
            return head
        return lax.div(head, jnp.asarray(self.heads_per_group, head.dtype))

    def sum_over_groups(self, x: jax.Array, axis: int) -> jax.Array:
        """Per-head ``dq``/``dk`` ``[..., H, ...]`` -> per group ``[..., G, ...]``: the heads of a
        group share its queries and keys, so their cotangents add up."""
        if self.heads_per_group == 1:
            return x
        shape = list(x.shape)
        shape[axis : axis + 1] = [shape[axis] // self.heads_per_group, self.heads_per_group]
        return x.reshape(shape).sum(axis + 1)

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

    @property
    def factor_count(self) -> int:
        """Weight inputs of the feature map: 5 for the Taylor expansion, none elementwise."""
        return 5 if self.layout.is_taylor else 0

    def factor_arrays(self) -> list[jax.Array]:
        """The Taylor map's ``left, right, left_bias, right_bias, scale`` (kernel inputs), or
        nothing for an elementwise map."""
        return [jnp.asarray(a) for a in self.layout.factors()]

    def factor_specs(self) -> list[pl.BlockSpec]:
        """Whole-array blocks of :meth:`factor_arrays`, the same for every grid point."""
        if not self.factor_count:
            return []
        feature_dim, rows = self.layout.padded_feature_dim, self.rows
        shapes = [(feature_dim, rows)] * 2 + [(1, rows)] * 3
        return [pl.BlockSpec(shape, lambda *grid: (0, 0)) for shape in shapes]

    def features(self, segment_factors: list[Factors]) -> ChunkFeatures:
        """In a kernel: the call's :class:`ChunkFeatures` from each segment's loaded Taylor
        weights (an empty list for an elementwise map)."""
        layout = self.layout
        if layout.is_taylor:
            segments = tuple(TaylorSegment(f, self.operand_dtype) for f in segment_factors)
        else:
            segments = (ElementwiseSegment(layout.feature_map, layout.feature_dim),)
        return ChunkFeatures(segments, layout.feature_dim, self.operand_dtype)

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
    factor_refs, refs = refs[: call.factor_count], refs[call.factor_count :]
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
