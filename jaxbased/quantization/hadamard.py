"""Hadamard matrices (docs/quantization.md#hadamard-rotation).

A Hadamard matrix ``H [n, n]`` has entries ``±1`` and ``H Hᵀ = n I``, so ``H / sqrt(n)`` is
orthogonal: rotating an activation by it and folding the inverse rotation into the next
weight leaves a float model unchanged while spreading outliers over all channels.

Widths covered: ``2^k``, ``12 · 2^k`` and ``20 · 2^k`` (so also ``40 · 2^k = 20 · 2^(k+1)``),
``k >= 0``:

- ``2^k``: Sylvester doubling from ``[1]``, ``H_2m = [[H_m, H_m], [H_m, -H_m]]``;
- ``12`` and ``20``: Paley's first construction from the primes ``11`` and ``19`` (both
  ``3 mod 4``), then Sylvester doubling (a Kronecker product with ``H_{2^k}``);
- ``40``: Sylvester doubling of the Paley matrix of order 20.

Any other width raises ``ValueError``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

#: Orders of the Paley matrices (prime ``p ≡ 3 mod 4`` gives order ``p + 1``) the widths start
#: from, besides 1.
PALEY_ORDERS: tuple[int, ...] = (12, 20)


def _power_of_two_exponent(value: int) -> int | None:
    """``k`` with ``value == 2^k``, or None."""
    if value < 1 or value & (value - 1):
        return None
    return value.bit_length() - 1


def hadamard_factorization(width: int) -> tuple[int, int] | None:
    """``(base, k)`` with ``width == base · 2^k`` and ``base`` in ``(1, 12, 20)``, or None when
    no Hadamard matrix of this library has that width."""
    if not isinstance(width, int | np.integer) or isinstance(width, bool) or width < 1:
        return None
    for base in (1, *PALEY_ORDERS):
        if width % base == 0:
            exponent = _power_of_two_exponent(width // base)
            if exponent is not None:
                return base, exponent
    return None


def supports_hadamard(width: int) -> bool:
    """Whether :func:`hadamard_matrix` has a matrix of ``width``."""
    return hadamard_factorization(width) is not None


def _quadratic_character(prime: int) -> np.ndarray:
    """``chi[a]`` for ``a`` in ``0..prime-1``: 0 at 0, 1 at quadratic residues, -1 otherwise."""
    chi = -np.ones(prime, np.int64)
    chi[0] = 0
    chi[[(a * a) % prime for a in range(1, prime)]] = 1
    return chi


def paley_matrix(order: int) -> np.ndarray:
    """Paley's first construction of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``.

    With the Jacobsthal matrix ``Q[i, j] = chi(j - i)`` (``chi`` the quadratic character mod
    ``q``, skew-symmetric because -1 is a non-residue) and ``S = [[0, 1ᵀ], [-1, Q]]``,
    ``H = I + S`` is a Hadamard matrix. Returns int64 ``[order, order]``.
    """
    prime = order - 1
    if prime < 3 or prime % 4 != 3 or any(prime % d == 0 for d in range(2, int(prime**0.5) + 1)):
        raise ValueError(f"Paley order {order} needs order - 1 a prime = 3 mod 4")
    chi = _quadratic_character(prime)
    index = np.arange(prime)
    jacobsthal = chi[(index[None, :] - index[:, None]) % prime]
    skew = np.zeros((order, order), np.int64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return np.eye(order, dtype=np.int64) + skew


@functools.lru_cache(maxsize=32)
def _cached_hadamard(width: int) -> np.ndarray:
    factorization = hadamard_factorization(width)
    if factorization is None:
        raise ValueError(
            f"no Hadamard matrix of width {width!r}: widths must be 2^k, 12·2^k, 20·2^k or "
            "40·2^k (k >= 0), e.g. 64, 96, 160, 320"
        )
    base, exponent = factorization
    matrix = np.ones((1, 1), np.int64) if base == 1 else paley_matrix(base)
    sylvester = np.ones((1, 1), np.int64)
    doubling = np.array([[1, 1], [1, -1]], np.int64)
    for _ in range(exponent):
        sylvester = np.kron(doubling, sylvester)
    result = np.kron(sylvester, matrix).astype(np.int8)
    result.setflags(write=False)
    return result


def hadamard_matrix(width: int) -> np.ndarray:
    """The Hadamard matrix ``H [width, width]`` (int8 entries ±1, ``H Hᵀ = width · I``).

    ``H = H_{2^k} ⊗ P`` with ``P`` the Paley matrix of order 12 or 20 (or ``[1]``) and
    ``H_{2^k}`` Sylvester's. A read-only array, cached per width. Raises ``ValueError`` for a
    width that is not ``2^k``, ``12·2^k``, ``20·2^k`` or ``40·2^k``.
    """
    if isinstance(width, np.integer):
        width = int(width)
    return _cached_hadamard(width)


def normalized_hadamard(width: int, dtype=jnp.float32) -> Float[Array, "N N"]:
    """``H / sqrt(width)``, an orthogonal (and, for Sylvester widths, symmetric) matrix, in
    ``dtype``."""
    return jnp.asarray(hadamard_matrix(width), dtype) / jnp.sqrt(jnp.asarray(width, dtype))


def rotate(x: Float[Array, "... N"]) -> Float[Array, "... N"]:
    """``x · H / sqrt(N)`` over the last axis (accumulated in float32 or wider)."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(dtype) @ normalized_hadamard(x.shape[-1], dtype)).astype(x.dtype)
