"""The kernels' feature maps on loaded tiles: ``phi(x)``, its pull-back, the intra-chunk kernel.

Everything here runs inside a kernel on ``jnp`` values of one chunk of ``C`` tokens (float32
arithmetic; matmul operands in the call's operand dtype):

- :class:`TaylorSegment`: one segment of the fused symmetric Taylor expansion,
  ``phi(x) = scale * (x @ left + left_bias) * (x @ right + right_bias)`` with the weights of
  :meth:`._layout.FeatureLayout.factors`, and its transpose;
- :class:`ElementwiseSegment`: ``phi(x)_i = f(x_i)`` for ``elu`` (``elu(x) + 1``), ``relu``
  and ``identity``, and ``f'(x) * cotangent``; padded input lanes give zero features (``elu``
  maps 0 to 1, so it masks them);
- :class:`ChunkFeatures`: a call's segments plus the causal intra-chunk kernel
  ``A_ij = phi(q_i) . phi(k_j)`` (``j <= i``) and its pull-backs to ``q`` and ``k``. The Taylor
  maps compute ``A = 1 + s + s**2 / 2`` from the raw ``F``-dim dots ``s = q k^T / sqrt(F)``
  (no expansion needed); the elementwise maps from ``phi(q) phi(k)^T``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import matmul
from pallas_kernels.feature_map_layout import taylor_kernel_from_scores


class Factors(NamedTuple):
    """One Taylor segment's expansion weights as loaded tiles: ``left, right [Fp, rows]``,
    ``left_bias, right_bias, scale [1, rows]`` (float32)."""

    left: jax.Array
    right: jax.Array
    left_bias: jax.Array
    right_bias: jax.Array
    scale: jax.Array


@dataclasses.dataclass(frozen=True)
class TaylorSegment:
    """One segment of the fused Taylor expansion (``rows`` state rows)."""

    factors: Factors
    operand_dtype: Any

    def _affine(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        factors, dtype = self.factors, self.operand_dtype
        left = matmul(x, factors.left, dtype) + factors.left_bias
        right = matmul(x, factors.right, dtype) + factors.right_bias
        return left, right

    def features(self, x: jax.Array) -> jax.Array:
        """``phi(x)``: ``[C, Fp] -> [C, rows]`` float32."""
        left, right = self._affine(x)
        return self.factors.scale * left * right

    def pullback(self, x: jax.Array, cotangent: jax.Array) -> jax.Array:
        """``d phi(x) [C, rows] -> dx [C, Fp]`` float32: with ``a = x @ left + left_bias``,
        ``b = x @ right + right_bias``, ``dx = (g * scale * b) @ left.T + (g * scale * a) @
        right.T``."""
        left, right = self._affine(x)
        scaled = cotangent * self.factors.scale
        factors, dtype = self.factors, self.operand_dtype
        return matmul(scaled * right, factors.left, dtype, transpose_rhs=True) + matmul(
            scaled * left, factors.right, dtype, transpose_rhs=True
        )


@dataclasses.dataclass(frozen=True)
class ElementwiseSegment:
    """``phi(x)_i = f(x_i)`` on ``[C, Fp]`` tiles whose lanes ``>= feature_dim`` are padding.

    Attributes:
      feature_map: ``elu`` (``elu(x) + 1``), ``relu`` or ``identity``.
      feature_dim: ``F``, the real lanes.
    """

    feature_map: str
    feature_dim: int

    def features(self, x: jax.Array) -> jax.Array:
        """``phi(x)`` ``[C, Fp]`` float32 (zero on padded lanes)."""
        x = x.astype(jnp.float32)
        if self.feature_map == "identity":
            return x
        if self.feature_map == "relu":
            return jnp.maximum(x, 0.0)
        phi = jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))
        if x.shape[1] > self.feature_dim:
            lanes = lax.broadcasted_iota(jnp.int32, x.shape, 1)
            phi = jnp.where(lanes < self.feature_dim, phi, 0.0)
        return phi

    def pullback(self, x: jax.Array, cotangent: jax.Array) -> jax.Array:
        """``f'(x) * cotangent`` ``[C, Fp]`` float32 (``relu'(0) = 0``, ``elu'(0) = 1``)."""
        if self.feature_map == "identity":
            return cotangent
        x = x.astype(jnp.float32)
        if self.feature_map == "relu":
            return jnp.where(x > 0, cotangent, 0.0)
        return jnp.where(x > 0, cotangent, cotangent * jnp.exp(jnp.minimum(x, 0.0)))


