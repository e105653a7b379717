"""Sequence-parallel forms of the per-channel recurrences: Mamba-1's selective scan and MEGA's
EMA (SeqBoat), and of SeqBoat's packed attention over its routed tokens.

Under an active mesh whose ``sequence`` axis has ``n > 1`` devices, shard ``s`` holds tokens
``s L .. (s + 1) L - 1`` (``L = T / n``) of every row; each function below runs inside
``jax.shard_map`` on its slice and passes to later shards only what crosses a slice boundary
(docs/sequence_parallelism.md):

- :func:`selective_scan_sharded`: each shard scans its slice from a zero state, keeping the
  final state ``h [B, D, N]`` and the slice's total step ``Δ = sum_t delta_t`` ``[B, D]`` (the
  slice decays the state by ``exp(Δ a)``, per channel and state entry). The pairs ``(Δ, h)``
  are combined by an exclusive scan over the axis (:func:`exclusive_scan`: the shift and
  doubling ``ppermute`` rounds of :mod:`jaxbased.ops.sequence_parallel`), giving the incoming
  state ``h_in``; token ``t`` then adds ``c_t · (exp(G_t a) ⊙ h_in)``, ``G_t`` the slice's
  cumulative step up to ``t``.
- :func:`ema_sharded`: the EMA's decay is constant, so a slice decays a state by ``a^L`` and
  only the final states ``[B, D, N]`` cross; each shard then reruns its slice from ``h_in``.
- :func:`pack_active_sharded`, :func:`packed_window_attention_sharded` and
  :func:`unpack_sharded`: SeqBoat's router packs its active tokens globally (a token's packed
  rank is the number of active tokens before it in the row). Each shard packs its own active
  tokens; an exclusive scan of ``(active count, last window - 1 packed keys and values)``
  gives every shard its rank offset and the keys its first packed queries see, which may come
  from several earlier shards when activity is sparse.
- Prefill: :func:`ema_sharded` with ``state_positions`` also returns the EMA state after each
  row's last valid token, and :func:`active_ring_sharded` the decode ring's last ``window``
  active tokens, each taken by the shard holding it and summed over the axis (replicated).

Every shard computes with the XLA algorithms of the unsharded ops, except that the packed
attention runs the Pallas window kernel per shard under ``implementation="pallas"``; the results
equal the unsharded ops up to float rounding. Batch dims stay split over the batch axes and channels
over ``tensor`` where the layout says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from jaxbased.ops._common import compute_dtype
from jaxbased.ops.sequence_parallel import (
    SEQUENCE_AXIS,
    SequenceLayout,
    _shift_to_next,
)


def exclusive_scan(value: Any, combine: Callable[[Any, Any, int], Any], shards: int) -> Any:
    """``value_0 ∘ ... ∘ value_{s-1}`` on shard ``s`` of the ``sequence`` axis, inside a
    ``shard_map`` over that axis, for an associative ``combine(earlier, later, span)`` whose
    identity is all zeros (what ``ppermute`` hands the first shards).

    One shift by one shard, then doubling steps: at offset ``o`` every shard's running value
    covers the ``o`` shards before it (``span = o``) and receives the ``o`` before those
    (:func:`jaxbased.ops.sequence_parallel.exclusive_prefix_rounds` rounds in all, each moving
    every leaf of ``value`` once). Shard 0 gets zeros.
    """
    total = _shift_to_next(value, shards)
    offset = 1
    while offset < shards - 1:
        earlier = _shift_to_next(total, shards, offset)
        total = combine(earlier, total, offset)
        offset *= 2
    return total


def _shard_map(function: Callable, in_specs: Any, out_specs: Any) -> Callable:
    return jax.shard_map(function, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# Mamba-1 -----------------------------------------------------------------------------------


def _incoming_state_correction(
    cumulative_step: Float[Array, "B L D"],
    a: Float[Array, "D N"],
    c: Float[Array, "B L N"],
    incoming: Float[Array, "B D N"],
    chunk_size: int,
) -> Float[Array, "B L D"]:
    """``y_t = sum_n c_t[n] exp(G_t[d] a[d, n]) h_in[d, n]``, chunk by chunk so that the
    ``[B, chunk, D, N]`` factors exist for one chunk at a time (rematerialized in the
    backward)."""
    batch, length, channels = cumulative_step.shape
    chunk = min(chunk_size, length)
    chunks = -(-length // chunk)
    pad = ((0, 0), (0, chunks * chunk - length), (0, 0))

    def to_chunks(x: Array) -> Array:  # [B, L, X] -> [K, B, C, X]
        x = jnp.pad(x, pad)
        return jnp.moveaxis(x.reshape(batch, chunks, chunk, x.shape[-1]), 1, 0)

    @jax.checkpoint
    def read(block: tuple[Array, Array]) -> Array:
        step, projection = block
        factor = jnp.exp(step[..., None] * a) * incoming[:, None]  # [B, C, D, N]
        return jnp.einsum("bcdn,bcn->bcd", factor, projection)

    out = jax.lax.map(read, (to_chunks(cumulative_step), to_chunks(c)))
    return jnp.moveaxis(out, 0, 1).reshape(batch, chunks * chunk, channels)[:, :length]


def selective_scan_sharded(
    u: Float[Array, "B T D"],
    delta: Float[Array, "B T D"],
    a: Float[Array, "D N"],
    b: Float[Array, "B T N"],
    c: Float[Array, "B T N"],
    layout: SequenceLayout,
    *,
    algorithm: str,
    chunk_size: int,
) -> Float[Array, "B T D"]:
    """Mamba-1's selective scan over a time-split mesh (module docstring); equals
    :func:`jaxbased.ops.selective_scan` from a zero state (``[B, T, D]`` in ``u.dtype``).
    ``layout`` comes from :func:`jaxbased.ops.sequence_parallel.sequence_layout` for
    ``(B, T, D)``: channels split over ``tensor``, ``b`` and ``c`` replicated over it.

    Each round of the exclusive scan sends ``[h | Δ]``, ``[B, D, N + 1]`` (float32), per
    device in one ``ppermute``; the pair of an earlier range then a later one composes as
    ``(Δ_1 + Δ_2, exp(Δ_2 a) h_1 + h_2)``."""
    from jaxbased.ops.selective_scan import selective_scan

    dtype = compute_dtype(u, delta, a, b, c)

    def local(u, delta, a, b, c):
        u, delta, a, b, c = (x.astype(dtype) for x in (u, delta, a, b, c))
        y, final = selective_scan(
            u, delta, a, b, c, algorithm=algorithm, chunk_size=chunk_size,
            return_state=True, implementation="xla",
        )  # fmt: skip
        cumulative = jnp.cumsum(delta, axis=1)  # G_t [B, L, D]
        state_dim = a.shape[1]

        def combine(earlier, later, span):
            # [B, D, N + 1]: the state, then the total step (one array: one ppermute a round).
            del span
            decay = jnp.exp(later[..., state_dim:] * a)
            state = decay * earlier[..., :state_dim] + later[..., :state_dim]
            return jnp.concatenate([state, earlier[..., state_dim:] + later[..., state_dim:]], -1)

        pair = jnp.concatenate([final.astype(dtype), cumulative[:, -1, :, None]], axis=-1)
        incoming = exclusive_scan(pair, combine, layout.shards)[..., :state_dim]
        correction = _incoming_state_correction(cumulative, a, c, incoming, chunk_size)
        return (y.astype(dtype) + correction).astype(u.dtype)

    channels = layout.spec(3)
    shared = layout.spec(3, heads=False)
    specs = (channels, channels, PartitionSpec(layout.head_axis, None), shared, shared)
    return _shard_map(local, specs, channels)(u, delta, a, b, c).astype(u.dtype)


# MEGA's EMA (SeqBoat) ----------------------------------------------------------------------


def ema_final_state(
    x: Float[Array, "B L D"],
    decay: Float[Array, "D N"],
    input_scale: Float[Array, "D N"],
    chunk_size: int,
) -> Float[Array, "B D N"]:
    """The EMA state after ``x`` from a zero state, ``sum_j a^(L-1-j) b x_j`` (float32 or
    wider), by a scan over chunks of ``chunk_size`` tokens: the sequence is padded at its
    start with zeros, which a zero state ignores."""
    batch, length, channels = x.shape
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    chunk = min(chunk_size, length)
    chunks = -(-length // chunk)
    padded = jnp.pad(x.astype(dtype), ((0, 0), (chunks * chunk - length, 0), (0, 0)))
    blocks = jnp.moveaxis(padded.reshape(batch, chunks, chunk, channels), 1, 0)  # [K, B, C, D]
    log_decay = jnp.log(decay.astype(dtype))
    exponents = (chunk - 1 - jnp.arange(chunk)).astype(dtype)
    write = input_scale.astype(dtype)[..., None] * jnp.exp(log_decay[..., None] * exponents)
    carry_decay = jnp.exp(log_decay * chunk)

    def step(state: Array, block: Array) -> tuple[Array, None]:
        return carry_decay * state + jnp.einsum("dnj,bjd->bdn", write, block), None

    state = jnp.zeros((batch, channels, decay.shape[-1]), dtype)
    return jax.lax.scan(step, state, blocks)[0]


def ema_sharded(
    x: Float[Array, "B T D"],
    decay: Float[Array, "D N"],
    input_scale: Float[Array, "D N"],
    output_scale: Float[Array, "D N"],
    layout: SequenceLayout,
    *,
    chunk_size: int,
    state_positions: Int[Array, " B"] | None = None,
) -> Any:
    """MEGA's multi-head EMA over a time-split mesh; equals :func:`jaxbased.ops.ema.multi_head_ema`
    from a zero state (``[B, T, D]`` in ``x.dtype``). ``layout`` is for ``(B, T, 1)``: channels
    stay whole.

    Each shard computes its slice's final state ``S_s`` from zero (:func:`ema_final_state`);
    a slice decays any state by the constant ``a^L``, so the exclusive scan composes
    ``a^(span L) S_earlier + S_later`` and sends only the ``[B, D, N]`` states; the shard then
    runs the chunked EMA over its slice from ``S_in``.

    ``state_positions [B]`` (prefill): also return the state after token
    ``state_positions[b]`` of each row (``0 <= t < T``; a padded row's last valid token),
    ``[B, D, N]`` float32 or wider, replicated over ``sequence``: the shard holding ``t`` reads
    it from its chunk states (:func:`jaxbased.ops.ema.ema_state_at`) and one all-reduce, the
    other shards adding zeros, hands it to all."""
    from jaxbased.ops.ema import ema_state_at, multi_head_ema

    def local(x, decay, input_scale, output_scale, *positions):
        length = x.shape[1]
        final = ema_final_state(x, decay, input_scale, chunk_size)
        log_decay = jnp.log(decay.astype(final.dtype))

        def combine(earlier, later, span):
            return jnp.exp(log_decay * (span * length)) * earlier + later

        incoming = exclusive_scan(final, combine, layout.shards)
        if not positions:
            return multi_head_ema(
                x, decay, input_scale, output_scale, chunk_size=chunk_size, initial_state=incoming
            )
        y, chunk_states = multi_head_ema(
            x, decay, input_scale, output_scale, chunk_size=chunk_size, initial_state=incoming,
            return_chunk_states=True,
        )  # fmt: skip
        local_positions = positions[0] - jax.lax.axis_index(SEQUENCE_AXIS) * length
        owned = (local_positions >= 0) & (local_positions < length)
        state = ema_state_at(
            x, chunk_states, decay, input_scale, jnp.clip(local_positions, 0, length - 1),
            chunk_size=chunk_size,
        )  # fmt: skip
        return y, jax.lax.psum(jnp.where(owned[:, None, None], state, 0), SEQUENCE_AXIS)

    tokens, whole = layout.spec(3, heads=False), PartitionSpec()
    specs = (tokens, whole, whole, whole)
    operands = (x, decay, input_scale, output_scale)
    if state_positions is None:
        return _shard_map(local, specs, tokens)(*operands)
    rows = PartitionSpec(layout.batch_axes)
    positions = jnp.asarray(state_positions, jnp.int32)
    return _shard_map(local, (*specs, rows), (tokens, rows))(*operands, positions)


# SeqBoat's packed attention ----------------------------------------------------------------


def pack_active_sharded(
    x: Float[Array, "B T D"], active: Bool[Array, "B T"], layout: SequenceLayout, slots: int
) -> tuple[Float[Array, "B S D"], Int[Array, "B S"], Int[Array, "B S"], Int[Array, "B n"]]:
    """Each shard packs its slice's active tokens, in order, into ``slots`` places (the first
    ``slots`` of them; inactive tokens fill the rest, as the unsharded packing does).

    Returns, with ``S = n * slots`` split over ``sequence`` like ``T``: the packed ``x``
    ``[B, S, D]``; each slot's position in the whole sequence ``[B, S]`` (for rotary) and in
    its slice ``[B, S]`` (for :func:`unpack_sharded`); and each slice's active count
    ``[B, n]``. No communication."""

    def local(x, active):
        length = x.shape[1]
        order = jnp.argsort(jnp.logical_not(active), axis=-1, stable=True)[:, :slots]
        order = order.astype(jnp.int32)
        packed = jnp.take_along_axis(x, order[..., None], axis=1)
        start = jax.lax.axis_index(SEQUENCE_AXIS).astype(jnp.int32) * length
        count = active.sum(axis=-1, dtype=jnp.int32)[:, None]
        return packed, order + start, order, count

    tokens, flags = layout.spec(3, heads=False), PartitionSpec(layout.batch_axes, SEQUENCE_AXIS)
    return _shard_map(local, (tokens, flags), (tokens, flags, flags, flags))(x, active)


def _last_keys(buffer: Array, count: Array, history: int) -> Array:
    """The last ``min(count, slots)`` rows of ``buffer [B, slots, X]`` right-aligned in
    ``[B, history, X]`` (zeros before them)."""
    slots = buffer.shape[1]
    filled = jnp.minimum(count, slots)
    padded = jnp.pad(buffer, ((0, 0), (history, 0), (0, 0)))
    index = filled[:, None] + jnp.arange(history)[None, :]  # slot j: packed rank filled-history+j
    return jnp.take_along_axis(padded, index[..., None], axis=1)


def _append_keys(earlier: tuple[Array, Array], later: tuple[Array, Array], span: int):
    """The exclusive scan's step over ``(active count [B], last keys [B, W - 1, X])``: the
    later range's keys, preceded by the earlier range's last ones."""
    del span
    (earlier_count, earlier_keys), (later_count, later_keys) = earlier, later
    history = later_keys.shape[1]
    taken = jnp.minimum(later_count, history)[:, None]  # slots the later range fills
    slot = jnp.arange(history)[None, :]
    from_earlier = jnp.take_along_axis(
        earlier_keys, jnp.minimum(slot + taken, history - 1)[..., None], axis=1
    )
    keys = jnp.where((slot >= history - taken)[..., None], later_keys, from_earlier)
    return earlier_count + later_count, keys


def _packed_window_kernel(
    q: Float[Array, "B S 1 Z"],
    k: Float[Array, "B S 1 Z"],
    v: Float[Array, "B S 1 H"],
    earlier: tuple[Array, Array] | None,
    earlier_counts: Int[Array, " B"],
    *,
    window: int,
    block_size: int | None,
) -> Float[Array, "B S 1 H"]:
    """One shard's packed window attention by the Pallas kernel
    (``pallas_kernels.window_attention``; interpreted on CPU).

    ``earlier`` holds the ``W - 1`` packed keys and values ``[B, W - 1, 1, X]`` before the
    shard's first packed token, right-aligned, of which only the last ``c_b =
    min(earlier_counts[b], W - 1)`` exist in row ``b``. The kernel masks by position only, so
    each row is laid out as ``[its c_b existing keys, its S own, W - 1 - c_b unused]`` (the
    ``[halo, own]`` sequence rolled left by ``W - 1 - c_b``): the kernel's start of the
    sequence hides what does not exist, and the unused keys, last, are later than every own
    query. The queries in front of the own ones are zeros; own query ``i`` is read back at
    ``c_b + i``."""
    from jaxbased.ops.dispatch import kernel_backend
    from pallas_kernels.window_attention import window_attention

    backend, interpret = kernel_backend()

    def kernel(q, k, v):
        return window_attention(
            q, k, v, window=window, block_size=block_size, backend=backend, interpret=interpret
        )

    if earlier is None:
        return kernel(q, k, v)
    history, slots = earlier[0].shape[1], q.shape[1]
    existing = jnp.minimum(earlier_counts, history).astype(jnp.int32)  # c_b [B]
    total = history + slots
    rolled = (jnp.arange(total, dtype=jnp.int32)[None, :] + (history - existing)[:, None]) % total

    def laid_out(front: Array, own: Array) -> Array:  # [B, W - 1 + S, 1, X], rolled per row
        return jnp.take_along_axis(
            jnp.concatenate([front, own], axis=1), rolled[:, :, None, None], axis=1
        )

    zeros = jnp.zeros((q.shape[0], history, *q.shape[2:]), q.dtype)
    out = kernel(laid_out(zeros, q), laid_out(earlier[0], k), laid_out(earlier[1], v))
    own = existing[:, None] + jnp.arange(slots, dtype=jnp.int32)[None, :]
    return jnp.take_along_axis(out, own[:, :, None, None], axis=1)


def packed_window_attention_sharded(
    q: Float[Array, "B S 1 Z"],
    k: Float[Array, "B S 1 Z"],
    v: Float[Array, "B S 1 H"],
    counts: Int[Array, "B n"],
    layout: SequenceLayout,
    *,
    window: int,
    capacity: int,
    implementation: str = "xla",
    block_size: int | None = None,
) -> tuple[Float[Array, "B S 1 H"], Bool[Array, "B S"]]:
    """SeqBoat's attention of every packed query over the last ``window`` packed keys (itself
    included) in the whole row, from the shards' packed slots (:func:`pack_active_sharded`).

    A packed token's rank in the row is its slice's offset (the active tokens of earlier
    slices) plus its rank in the slice; it is kept when that rank is below ``capacity``. An
    exclusive scan over ``(active count, last window - 1 packed keys and values)`` pairs gives
    each shard its offset and the ``window - 1`` keys before its first packed token, gathered
    from as many earlier shards as it takes (fewer exist in a row with fewer earlier active
    tokens: its first queries see only those). Returns the attended values ``[B, S, 1, H]``
    (``v.dtype``) and the kept mask ``[B, S]``.

    ``implementation``: ``xla`` (the blocked XLA window with a per-row count of existing
    earlier keys), ``pallas`` (each shard runs the Pallas window kernel, interpreted on CPU, on
    the existing earlier keys and its own: :func:`_packed_window_kernel`), or ``auto``
    (:func:`jaxbased.ops.window_attention.window_kernel_chosen` on one shard's shapes);
    ``block_size`` as in :func:`jaxbased.ops.sliding_window_attention`. The scan and the
    capacity stay XLA."""
    from jaxbased.ops.window_attention import (
        window_kernel_chosen,
        windowed_attention_with_history,
    )

    history = window - 1
    key_dim = k.shape[-1]
    slots = q.shape[1] // layout.shards
    extended = (q.shape[0], history + slots, *q.shape[2:])
    use_kernel = window_kernel_chosen(
        jax.ShapeDtypeStruct(extended, q.dtype),
        jax.ShapeDtypeStruct((*extended[:3], v.shape[3]), v.dtype),
        window=window,
        block_size=block_size,
        implementation=implementation,
    )

    def local(q, k, v, count):
        count = count[:, 0]
        if history:
            tail = _last_keys(jnp.concatenate([k[:, :, 0], v[:, :, 0]], axis=-1), count, history)
            offset, halo = exclusive_scan((count, tail), _append_keys, layout.shards)
            earlier = (halo[:, :, None, :key_dim], halo[:, :, None, key_dim:])
        else:
            offset = exclusive_scan(
                count, lambda earlier, later, span: earlier + later, layout.shards
            )
            earlier = None
        if use_kernel:
            attended = _packed_window_kernel(
                q, k, v, earlier, offset, window=window, block_size=block_size
            )
        else:
            attended = windowed_attention_with_history(
                q, k, v, earlier, None, window=window, block_size=block_size,
                earlier_counts=offset,
            )  # fmt: skip
        rank = jnp.arange(slots)[None, :]
        kept = (rank < count[:, None]) & (offset[:, None] + rank < capacity)
        return attended, kept

    tokens = layout.spec(4, heads=False)
    flags = PartitionSpec(layout.batch_axes, SEQUENCE_AXIS)
    return _shard_map(local, (tokens, tokens, tokens, flags), (tokens, flags))(q, k, v, counts)


def unpack_sharded(
    packed: Float[Array, "B S D"], index: Int[Array, "B S"], layout: SequenceLayout, seq: int
) -> Float[Array, "B T D"]:
    """Each shard scatters its packed rows back to their places in its slice (``index`` from
    :func:`pack_active_sharded`), zeros elsewhere: ``[B, T, D]``. No communication."""
    length = seq // layout.shards

    def local(packed, index):
        rows = jnp.arange(packed.shape[0])[:, None]
        out = jnp.zeros((packed.shape[0], length, packed.shape[2]), packed.dtype)
        return out.at[rows, index].set(packed)

    tokens, flags = layout.spec(3, heads=False), PartitionSpec(layout.batch_axes, SEQUENCE_AXIS)
    return _shard_map(local, (tokens, flags), tokens)(packed, index)


def active_ring_sharded(
    x: Float[Array, "B T D"], active: Bool[Array, "B T"], layout: SequenceLayout, window: int
) -> tuple[Float[Array, "B W D"], Int[Array, "B W"], Int[Array, " B"]]:
    """SeqBoat's decode ring after a prefill, from time-split ``x`` and ``active``: slot ``s``
    of ``W = window`` holds the active token of rank ``r = last - ((last - s) mod W)``
    (``last`` = the row's active count - 1), the latest rank ``≡ s (mod W)``, as
    :func:`jaxbased.ops.sequence_parallel_prefill.ring_buffer_positions` lays out positions.

    Each shard counts its active tokens; one all-reduce of the ``[B, n]`` counts gives every
    shard the row's total and its rank offset. The shard holding rank ``r`` (offset ``<= r <``
    offset + count) takes that token's ``x`` and position from its own stable packing order, the
    others zeros, and one all-reduce of each sums them (exact). Returns, replicated over
    ``sequence``: ``x`` at the slots ``[B, W, D]`` (zeros in empty slots), the slots' positions
    ``[B, W]`` int32 (-1 when empty) and the active counts ``[B]`` int32."""
    from jaxbased.ops.sequence_parallel_prefill import ring_buffer_positions

    def local(x, active):
        length = x.shape[1]
        shard = jax.lax.axis_index(SEQUENCE_AXIS).astype(jnp.int32)
        count = active.sum(axis=-1, dtype=jnp.int32)  # [B]
        mine = jnp.arange(layout.shards, dtype=jnp.int32)[None, :] == shard
        counts = jax.lax.psum(jnp.where(mine, count[:, None], 0), SEQUENCE_AXIS)  # [B, n]
        total = counts.sum(axis=-1)
        earlier = jnp.arange(layout.shards, dtype=jnp.int32)[None, :] < shard
        offset = jnp.where(earlier, counts, 0).sum(axis=-1)
        ranks = ring_buffer_positions(total, window)  # [B, W], -1: empty
        local_ranks = ranks - offset[:, None]
        owned = (ranks >= 0) & (local_ranks >= 0) & (local_ranks < count[:, None])
        order = jnp.argsort(jnp.logical_not(active), axis=-1, stable=True).astype(jnp.int32)
        index = jnp.take_along_axis(order, jnp.clip(local_ranks, 0, length - 1), axis=1)
        taken = jnp.take_along_axis(x, index[..., None], axis=1)
        ring = jax.lax.psum(jnp.where(owned[..., None], taken, 0), SEQUENCE_AXIS)
        positions = jax.lax.psum(jnp.where(owned, index + shard * length, 0), SEQUENCE_AXIS)
        return ring, jnp.where(ranks >= 0, positions, -1), total

    tokens, flags = layout.spec(3, heads=False), PartitionSpec(layout.batch_axes, SEQUENCE_AXIS)
    rows = PartitionSpec(layout.batch_axes)
    out_specs = (PartitionSpec(layout.batch_axes), rows, rows)
    return _shard_map(local, (tokens, flags), out_specs)(x, active)
