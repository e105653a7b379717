"""Symmetric per-tensor int8 quantization and the two ways to multiply quantized tensors
(docs/quantization.md#int8-arithmetic).

    q = clip(round(x / s), -127, 127)  (int8),      x ≈ q · s        (s: float32 scalar)

Real int8: ``lax.dot_general(q_x, q_w, preferred_element_type=int32)`` sums the integer products
exactly, and the epilogue rescales once, ``y = float32(acc) · (s_x · s_w)``. Fake quant: the
same codes dequantized to float32 and multiplied in float32, ``y = (q_x s_x) · (q_w s_w)``. Both
compute ``s_x s_w Σ q_x q_w``; they differ only by float32 rounding of the sum (the int32 sum is
exact, the float one carries a relative error of order ``eps · in_features``).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

from jaxbased.quantization.observers import INT8_MAX

#: How a quantized layer multiplies: ``int8`` (integer matmuls), ``fake`` (quantize-dequantize,
#: float matmuls; the check of ``int8``), ``float`` (no quantization at all).
Arithmetic = Literal["int8", "fake", "float"]
ARITHMETICS: tuple[str, ...] = ("int8", "fake", "float")


def quantize(x: Float[Array, "*shape"], scale: Float[Array, ""]) -> Int8[Array, "*shape"]:
    """``clip(round(x / scale), -127, 127)`` as int8 (round half to even)."""
    scaled = jnp.asarray(x, jnp.float32) / jnp.asarray(scale, jnp.float32)
    return jnp.clip(jnp.round(scaled), -INT8_MAX, INT8_MAX).astype(jnp.int8)


def dequantize(q: Int8[Array, "*shape"], scale: Float[Array, ""]) -> Float[Array, "*shape"]:
    """``q · scale`` in float32."""
    return q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)


def fake_quantize(x: Float[Array, "*shape"], scale: Float[Array, ""]) -> Float[Array, "*shape"]:
    """``dequantize(quantize(x, scale), scale)``: ``x`` rounded to the int8 grid (float32)."""
    return dequantize(quantize(x, scale), scale)


def quantized_matmul(
    x_codes: Int8[Array, "... K"],
    x_scale: Float[Array, ""],
    w_codes: Int8[Array, "K N"],
    w_scale: Float[Array, ""],
    arithmetic: Arithmetic,
) -> Float[Array, "... N"]:
    """``(q_x s_x) · (q_w s_w)`` contracting the last axis of ``x`` with the first of ``w``
    (float32 result).

    ``arithmetic="int8"``: int8 × int8 → int32 ``dot_general``, then ``· s_x s_w``;
    ``"fake"``: both dequantized to float32, float32 matmul.
    """
    if arithmetic == "int8":
        accumulated = jax.lax.dot_general(
            x_codes,
            w_codes,
            (((x_codes.ndim - 1,), (0,)), ((), ())),
            preferred_element_type=jnp.int32,
        )
        return accumulated.astype(jnp.float32) * (
            jnp.asarray(x_scale, jnp.float32) * jnp.asarray(w_scale, jnp.float32)
        )
    if arithmetic == "fake":
        return jnp.matmul(
            dequantize(x_codes, x_scale),
            dequantize(w_codes, w_scale),
            precision=jax.lax.Precision.HIGHEST,
        )
    raise ValueError(f"arithmetic={arithmetic!r} has no quantized matmul; allowed: int8, fake")
