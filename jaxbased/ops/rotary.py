"""Rotary position embedding, non-interleaved ("NeoX" halves), as in the reference (flash-attn).

For ``rotary_dim`` r (the leading r channels of each head are rotated, the rest pass through),
``n = ceil(r / 2)`` frequencies ``inv_freq_i = base ** (-2 i / r)``; with ``x1 = x[..., :n]`` and
``x2 = x[..., n:2n]`` and angle ``theta = position * inv_freq``:

    x1' = x1 cos(theta) - x2 sin(theta),   x2' = x2 cos(theta) + x1 sin(theta)

An odd r (attn-1b: int(0.5 * 70) = 35) rotates ``2 * ceil(r / 2)`` channels, as the reference does.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rotary_frequencies(rotary_dim: int, base: float = 10000.0) -> Float[Array, " n"]:
    """``base ** (-2 i / rotary_dim)`` for ``i < ceil(rotary_dim / 2)``, float32."""
    if rotary_dim < 1:
        raise ValueError(f"rotary_dim={rotary_dim} must be >= 1")
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (base**exponents)


def apply_rotary(
    x: Float[Array, "B T H D"],
    positions: Int[Array, "B T"] | Int[Array, " T"],
    *,
    rotary_dim: int | None = None,
    base: float = 10000.0,
) -> Float[Array, "B T H D"]:
    """Rotate the leading ``rotary_dim`` channels of every head by its position.

    Args:
      x: ``[B, T, H, D]``.
      positions: absolute token positions, ``[B, T]`` or ``[T]`` (integers).
      rotary_dim: channels rotated per head (default ``D``); ``2 * ceil(rotary_dim / 2) <= D``.
      base: frequency base (10000).

    Returns the rotated array, same shape and dtype (computed in float32).
    """
    head_dim = x.shape[-1]
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    inv_freq = rotary_frequencies(rotary_dim, base)
    half = inv_freq.shape[0]
    if 2 * half > head_dim:
        raise ValueError(
            f"rotary_dim={rotary_dim} rotates {2 * half} channels but the head has {head_dim}"
        )
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None, :]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B|1, T, n]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dtype)
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)
