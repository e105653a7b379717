"""Helpers shared by the ops: the compute dtype and the argument checks they all make.

Nothing here depends on a particular op; every function is small and pure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


def compute_dtype(*arrays: Array) -> jnp.dtype:
    """The dtype the ops compute in: float32, or wider when an input is (float64 under x64).

    ``jnp.result_type(float32, *dtypes)``: bfloat16, float16 and integer inputs compute in
    float32; float64 inputs in float64 when x64 is enabled (else float32).
    """
    return jnp.result_type(jnp.float32, *[a.dtype for a in arrays])


def check_algorithm(algorithm: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``algorithm`` is one of ``allowed``."""
    if algorithm not in allowed:
        raise ValueError(f"algorithm={algorithm!r} is not known; allowed: {', '.join(allowed)}")


def check_chunk_size(chunk_size: int) -> None:
    """Raise ``ValueError`` unless ``chunk_size`` is a positive ``int``."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")


def check_shape(name: str, array: Array, layout: str, expected: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``array.shape == expected``; ``layout`` names the axes
    (e.g. ``"[B, D, N]"``) in the message."""
    if array.shape != expected:
        raise ValueError(f"{name} has shape {array.shape}; expected {layout} = {expected}")


def initial_state_or_zeros(
    initial_state: Array | None, layout: str, expected: tuple[int, ...], dtype: jnp.dtype
) -> Array:
    """``initial_state`` checked to have shape ``expected`` and cast to ``dtype``, or zeros of
    that shape and dtype when it is None (nothing seen yet)."""
    if initial_state is None:
        return jnp.zeros(expected, dtype)
    check_shape("initial_state", initial_state, layout, expected)
    return jnp.asarray(initial_state, dtype)


def check_not_positive(name: str, values: Array) -> None:
    """Raise ``ValueError`` naming ``name`` if any of ``values`` is > 0 (or NaN).

    Only concrete values are checked; inside ``jit`` the values are not known and nothing is
    checked.
    """
    if isinstance(values, jax.core.Tracer):
        return
    largest = float(np.max(np.asarray(values))) if np.size(values) else 0.0
    if not largest <= 0:
        raise ValueError(f"{name} must be <= 0 everywhere; its largest value is {largest}")


def check_not_negative(name: str, values: Array) -> None:
    """Raise ``ValueError`` naming ``name`` if any of ``values`` is < 0 (or NaN); concrete
    values only, like :func:`check_not_positive`."""
    if isinstance(values, jax.core.Tracer):
        return
    smallest = float(np.min(np.asarray(values))) if np.size(values) else 0.0
    if not smallest >= 0:
        raise ValueError(f"{name} must be >= 0 everywhere; its smallest value is {smallest}")
