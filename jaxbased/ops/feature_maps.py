"""Feature maps for linear attention: phi such that K(q, k) = phi(q) . phi(k).

Every map takes ``x [..., feature_dim]`` and returns ``[..., expanded_dim]`` in the input dtype
(computed in float32 or wider).

- ``taylor``: the second-order Taylor expansion of exp used by BASED (docs/mixers/based.md),
  ``phi(x) = [1, x / F**0.25, vec(x ⊗ x) / (sqrt(2) * sqrt(F))]``, so that
  ``phi(q) . phi(k) = 1 + s + s**2 / 2`` with ``s = q . k / sqrt(F)``; ``1 + F + F**2`` features.
- ``taylor_symmetric``: the same kernel from the upper triangle of ``x ⊗ x`` only
  (diagonal scaled ``1 / (sqrt(2) sqrt(F))``, off-diagonal pairs ``1 / sqrt(F)``);
  ``1 + F + F (F + 1) / 2`` features, about 45% less second-order state at F = 16.
- ``elu``: ``elu(x) + 1``; ``relu``: ``max(x, 0)``; ``identity``: ``x``.

The names, sizes and Taylor expansion order are shared with the Pallas kernels through
:mod:`pallas_kernels.feature_map_layout` and re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType

import jax.numpy as jnp
from jax import nn as jnn
from jaxtyping import Array, Float

from jaxbased.ops._common import compute_dtype
from pallas_kernels.feature_map_layout import (
    FEATURE_MAP_NAMES,
    TAYLOR_FEATURE_MAPS,
    check_feature_map,
    expanded_dim,
    feature_dim_of,
    symmetric_pairs,
    taylor_kernel_from_scores,
)

__all__ = [
    "FEATURE_MAPS",
    "FEATURE_MAP_NAMES",
    "TAYLOR_FEATURE_MAPS",
    "check_feature_map",
    "elu",
    "expanded_dim",
    "feature_dim_of",
    "get_feature_map",
    "identity",
    "relu",
    "taylor",
    "taylor_kernel_from_dots",
    "taylor_symmetric",
]


def taylor(x: Float[Array, "... F"]) -> Float[Array, "... D"]:
    """Exact second-order Taylor features, ``D = 1 + F + F**2``."""
    feature_dim = x.shape[-1]
    xf = x.astype(compute_dtype(x))
    outer = (xf[..., :, None] * xf[..., None, :]).reshape(*x.shape[:-1], feature_dim * feature_dim)
    features = jnp.concatenate(
        [
            jnp.ones_like(xf[..., :1]),
            xf / feature_dim**0.25,
            outer / (math.sqrt(2.0) * math.sqrt(feature_dim)),
        ],
        axis=-1,
    )
    return features.astype(x.dtype)


def taylor_symmetric(x: Float[Array, "... F"]) -> Float[Array, "... D"]:
    """Taylor features from the upper triangle of ``x ⊗ x``, ``D = 1 + F + F (F + 1) / 2``."""
    feature_dim = x.shape[-1]
    rows, cols, scale = symmetric_pairs(feature_dim)
    xf = x.astype(compute_dtype(x))
    second = xf[..., rows] * xf[..., cols] * jnp.asarray(scale, xf.dtype)
    features = jnp.concatenate(
        [jnp.ones_like(xf[..., :1]), xf / feature_dim**0.25, second], axis=-1
    )
    return features.astype(x.dtype)


def elu(x: Float[Array, "... F"]) -> Float[Array, "... F"]:
    """``elu(x) + 1`` (positive features)."""
    return (jnn.elu(x.astype(compute_dtype(x))) + 1.0).astype(x.dtype)


def relu(x: Float[Array, "... F"]) -> Float[Array, "... F"]:
    """``max(x, 0)``."""
    return jnn.relu(x)


def identity(x: Float[Array, "... F"]) -> Float[Array, "... F"]:
    """``x`` unchanged."""
    return x


FEATURE_MAPS: MappingProxyType[str, Callable[[Array], Array]] = MappingProxyType(
    {
        "taylor": taylor,
        "taylor_symmetric": taylor_symmetric,
        "elu": elu,
        "relu": relu,
        "identity": identity,
    }
)


def get_feature_map(name: str) -> Callable[[Array], Array]:
    """The feature map function registered under ``name``."""
    check_feature_map(name)
    return FEATURE_MAPS[name]


def taylor_kernel_from_dots(dots: Array, feature_dim: int) -> Array:
    """``1 + s + s**2 / 2`` with ``s = dots / sqrt(F)``: the Taylor kernel from raw ``q . k``."""
    return taylor_kernel_from_scores(dots / math.sqrt(feature_dim))
