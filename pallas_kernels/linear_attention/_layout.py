"""State and feature layout of the kernels' feature maps: feature order, padded state rows.

Two kinds of map (:data:`pallas_kernels.feature_map_layout.ELEMENTWISE_FEATURE_MAPS` and the
Taylor maps):

- ``elu``, ``relu``, ``identity``: one feature per input, ``D' = F``; the state has ``F`` rows
  padded like the queries' lanes (TPU: a multiple of 8; GPU: a power of two >= 16). The kernels
  apply the map elementwise on chip (no weights).
- the Taylor maps, below.

The kernels compute with the symmetric (upper-triangle) form of the second-order features,
``D' = 1 + F + F (F + 1) / 2`` (153 rows for F = 16 instead of 273): index 0 is the constant 1,
indices ``1 .. F`` the linear features ``x_i / F**0.25``, then ``x_i x_j`` for ``i <= j`` in
the order and with the scales of :func:`pallas_kernels.feature_map_layout.symmetric_pairs`,
exactly the ``taylor_symmetric`` map. It gives the same ``phi(q) . phi(k) = 1 + s + s**2 / 2``
(``s = q . k / sqrt(F)``) as the full ``taylor`` map with half the state; :mod:`._symmetric`
converts ``taylor`` states at the call boundary.

Fusion: inside a kernel every feature is a product of two affine maps of ``x`` (a one-hot matmul
and a bias) and a scale,

    phi(x) = scale * (x @ left + left_bias) * (x @ right + right_bias)        [C, rows]

(constant: ``1 * 1``; linear ``i``: ``x_i * 1``; pair ``(i, j)``: ``x_i * x_j``);
:meth:`FeatureLayout.factors` builds those weights, :func:`._chunk.expand` applies them.

State rows are grouped in *segments* (each a run of consecutive features padded to a size the
hardware likes): one segment of ``round_up(D', 128)`` rows on TPU; on GPU (Triton) a few segments
whose sizes are powers of two (e.g. 153 = 128 + 32 rows for F = 16) so that no matmul side is
padded to the next power of two of ``D'``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._common import next_power_of_two, round_up
from pallas_kernels.feature_map_layout import (
    ELEMENTWISE_FEATURE_MAPS,
    TAYLOR_FEATURE_MAPS,
    expanded_dim,
    symmetric_pairs,
)


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
class FeatureLayout:
    """Sizes of a kernel feature map for one feature dim and backend.

    Attributes:
      feature_map: the map the kernels compute: ``taylor_symmetric`` (for both Taylor maps),
        ``elu``, ``relu`` or ``identity``.
      feature_dim: ``F``, the raw query/key dim.
      padded_feature_dim: ``F`` padded for the hardware (the queries' and keys' lanes).
      segments: the state row groups (see the module docstring).
    """

    feature_map: str
    feature_dim: int
    padded_feature_dim: int
    segments: tuple[Segment, ...]

    @property
    def is_taylor(self) -> bool:
        return self.feature_map == "taylor_symmetric"

    @property
    def expanded_dim(self) -> int:
        """``D'``: ``1 + F + F (F + 1) / 2`` (Taylor) or ``F``."""
        return expanded_dim(self.feature_map, self.feature_dim)

    @property
    def rows(self) -> int:
        """Padded state rows, the sum of the segments' rows."""
        return sum(segment.rows for segment in self.segments)

    def factors(self) -> tuple[np.ndarray, ...]:
        """Taylor: ``left, right [Fp, rows]`` and ``left_bias, right_bias, scale [1, rows]``,
        float32; elementwise maps need no weights (empty)."""
        if not self.is_taylor:
            return ()
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
        rows, cols, scale = symmetric_pairs(feature_dim)
        terms += [
            (int(i), int(j), float(factor)) for i, j, factor in zip(rows, cols, scale, strict=True)
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


def kernel_feature_map(feature_map: str) -> str:
    """The map the kernels compute for ``feature_map``: both Taylor maps run the symmetric
    expansion; the elementwise maps run as they are."""
    if feature_map in TAYLOR_FEATURE_MAPS:
        return "taylor_symmetric"
    if feature_map in ELEMENTWISE_FEATURE_MAPS:
        return feature_map
    allowed = ", ".join((*TAYLOR_FEATURE_MAPS, *ELEMENTWISE_FEATURE_MAPS))
    raise ValueError(f"feature_map={feature_map!r} has no kernel; allowed: {allowed}")


def make_layout(feature_map: str, feature_dim: int, backend: str) -> FeatureLayout:
    """The :class:`FeatureLayout` of ``feature_map`` at ``feature_dim`` for ``backend``
    (``tpu``/``gpu``); the Taylor maps get the symmetric expansion."""
    feature_map = kernel_feature_map(feature_map)
    if feature_map != "taylor_symmetric":
        if backend == "tpu":
            padded = round_up(feature_dim, 8)
        else:
            padded = next_power_of_two(feature_dim, 16)
        segment = Segment(0, feature_dim, 0, padded)
        return FeatureLayout(feature_map, feature_dim, padded, (segment,))
    total = expanded_dim("taylor_symmetric", feature_dim)
    if backend == "tpu":
        segments = (Segment(0, total, 0, round_up(total, 128)),)
        return FeatureLayout(feature_map, feature_dim, feature_dim, segments)
    segments = []
    start = offset = 0
    for size in _power_of_two_segments(total):
        count = min(size, total - start)
        segments.append(Segment(start, count, offset, size))
        start, offset = start + count, offset + size
    return FeatureLayout(
        feature_map, feature_dim, next_power_of_two(feature_dim, 16), tuple(segments)
    )
