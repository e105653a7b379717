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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType

import jax.numpy as jnp
import numpy as np
from jax import nn as jnn
from jaxtyping import Array, Float

FEATURE_MAP_NAMES: tuple[str, ...] = ("taylor", "taylor_symmetric", "elu", "relu", "identity")
TAYLOR_FEATURE_MAPS: frozenset[str] = frozenset({"taylor", "taylor_symmetric"})


def _compute_dtype(x: Array) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


def taylor(x: Float[Array, "... F"]) -> Float[Array, "... D"]:
    """Exact second-order Taylor features, ``D = 1 + F + F**2``."""
    feature_dim = x.shape[-1]
    xf = x.astype(_compute_dtype(x))
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


def _upper_triangle(feature_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.triu_indices(feature_dim)
    scale = np.where(rows == cols, 1.0 / math.sqrt(2.0), 1.0) / math.sqrt(feature_dim)
    return rows, cols, scale


def taylor_symmetric(x: Float[Array, "... F"]) -> Float[Array, "... D"]:
    """Taylor features from the upper triangle of ``x ⊗ x``, ``D = 1 + F + F (F + 1) / 2``."""
    feature_dim = x.shape[-1]
    rows, cols, scale = _upper_triangle(feature_dim)
    xf = x.astype(_compute_dtype(x))
    second = xf[..., rows] * xf[..., cols] * jnp.asarray(scale, xf.dtype)
    features = jnp.concatenate(
        [jnp.ones_like(xf[..., :1]), xf / feature_dim**0.25, second], axis=-1
    )
    return features.astype(x.dtype)


def elu(x: Float[Array, "... F"]) -> Float[Array, "... F"]:
    """``elu(x) + 1`` (positive features)."""
    return (jnn.elu(x.astype(_compute_dtype(x))) + 1.0).astype(x.dtype)


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


def check_feature_map(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a known feature map."""
    if name not in FEATURE_MAPS:
        raise ValueError(
            f"feature_map={name!r} is not known; allowed: {', '.join(FEATURE_MAP_NAMES)}"
        )


def get_feature_map(name: str) -> Callable[[Array], Array]:
    """The feature map function registered under ``name``."""
    check_feature_map(name)
    return FEATURE_MAPS[name]


def expanded_dim(name: str, feature_dim: int) -> int:
    """Number of features ``phi`` produces from ``feature_dim`` inputs."""
    check_feature_map(name)
    if feature_dim < 1:
        raise ValueError(f"feature_dim={feature_dim} must be >= 1")
    if name == "taylor":
        return 1 + feature_dim + feature_dim * feature_dim
    if name == "taylor_symmetric":
        return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2
    return feature_dim


def taylor_kernel_from_dots(dots: Array, feature_dim: int) -> Array:
    """``1 + s + s**2 / 2`` with ``s = dots / sqrt(F)``: the Taylor kernel from raw ``q . k``."""
    scaled = dots / math.sqrt(feature_dim)
    return 1.0 + scaled + 0.5 * scaled * scaled
