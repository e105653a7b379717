"""Sequence-parallel full causal softmax attention and CCA-Attention.

Under a mesh whose ``sequence`` axis has ``n > 1`` devices, shard ``s`` holds tokens
``s L .. (s + 1) L - 1`` of every sequence (``L = T / n``; see
:mod:`jaxbased.ops.sequence_parallel` and docs/sequence_parallelism.md). Queries and keys arrive
rotated at their absolute positions (rotary is applied before the split).

- :func:`full_attention_sharded`: every shard all-gathers the keys and values of the sequence
  (one ``all_gather`` of ``[k | v]``; its transpose, a reduce-scatter, returns the key and value
  gradients), then attends its ``L`` queries, flash-style, over the key blocks at or before
  them: block products above the diagonal are skipped, not masked. The shard's computation is
  rematerialised (``jax.checkpoint``), so the gathered keys live only while one layer runs, in
  the forward and again in the backward, never between them.
- :func:`cca_attention_sharded`: core (pooled) tokens are pooled per slice, which needs whole
  groups per slice (``L % group_size == 0``), and all-gathered (``T / g`` small pooled keys and
  values); the raw keys a slice's first queries see come from the previous slice as a halo of
  its last ``local_window + group_size - 2`` keys and values (one ``ppermute``).

Both equal their unsharded ops (:func:`jaxbased.ops.sliding_window_attention` with
``window=None``, :func:`jaxbased.layers.cca_attention.cca_attention`) up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxbased.ops.sequence_parallel import SEQUENCE_AXIS, SequenceLayout, _shift_to_next

#: Queries and keys per block of the sharded full attention (the unsharded op's default).
FULL_ATTENTION_BLOCK_SIZE = 512


def _shard_map(function: Callable, in_specs: Any, out_specs: Any) -> Callable:
    return jax.shard_map(function, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _blocks(x: Array, block: int) -> Array:
    """``[B, H, N, X] -> [ceil(N / block), B, H, block, X]``, zero-padded at the end."""
    batch, heads, length, width = x.shape
    count = -(-length // block)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, count * block - length), (0, 0)))
    return jnp.moveaxis(x.reshape(batch, heads, count, block, width), 2, 0)


def causal_attention_at_offset(
    queries: Float[Array, "B H L D"],
    keys: Float[Array, "B H T D"],
    values: Float[Array, "B H T Dv"],
    query_start: Array,
    block: int,
) -> Float[Array, "B H L Dv"]:
    """Causal softmax attention of ``L`` queries (head-major, already scaled) at absolute
    positions ``query_start .. query_start + L - 1`` over the keys and values of positions
    ``0 .. T - 1``: ``y_i = sum_{j <= i} softmax_j(q_i . k_j) v_j``.

    Queries and keys are split into blocks of ``block``; each query block runs an online
    softmax (running max, sum and weighted values) over the key blocks, and a key block that
    starts after the query block's last position is skipped (``lax.cond``). Each query block
    and each key step is rematerialised, so the backward holds one ``[B, H, block, block]``
    score block at a time. ``query_start`` may be traced (a shard's offset). Float32 or wider.
    """
    length, total = queries.shape[2], keys.shape[2]
    value_dim = values.shape[-1]
    query_blocks = _blocks(queries, block)
    key_blocks, value_blocks = _blocks(keys, block), _blocks(values, block)
    offsets = jnp.arange(block)

    def attend(index: Array, query_block: Array) -> Array:
        first_query = query_start + index * block
        query_pos = first_query + offsets
        last_key_block = (first_query + block - 1) // block

        def update(carry: tuple[Array, Array, Array], key_index: Array) -> tuple:
            running_max, running_sum, accumulator = carry
            key_pos = key_index * block + offsets
            mask = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] < total)
            scores = jnp.einsum("bhqd,bhkd->bhqk", query_block, key_blocks[key_index])
            scores = jnp.where(mask, scores, -jnp.inf)
            new_max = jax.lax.stop_gradient(jnp.maximum(running_max, scores.max(-1)))
            probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
            correction = jnp.exp(running_max - new_max)
            weighted = jnp.einsum("bhqk,bhkd->bhqd", probs, value_blocks[key_index])
            return (
                new_max,
                running_sum * correction + probs.sum(-1),
                accumulator * correction[..., None] + weighted,
            )

        @jax.checkpoint
        def step(carry: tuple, key_index: Array) -> tuple[tuple, None]:
            needed = key_index <= last_key_block
            return jax.lax.cond(needed, update, lambda carry, _: carry, carry, key_index), None

        shape = query_block.shape[:-1]
        init = (
            jnp.full(shape, -1e30, queries.dtype),
            jnp.zeros(shape, queries.dtype),
            jnp.zeros((*shape, value_dim), queries.dtype),
        )
        (_, running_sum, accumulator), _ = jax.lax.scan(step, init, jnp.arange(key_blocks.shape[0]))
        return accumulator / running_sum[..., None]

    attend = jax.checkpoint(attend)
    out = jax.lax.map(lambda pair: attend(*pair), (jnp.arange(query_blocks.shape[0]), query_blocks))
    batch, heads = queries.shape[:2]
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, -1, value_dim)
    return out[:, :, :length]


def full_attention_sharded(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    layout: SequenceLayout,
    *,
    scale: float | None,
    block_size: int | None,
) -> Float[Array, "B T H Dv"]:
    """Full causal softmax attention over a time-split mesh (module docstring): one
    ``all_gather`` of ``[k | v]`` (``[B, T, H, D + Dv]`` per device, in the activation dtype),
    then :func:`causal_attention_at_offset` of the shard's queries. Equals
    :func:`jaxbased.ops.sliding_window_attention` with ``window=None`` (``[B, T, H, Dv]`` in
    ``v.dtype``; scores and softmax in float32)."""
    length = q.shape[1] // layout.shards
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    block = min(FULL_ATTENTION_BLOCK_SIZE if block_size is None else block_size, length)
    dtype = jnp.result_type(jnp.float32, q.dtype, k.dtype, v.dtype)
    pair_dtype = jnp.result_type(k.dtype, v.dtype)

    @jax.checkpoint
    def local(q: Array, k: Array, v: Array) -> Array:
        pair = jnp.concatenate([k.astype(pair_dtype), v.astype(pair_dtype)], axis=-1)
        gathered = jax.lax.all_gather(pair, SEQUENCE_AXIS, axis=1, tiled=True)
        gathered = jnp.swapaxes(gathered, 1, 2).astype(dtype)  # [B, H, T, D + Dv]
        queries = jnp.swapaxes(q, 1, 2).astype(dtype) * jnp.asarray(scale, dtype)
        start = jax.lax.axis_index(SEQUENCE_AXIS) * length
        out = causal_attention_at_offset(
            queries, gathered[..., :head_dim], gathered[..., head_dim:], start, block
        )
        return jnp.swapaxes(out, 1, 2).astype(v.dtype)

    specs = (layout.spec(4), layout.spec(4), layout.spec(4))
    return _shard_map(local, specs, layout.spec(4))(q, k, v)


def cca_halo_tokens(group_size: int, local_window: int) -> int:
    """Raw keys before a slice that its first queries may see: ``local_window + group_size -
    2`` (a query sees at most ``s + g - 1`` raw keys, itself included)."""
    return local_window + group_size - 2


def check_cca_slices(seq: int, shards: int, group_size: int, local_window: int) -> None:
    """Raise ``ValueError`` unless ``seq`` tokens over ``shards`` slices give whole groups per
    slice and slices that hold the halo (:func:`cca_halo_tokens`)."""
    length = seq // shards
    halo = cca_halo_tokens(group_size, local_window)
    if length % group_size:
        raise ValueError(
            f"sequence shards of {length} tokens (T={seq} over sequence={shards}) must be whole "
            f"groups of cca_attention.group_size={group_size}; use a length per shard "
            f"divisible by {group_size}"
        )
    if length < halo:
        raise ValueError(
            f"sequence shards of {length} tokens (T={seq} over sequence={shards}) must hold the "
            f"{halo} raw keys (local_window + group_size - 2) before each slice; use a "
            f"sequence size with T / sequence >= {halo}"
        )


def cca_attention_sharded(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    layout: SequenceLayout,
    *,
    group_size: int,
    local_window: int,
    scale: float | None,
    block_size: int,
) -> Float[Array, "B T H Dv"]:
    """CCA-Attention over a time-split mesh (module docstring): each shard pools its own
    ``L / g`` groups, all-gathers the ``[K | V]`` core tokens (``[B, H, T / g, D + Dv]``),
    receives the previous slice's last :func:`cca_halo_tokens` keys and values (zeros, never
    seen, on shard 0) and attends its queries at their absolute positions. Requires
    ``L % group_size == 0`` and ``L >= local_window + group_size - 2``. Equals
    :func:`jaxbased.layers.cca_attention.cca_attention` (``[B, T, H, Dv]`` in ``v.dtype``)."""
    from jaxbased.layers.cca_attention import attend_with_history, pool_groups

    check_cca_slices(q.shape[1], layout.shards, group_size, local_window)
    length = q.shape[1] // layout.shards
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    dtype = jnp.result_type(jnp.float32, q.dtype, k.dtype, v.dtype)
    halo = cca_halo_tokens(group_size, local_window)

    def local(q: Array, k: Array, v: Array) -> Array:
        qh, kh, vh = (jnp.swapaxes(x, 1, 2).astype(dtype) for x in (q, k, v))
        core_keys, core_values = pool_groups(qh, kh, vh, group_size, scale)
        cores = jnp.concatenate([core_keys, core_values], axis=-1)  # [B, H, L / g, D + Dv]
        cores = jax.lax.all_gather(cores, SEQUENCE_AXIS, axis=2, tiled=True)
        if halo:
            tail = jnp.concatenate([kh[:, :, -halo:], vh[:, :, -halo:]], axis=-1)
            earlier = _shift_to_next(tail, layout.shards)  # shard 0: zeros at positions < 0
            kh = jnp.concatenate([earlier[..., :head_dim], kh], axis=2)
            vh = jnp.concatenate([earlier[..., head_dim:], vh], axis=2)
        out = attend_with_history(
            qh * jnp.asarray(scale, dtype),
            kh,
            vh,
            cores[..., :head_dim],
            cores[..., head_dim:],
            jax.lax.axis_index(SEQUENCE_AXIS) * length,
            group_size=group_size,
            local_window=local_window,
            block_size=block_size,
        )
        return jnp.swapaxes(out, 1, 2).astype(v.dtype)

    specs = (layout.spec(4), layout.spec(4), layout.spec(4))
    return _shard_map(local, specs, layout.spec(4))(q, k, v)
