"""Full (``taylor``) and symmetric (``taylor_symmetric``) Taylor state layouts, converted exactly.

The full map has a second-order feature ``x_i x_j / (sqrt(2) sqrt(F))`` for every ordered pair
(row-major, index ``1 + F + i F + j``); the symmetric one keeps ``i <= j`` (``numpy.triu_indices``
order, :func:`pallas_kernels.feature_map_layout.symmetric_pairs`), scaled
``1 / (sqrt(2) sqrt(F))`` on the diagonal and ``1 / sqrt(F)`` off it. The kernels
compute in the symmetric layout (half the state, same outputs); these maps carry a ``taylor``
state across that boundary without changing what any query reads:

- into the kernel: ``S_sym[(i, j)] = (S[i, j] + S[j, i]) / sqrt(2)`` for ``i < j``, ``S[i, i]`` on
  the diagonal; a query reads ``phi(q) . S`` identically from both, for *any* ``S``;
- out of it: ``S[i, j] = S[j, i] = S_sym[(i, j)] / sqrt(2)`` for ``i < j``, which is exactly the
  full state that ``sum_t phi(k_t) v_t^T`` builds, since ``phi(k)`` is symmetric in ``(i, j)``;
- a given initial state may not be symmetric: its antisymmetric part ``(S[i, j] - S[j, i]) / 2``
  is invisible to every query, so it passes through, decayed by ``prod_t a_t``, and is added
  back to the final state (:func:`antisymmetric_part`).

All three are linear maps on ``[..., D', X]`` arrays (``axis`` the feature axis), so JAX
differentiates through them outside the kernels' ``custom_vjp``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.feature_map_layout import symmetric_pairs


@functools.cache
def _pair_indices(feature_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(upper, lower, symmetric_of_full, full_scale)``: for each symmetric pair ``(i <= j)``
    the full indices of ``(i, j)`` and ``(j, i)``; for each full index the symmetric index it
    reads and the factor (1 on the constant, linear and diagonal features, ``1/sqrt(2)`` off)."""
    head = 1 + feature_dim
    rows, cols, _ = symmetric_pairs(feature_dim)
    upper = head + rows * feature_dim + cols
    lower = head + cols * feature_dim + rows
    pair_of = np.zeros((feature_dim, feature_dim), np.int64)
    pair_of[rows, cols] = np.arange(rows.size)
    pair_of[cols, rows] = np.arange(rows.size)
    symmetric_of_full = np.concatenate([np.arange(head), head + pair_of.reshape(-1)])
    off_diagonal = ~np.eye(feature_dim, dtype=bool).reshape(-1)
    full_scale = np.concatenate(
        [np.ones(head), np.where(off_diagonal, 1.0 / math.sqrt(2.0), 1.0)]
    ).astype(np.float32)
    return upper, lower, symmetric_of_full, full_scale


def _check(x: jax.Array, axis: int, size: int, name: str) -> None:
    if x.shape[axis] != size:
        raise ValueError(f"{name} has {x.shape[axis]} features on axis {axis}; expected {size}")


def symmetric_from_full(x: jax.Array, feature_dim: int, axis: int) -> jax.Array:
    """``[..., 1 + F + F**2, ...] -> [..., 1 + F + F (F + 1) / 2, ...]`` (a state going in)."""
    _check(x, axis, 1 + feature_dim + feature_dim**2, "full state")
    upper, lower, _, _ = _pair_indices(feature_dim)
    head = jax.lax.slice_in_dim(x, 0, 1 + feature_dim, axis=axis)
    pair_sum = jnp.take(x, upper, axis=axis) + jnp.take(x, lower, axis=axis)
    diagonal = upper == lower
    weight = np.where(diagonal, 0.5, 1.0 / math.sqrt(2.0)).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = weight.size
    return jnp.concatenate([head, pair_sum * weight.reshape(shape)], axis=axis)


def full_from_symmetric(x: jax.Array, feature_dim: int, axis: int) -> jax.Array:
    """``[..., 1 + F + F (F + 1) / 2, ...] -> [..., 1 + F + F**2, ...]`` (a kernel state out)."""
    _check(x, axis, 1 + feature_dim + feature_dim * (feature_dim + 1) // 2, "symmetric state")
    _, _, symmetric_of_full, full_scale = _pair_indices(feature_dim)
    shape = [1] * x.ndim
    shape[axis] = full_scale.size
    return jnp.take(x, symmetric_of_full, axis=axis) * full_scale.reshape(shape)


def antisymmetric_part(x: jax.Array, feature_dim: int, axis: int) -> jax.Array:
    """``(S - S^T) / 2`` over the second-order pairs of a full state (zero elsewhere): the part
    no query reads, ``x - full_from_symmetric(symmetric_from_full(x))``."""
    _check(x, axis, 1 + feature_dim + feature_dim**2, "full state")
    head = 1 + feature_dim
    second = jax.lax.slice_in_dim(x, head, head + feature_dim**2, axis=axis)
    transposed = jnp.arange(feature_dim**2).reshape(feature_dim, feature_dim).T.reshape(-1)
    antisymmetric = (second - jnp.take(second, transposed, axis=axis)) / 2
    return jnp.concatenate(
        [jnp.zeros_like(jax.lax.slice_in_dim(x, 0, head, axis=axis)), antisymmetric], axis=axis
    )
