"""Shared attention probabilities (EchoAtt, docs/echoatt.md): an anchor layer's causal softmax
probabilities, and a sharing layer's output from them.

An anchor layer computes

    P[b, h, i, j] = softmax_j(scale * q_i . k_j)   for j <= i (0 above the diagonal)

explicitly (``[B, H, T, T]``, float32) and outputs ``P V``; a sharing layer has no queries or
keys of its own and outputs ``P V'`` with its own values ``V'``. Decoding, a sharing layer keeps
a :class:`ValueCache` (values only) laid out slot for slot like the anchor's
:class:`~jaxbased.ops.window_attention.KVCache`, and the anchor's probabilities over those slots
for the new token (``[B, H, S]``) give its output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.ops.window_attention import fill_kv_cache


class ValueCache(NamedTuple):
    """A sharing layer's decode cache: values only, head-major, ``values [B, H, S, D]``. Slot
    ``s`` holds the value of the position the anchor layer's cache holds in slot ``s``."""

    values: Float[Array, "B H S D"]


def init_value_cache(
    batch_size: int, capacity: int, num_heads: int, head_dim: int, dtype=jnp.float32
) -> ValueCache:
    """An empty value cache with ``capacity`` slots: ``[B, H, S, D]`` zeros."""
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")
    return ValueCache(values=jnp.zeros((batch_size, num_heads, capacity, head_dim), dtype))


def fill_value_cache(
    values: Float[Array, "B T H D"], capacity: int, lengths: Int[Array, " B"] | None = None
) -> ValueCache:
    """The value cache after a prefill of positions ``0 .. T-1``, in the slots
    :func:`~jaxbased.ops.window_attention.fill_kv_cache` gives the anchor's keys and values
    (same ``capacity`` and ``lengths``)."""
    # The key half of this fill is never read, and XLA drops it.
    return ValueCache(values=fill_kv_cache(values, values, capacity, lengths).values)


def causal_attention_probabilities(
    q: Float[Array, "B T H D"], k: Float[Array, "B T H D"], scale: float | None = None
) -> Float[Array, "B H T T"]:
    """``P[b, h, i, j] = softmax_j(scale * q[b, i, h] . k[b, j, h])`` over ``j <= i``, 0 for
    ``j > i``; float32 (or wider), ``scale`` default ``D ** -0.5``."""
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k must be [batch, seq, heads, dim] alike; got {q.shape}, {k.shape}"
        )
    seq, head_dim = q.shape[1], q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    dtype = jnp.result_type(jnp.float32, q.dtype, k.dtype)
    scores = jnp.einsum("bihd,bjhd->bhij", q.astype(dtype), k.astype(dtype)) * scale
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    return jnp.where(causal, jax.nn.softmax(scores, axis=-1), 0.0)


def apply_attention_probabilities(
    probabilities: Float[Array, "B H T S"], v: Float[Array, "B S H Dv"]
) -> Float[Array, "B T H Dv"]:
    """``y[b, i, h] = sum_j P[b, h, i, j] v[b, j, h]`` (float32 sums), in ``v.dtype``."""
    dtype = jnp.result_type(probabilities.dtype, v.dtype)
    out = jnp.einsum("bhij,bjhd->bihd", probabilities.astype(dtype), v.astype(dtype))
    return out.astype(v.dtype)


def shared_attention_step(
    probabilities: Float[Array, "B H S"],
    v: Float[Array, "B H Dv"],
    cache: ValueCache,
    position: Int[Array, " B"],
) -> tuple[Float[Array, "B H Dv"], ValueCache]:
    """One decoding step of a sharing layer: write ``v`` at slot ``position % S``, then
    ``y[b, h] = sum_s P[b, h, s] values[b, h, s]``.

    ``probabilities [B, H, S]`` are the anchor's for the same token over its cache slots
    (0 on empty and masked slots), from
    :func:`~jaxbased.ops.window_attention.sliding_window_attention_step` with
    ``return_probabilities=True``. Returns ``[B, H, Dv]`` in ``v.dtype`` and the new cache.
    """
    batch, heads, value_dim = v.shape
    capacity = cache.values.shape[2]
    if probabilities.shape != (batch, heads, capacity):
        raise ValueError(
            f"probabilities must be [batch, heads, slots]={(batch, heads, capacity)}; got "
            f"{probabilities.shape}"
        )
    slot = jnp.asarray(position, jnp.int32).reshape(batch) % capacity
    rows = jnp.arange(batch * heads)
    values = cache.values.reshape(batch * heads, capacity, value_dim)
    values = values.at[rows, jnp.repeat(slot, heads)].set(
        v.reshape(-1, value_dim).astype(values.dtype)
    )
    dtype = jnp.result_type(jnp.float32, probabilities.dtype, values.dtype)
    out = jnp.einsum(
        "rs,rsd->rd",
        probabilities.reshape(batch * heads, capacity).astype(dtype),
        values.astype(dtype),
    )
    return (
        out.reshape(batch, heads, value_dim).astype(v.dtype),
        ValueCache(values=values.reshape(cache.values.shape)),
    )
