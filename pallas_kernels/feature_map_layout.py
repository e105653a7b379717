"""Facts about the linear-attention feature maps that the XLA ops and the kernels share.

One copy of the names, the expanded sizes and the Taylor expansion order, for
``jaxbased.ops.feature_maps`` (which re-exports them) and ``pallas_kernels.linear_attention``.
It lives on the kernels' side because the kernels never import ``jaxbased``. NumPy only: no
JAX, no Pallas, so importing it is cheap.

Layouts of ``phi(x)`` for ``x [..., F]`` (``D`` features):

- ``taylor``: ``D = 1 + F + F**2``: index 0 is the constant 1, indices ``1 .. F`` the linear
  features ``x_i / F**0.25``, then ``x_i x_j / (sqrt(2) sqrt(F))`` for every ordered pair,
  row-major (index ``1 + F + i F + j``).
- ``taylor_symmetric``: ``D = 1 + F + F (F + 1) / 2``: the constant and the linear features,
  then ``x_i x_j`` for ``i <= j`` in ``numpy.triu_indices`` order (:func:`symmetric_pairs`),
  scaled ``1 / (sqrt(2) sqrt(F))`` on the diagonal and ``1 / sqrt(F)`` off it.
- ``elu``, ``relu``, ``identity``: ``D = F``, one feature per input.

Both Taylor maps give ``phi(q) . phi(k) = 1 + s + s**2 / 2`` with ``s = q . k / sqrt(F)``
(:func:`taylor_kernel_from_scores`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

FEATURE_MAP_NAMES: tuple[str, ...] = ("taylor", "taylor_symmetric", "elu", "relu", "identity")
#: The maps whose kernel is ``1 + s + s**2 / 2`` of the raw dots (the fused kernels' maps).
TAYLOR_FEATURE_MAPS: tuple[str, ...] = ("taylor", "taylor_symmetric")
#: The maps with one feature per input, ``phi(x)_i = f(x_i)``.
ELEMENTWISE_FEATURE_MAPS: tuple[str, ...] = ("elu", "relu", "identity")


def check_feature_map(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one of :data:`FEATURE_MAP_NAMES`."""
    if name not in FEATURE_MAP_NAMES:
        raise ValueError(
            f"feature_map={name!r} is not known; allowed: {', '.join(FEATURE_MAP_NAMES)}"
        )


def expanded_dim(name: str, feature_dim: int) -> int:
    """Number of features ``D`` that map ``name`` produces from ``feature_dim`` inputs ``F``.

    ``1 + F + F**2`` (``taylor``), ``1 + F + F (F + 1) / 2`` (``taylor_symmetric``), else ``F``.
    Raises ``ValueError`` for an unknown map or ``F < 1``.
    """
    check_feature_map(name)
    if feature_dim < 1:
        raise ValueError(f"feature_dim={feature_dim} must be >= 1")
    if name == "taylor":
        return 1 + feature_dim + feature_dim * feature_dim
    if name == "taylor_symmetric":
        return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2
    return feature_dim


def feature_dim_of(name: str, expanded: int) -> int:
    """The input size ``F`` for which map ``name`` produces ``expanded`` features (the inverse
    of :func:`expanded_dim`); ``ValueError`` if no ``F >= 1`` gives exactly ``expanded``."""
    check_feature_map(name)
    if name == "taylor":  # F**2 + F + 1 - D = 0
        guess = math.isqrt(max(4 * expanded - 3, 0))
        guess = (guess - 1) // 2
    elif name == "taylor_symmetric":  # F**2 + 3 F + 2 - 2 D = 0
        guess = math.isqrt(max(8 * expanded + 1, 0))
        guess = (guess - 3) // 2
    else:
        guess = expanded
    if guess < 1 or expanded_dim(name, guess) != expanded:
        raise ValueError(f"no feature_dim gives {expanded} features with feature_map={name!r}")
    return guess


@functools.cache
def symmetric_pairs(feature_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The second-order features of ``taylor_symmetric`` in their order: ``(rows, cols, scale)``.

    ``rows, cols [P]`` int (``P = F (F + 1) / 2``, ``numpy.triu_indices(F)``, so ``rows <=
    cols``) and ``scale [P]`` float64, ``1 / (sqrt(2) sqrt(F))`` where ``rows == cols`` and
    ``1 / sqrt(F)`` elsewhere: feature ``p`` is ``scale[p] * x[rows[p]] * x[cols[p]]``. The
    arrays are cached and read-only.
    """
    rows, cols = np.triu_indices(feature_dim)
    scale = np.where(rows == cols, 1.0 / math.sqrt(2.0), 1.0) / math.sqrt(feature_dim)
    for array in (rows, cols, scale):
        array.setflags(write=False)
    return rows, cols, scale


def taylor_kernel_from_scores(scores):
    """``1 + s + s**2 / 2``: the Taylor kernel from scaled dots ``s = q . k / sqrt(F)`` (any
    array type; same shape and dtype as ``scores``)."""
    return 1.0 + scores + 0.5 * scores * scores