Segment = TaylorSegment | ElementwiseSegment


def causal_mask(chunk_size: int) -> jax.Array:
    """``[C, C]`` bool, true where key ``j <=`` query ``i``."""
    rows = lax.broadcasted_iota(jnp.int32, (chunk_size, chunk_size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (chunk_size, chunk_size), 1)
    return cols <= rows


@dataclasses.dataclass(frozen=True)
class ChunkFeatures:
    """The feature map of one kernel call: its state segments and the intra-chunk kernel.

    Attributes:
      segments: one :class:`TaylorSegment` per state segment, or one :class:`ElementwiseSegment`.
      feature_dim: ``F`` (the Taylor scores are ``q . k / sqrt(F)``).
      operand_dtype: matmul operand dtype.
    """

    segments: tuple[Segment, ...]
    feature_dim: int
    operand_dtype: Any

    @property
    def is_taylor(self) -> bool:
        return isinstance(self.segments[0], TaylorSegment)

    def kernel(self, q: jax.Array, k: jax.Array, weights: jax.Array | None):
        """``(residual, A)``: the intra-chunk kernel ``A [C, C]`` float32, zero above the
        diagonal and times ``weights [C, C]`` (the decay) when given, and what the pull-backs
        reuse (Taylor: the scores ``s``; elementwise: ``(phi(q), phi(k))``)."""
        dtype = self.operand_dtype
        if self.is_taylor:
            residual = matmul(q, k, dtype, transpose_rhs=True) * (1.0 / math.sqrt(self.feature_dim))
            kernel = taylor_kernel_from_scores(residual)
        else:
            (segment,) = self.segments
            residual = (segment.features(q), segment.features(k))
            kernel = matmul(*residual, dtype, transpose_rhs=True)
        if weights is not None:
            return residual, kernel * weights
        return residual, jnp.where(causal_mask(q.shape[0]), kernel, 0.0)

    def query_residual(self, q: jax.Array, k: jax.Array):
        """The residual of :meth:`kernel` alone (the ``dq`` pass needs no ``A``)."""
        if self.is_taylor:
            return matmul(q, k, self.operand_dtype, transpose_rhs=True) * (
                1.0 / math.sqrt(self.feature_dim)
            )
        (segment,) = self.segments
        return segment.features(q), segment.features(k)

    def _taylor_score_cotangent(self, residual, d_kernel):
        # d(1 + s + s**2 / 2) = (1 + s) ds, s = q . k / sqrt(F)
        return d_kernel * (1.0 + residual) * (1.0 / math.sqrt(self.feature_dim))

    def query_pullback(self, q, k, residual, d_kernel: jax.Array) -> jax.Array:
        """``dq [C, Fp]`` float32 from ``dA [C, C]`` (already masked and decay-weighted)."""
        if self.is_taylor:
            return matmul(self._taylor_score_cotangent(residual, d_kernel), k, self.operand_dtype)
        (segment,) = self.segments
        _, key_features = residual
        return segment.pullback(q, matmul(d_kernel, key_features, self.operand_dtype))

    def key_pullback(self, q, k, residual, d_kernel: jax.Array) -> jax.Array:
        """``dk [C, Fp]`` float32 from ``dA [C, C]`` (already masked and decay-weighted)."""
        dtype = self.operand_dtype
        if self.is_taylor:
            d_scores = self._taylor_score_cotangent(residual, d_kernel)
            return matmul(d_scores, q, dtype, transpose_lhs=True)
        (segment,) = self.segments
        query_features, _ = residual
        return segment.pullback(k, matmul(d_kernel, query_features, dtype, transpose_lhs=True))
