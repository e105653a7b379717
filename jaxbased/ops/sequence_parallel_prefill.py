"""What a prefill over a time-split mesh hands to decoding (docs/sequence_parallelism.md#prefill).

Decoding runs one token per row on one device or a batch-split mesh, so every decode cache
leaves the prefill replicated over the ``sequence`` axis and equal to an unsharded prefill's.
The caches are of three kinds, each assembled where its pieces lie:

- a state after the last token (linear attention, decay attention, SSD): only the last shard
  has it (its incoming state plus its own); :func:`last_shard_value` broadcasts it with one
  all-reduce in which the other shards add zeros;
- tokens at given positions (a short conv's last ``K - 1`` inputs, a sliding window's last
  ``window`` keys and values, each row ending at its own valid length, so they may lie on any
  shard or span two): :func:`gather_positions` lets the shard holding each position take it
  and sums over the axis (one all-reduce of the gathered ``[B, P, ...]``);
- every token (full attention's KV cache, ``capacity >= T``): one all-gather of the keys and
  values along time, then the unsharded fill (:func:`fill_kv_cache_sharded`).

Every function here runs inside a ``jax.shard_map`` over ``sequence`` (those taking a
``layout`` open it themselves).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from jaxbased.ops.sequence_parallel import SEQUENCE_AXIS, SequenceLayout


def last_shard_value(value: Any, shards: int) -> Any:
    """The last shard's ``value`` (a pytree) on every shard of the ``sequence`` axis: one
    all-reduce of the pytree, the other shards contributing zeros (exact in any dtype)."""
    is_last = jax.lax.axis_index(SEQUENCE_AXIS) == shards - 1
    kept = jax.tree.map(lambda leaf: jnp.where(is_last, leaf, jnp.zeros_like(leaf)), value)
    return jax.lax.psum(kept, SEQUENCE_AXIS)


def gather_positions(
    x: Float[Array, "B L ..."], positions: Int[Array, "B P"]
) -> Float[Array, "B P ..."]:
    """``x_global[b, positions[b, p]]`` on every shard, where ``x`` ``[B, L, ...]`` is this
    shard's slice of ``x_global`` ``[B, n L, ...]`` (shard ``s`` holds ``s L .. (s + 1) L - 1``).
    Positions outside ``0 .. n L - 1`` give zeros. Each position has one owner, which takes it;
    the others add zeros (one all-reduce of ``[B, P, ...]``, exact)."""
    length = x.shape[1]
    local = positions - jax.lax.axis_index(SEQUENCE_AXIS) * length  # [B, P]
    owned = (local >= 0) & (local < length)
    index = jnp.clip(local, 0, length - 1).reshape(*local.shape, *([1] * (x.ndim - 2)))
    taken = jnp.take_along_axis(x, index, axis=1)
    mask = owned.reshape(index.shape)
    return jax.lax.psum(jnp.where(mask, taken, jnp.zeros_like(taken)), SEQUENCE_AXIS)


def ring_buffer_positions(lengths: Int[Array, " B"], capacity: int) -> Int[Array, "B S"]:
    """The position slot ``s`` of a ring buffer of ``capacity`` slots holds after a prefill of
    ``lengths[b]`` valid tokens: the latest ``p < lengths[b]`` with ``p ≡ s (mod capacity)``,
    or -1 when there is none (``[B, S]`` int32)."""
    last = lengths[:, None] - 1
    slots = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    positions = last - jnp.mod(last - slots, capacity)
    return jnp.where(positions >= 0, positions, -1)


def fill_kv_cache_sharded(
    keys: Float[Array, "B T H D"],
    values: Float[Array, "B T H D"],
    capacity: int,
    lengths: Int[Array, " B"] | None,
    layout: SequenceLayout,
) -> Any:
    """:func:`jaxbased.ops.window_attention.fill_kv_cache` of time-split keys and values: the
    same :class:`~jaxbased.ops.window_attention.KVCache`, replicated over ``sequence``.

    A window (``capacity < T``) gathers only its slots' tokens (:func:`gather_positions`:
    ``B * capacity * H * (D + Dv)`` elements summed over the axis); full attention
    (``capacity >= T``) all-gathers the keys and values, the cache being every token."""
    from jaxbased.ops.window_attention import KVCache, fill_kv_cache

    batch, seq = keys.shape[:2]
    ends = jnp.full((batch,), seq, jnp.int32) if lengths is None else jnp.asarray(lengths)
    ends = ends.astype(jnp.int32)

    def local(keys, values, ends):
        if capacity >= seq:
            gathered = [
                jax.lax.all_gather(part, SEQUENCE_AXIS, axis=1, tiled=True)
                for part in (keys, values)
            ]
            return fill_kv_cache(*gathered, capacity, None if lengths is None else ends)
        positions = ring_buffer_positions(ends, capacity)
        slots = [
            jnp.swapaxes(gather_positions(part, positions), 1, 2).astype(keys.dtype)
            for part in (keys, values)
        ]  # [B, H, S, D]
        return KVCache(keys=slots[0], values=slots[1], slot_positions=positions)

    tokens = layout.spec(4)
    slot_spec = PartitionSpec(layout.batch_axes, layout.head_axis)
    out_specs = KVCache(slot_spec, slot_spec, PartitionSpec(layout.batch_axes))
    in_specs = (tokens, tokens, PartitionSpec(layout.batch_axes))
    return jax.shard_map(local, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        keys, values, ends
    )
