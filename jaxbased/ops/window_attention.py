"""Causal softmax attention over a sliding window of keys, and full causal attention.

Query ``i`` attends keys ``j`` with ``i - window < j <= i``: ``window`` counts the keys seen,
including the query's own (the reference's ``window_size: 256`` sees 129 keys;
docs/mixers/attention.md).
``window=None`` is full causal attention.

    y_i = sum_j softmax_j(scale * q_i . k_j) v_j      (softmax in float32, scale = head_dim**-0.5)

Algorithms (never a ``T x T`` matrix unless ``T`` is small):

- windowed: queries in blocks of ``block_size``; a block sees its own key block and the
  ``ceil((window - 1) / block_size)`` blocks before it. O(T * window) time and memory.
- full causal, ``T <= block_size``: one masked ``T x T`` softmax.
- full causal, longer: flash-style; ``lax.scan`` over (query block, key block) pairs at or below
  the diagonal with an online softmax (future blocks are skipped, not masked). O(T^2 / 2) time,
  O(T * block_size) memory.

``implementation="pallas"`` (or ``"auto"`` on TPU/GPU) runs the flash-style Pallas kernel of
``pallas_kernels.window_attention`` instead: the same blocks, key blocks outside the window
skipped, online softmax in float32 (see :mod:`jaxbased.ops.dispatch`).

Under a mesh that splits time (``sequence > 1``) the window runs
:func:`~jaxbased.ops.sequence_parallel.window_attention_sharded` (a halo of keys) and full
attention :func:`~jaxbased.ops.sequence_parallel_attention.full_attention_sharded` (keys and
values all-gathered), both XLA per shard.

Decoding keeps a ring buffer (:class:`KVCache`) of ``capacity`` slots: ``window`` slots for a
sliding window, the maximum length for full attention. Position ``p`` lives in slot
``p % capacity``; empty slots hold position -1. The buffer is head-major, ``[B, H, S, D]``, so
that a decode step's two batched matrix-vector products read it where it lies: with
``[B, S, H, D]`` XLA:CPU transposed (copied) every layer's whole cache on every step, 35x slower
at 8k slots.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxbased.ops.dispatch import (
    KernelRequest,
    KernelTarget,
    check_implementation,
    kernel_backend,
    mesh_partition,
    shard_kernel,
    token_spec,
    use_pallas,
)
from jaxbased.ops.kernel_check import compare_with_reference
from jaxbased.ops.sequence_parallel import (
    check_sequence_implementation,
    sequence_layout,
    window_attention_sharded,
)
from jaxbased.ops.sequence_parallel_attention import full_attention_sharded

DEFAULT_BLOCK_SIZE = 128
FULL_ATTENTION_BLOCK_SIZE = 512


class KVCache(NamedTuple):
    """Ring buffer of keys and values (keys already rotated), head-major.

    keys, values: ``[B, H, S, D]`` (S slots); slot_positions: ``[B, S]`` int32, the absolute
    position stored in each slot or -1 when empty.
    """

    keys: Float[Array, "B H S D"]
    values: Float[Array, "B H S D"]
    slot_positions: Int[Array, "B S"]


def init_kv_cache(
    batch_size: int, capacity: int, num_heads: int, head_dim: int, dtype=jnp.float32
) -> KVCache:
    """An empty ring buffer with ``capacity`` slots: keys and values ``[B, H, S, D]`` zeros."""
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")
    shape = (batch_size, num_heads, capacity, head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        slot_positions=jnp.full((batch_size, capacity), -1, jnp.int32),
    )


def _check_window(window: int | None) -> None:
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be a positive integer or None (full attention)")


def _check_inputs(q: Array, k: Array, v: Array) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(
            "q, k, v must be [batch, seq, heads, dim] with matching batch, seq and heads; got "
            f"q={q.shape}, k={k.shape}, v={v.shape}"
        )


def _masked_softmax_attention(q, k, v, mask):
    # q [B,H,Q,D] (already scaled), k/v [B,H,K,D], mask broadcastable to [B,H,Q,K].
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    scores = jnp.where(mask, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = jnp.where(mask, weights, 0.0)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


def _full_direct(q, k, v, window):
    seq = q.shape[2]
    query_pos = jnp.arange(seq)[:, None]
    key_pos = jnp.arange(seq)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= query_pos - key_pos < window
    return _masked_softmax_attention(q, k, v, mask)


def _full_flash(q, k, v, block_size):
    """Full causal attention, flash-style, visiting only the key blocks at or before each query
    block: ``n (n + 1) / 2`` block products for ``n`` blocks, not ``n**2``.

    Static shapes for ``lax.scan`` come from pairing query block ``p`` with block ``n - 1 - p``:
    together they need ``(p + 1) + (n - p) = n + 1`` key blocks, so ``n + 1`` steps serve all
    ``n / 2`` pairs at once. At step ``s`` pair ``p`` works on its low block ``p`` with key block
    ``s`` while ``s <= p``, then on its high block ``n - 1 - p`` with key block ``s - p - 1``.
    Each block keeps its online-softmax state (running max, sum, weighted values).
    """
    batch, heads, seq, _ = q.shape
    value_dim = v.shape[-1]
    num_blocks = -(-seq // block_size)
    num_blocks += num_blocks % 2  # an even number of blocks: whole pairs
    pairs = num_blocks // 2
    pad = ((0, 0), (0, 0), (0, num_blocks * block_size - seq), (0, 0))

    def blocks(x):  # [B, H, T, X] -> [n, B, H, block, X]
        x = jnp.pad(x, pad).reshape(batch, heads, num_blocks, block_size, x.shape[-1])
        return jnp.moveaxis(x, 2, 0)

    q_blocks, k_blocks, v_blocks = blocks(q), blocks(k), blocks(v)
    pair = jnp.arange(pairs)
    offsets = jnp.arange(block_size)

    def step(states, s):
        low_state, high_state = states
        on_low = s <= pair  # [pairs]
        query_block = jnp.where(on_low, pair, num_blocks - 1 - pair)
        key_block = jnp.where(on_low, s, s - pair - 1)
        query_pos = (query_block[:, None] * block_size + offsets)[:, None, None, :, None]
        key_pos = (key_block[:, None] * block_size + offsets)[:, None, None, None, :]
        mask = (key_pos <= query_pos) & (key_pos < seq)  # [pairs, 1, 1, block, block]
        select = on_low[:, None, None, None]
        running_max, running_sum, accumulator = (
            jnp.where(select if low.ndim == 4 else select[..., None], low, high)
            for low, high in zip(low_state, high_state, strict=True)
        )
        scores = jnp.einsum("pbhqd,pbhkd->pbhqk", q_blocks[query_block], k_blocks[key_block])
        scores = jnp.where(mask, scores, -jnp.inf)
        new_max = jax.lax.stop_gradient(jnp.maximum(running_max, scores.max(-1)))
        probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
        correction = jnp.exp(running_max - new_max)
        running_sum = running_sum * correction + probs.sum(-1)
        accumulator = accumulator * correction[..., None] + jnp.einsum(
            "pbhqk,pbhkd->pbhqd", probs, v_blocks[key_block]
        )
        updated = (new_max, running_sum, accumulator)
        low_state = tuple(
            jnp.where(select if new.ndim == 4 else select[..., None], new, old)
            for new, old in zip(updated, low_state, strict=True)
        )
        high_state = tuple(
            jnp.where(select if new.ndim == 4 else select[..., None], old, new)
            for new, old in zip(updated, high_state, strict=True)
        )
        return (low_state, high_state), None

    def init():
        shape = (pairs, batch, heads, block_size)
        return (
            jnp.full(shape, -1e30, q.dtype),
            jnp.zeros(shape, q.dtype),
            jnp.zeros((*shape, value_dim), q.dtype),
        )

    (low_state, high_state), _ = jax.lax.scan(step, (init(), init()), jnp.arange(num_blocks + 1))
    # low blocks are 0 .. pairs-1; high block of pair p is n-1-p, so reversed they follow on
    _, running_sum, accumulator = (
        jnp.concatenate([low, jnp.flip(high, axis=0)], axis=0)
        for low, high in zip(low_state, high_state, strict=True)
    )
    out = accumulator / running_sum[..., None]  # [n, B, H, block, Dv]
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, num_blocks * block_size, value_dim)
    return out[:, :, :seq]


def _windowed_blocks(
    q, k, v, window, block_size, earlier=None, has_earlier=None, earlier_counts=None
):
    """Windowed attention of head-major ``q [B, H, T, D]`` (scaled) over ``k, v``.

    ``earlier``: None, or the ``window - 1`` keys and values ``[B, H, window - 1, D]`` before
    ``k[:, :, 0]`` (a sequence shard's halo), seen where the scalar ``has_earlier`` is true;
    or, with ``earlier_counts [B]`` (int), only the last ``earlier_counts[b]`` of them in row
    ``b`` (the others do not exist).
    """
    batch, heads, seq, head_dim = q.shape
    value_dim = v.shape[-1]
    num_blocks = -(-seq // block_size)
    padded = num_blocks * block_size
    lookback = -(-(window - 1) // block_size)  # previous key blocks a query block needs
    q = jnp.pad(q, ((0, 0), (0, 0), (0, padded - seq), (0, 0)))
    if earlier is None:
        key_pad = ((0, 0), (0, 0), (lookback * block_size, padded - seq), (0, 0))
        k, v = jnp.pad(k, key_pad), jnp.pad(v, key_pad)
    else:
        key_pad = ((0, 0), (0, 0), (lookback * block_size - (window - 1), padded - seq), (0, 0))
        k = jnp.pad(jnp.concatenate([earlier[0], k], axis=2), key_pad)
        v = jnp.pad(jnp.concatenate([earlier[1], v], axis=2), key_pad)
    k = k.reshape(batch, heads, lookback + num_blocks, block_size, head_dim)
    v = v.reshape(batch, heads, lookback + num_blocks, block_size, value_dim)
    # Key block j of query block i is padded block i + j, i.e. original block i - lookback + j.
    k_seen = jnp.concatenate([k[:, :, j : j + num_blocks] for j in range(lookback + 1)], axis=3)
    v_seen = jnp.concatenate([v[:, :, j : j + num_blocks] for j in range(lookback + 1)], axis=3)
    q_blocks = q.reshape(batch, heads, num_blocks, block_size, head_dim)

    block_start = jnp.arange(num_blocks)[:, None, None] * block_size
    query_pos = block_start + jnp.arange(block_size)[None, :, None]
    key_pos = (
        block_start - lookback * block_size + jnp.arange((lookback + 1) * block_size)[None, None]
    )
    seen = key_pos >= 0
    if earlier is not None and earlier_counts is not None:  # [B, 1, blocks, 1, keys]
        seen = key_pos[None, None] >= -earlier_counts[:, None, None, None, None]
    elif earlier is not None:
        seen = seen | has_earlier
    mask = seen & (key_pos <= query_pos) & (query_pos - key_pos < window)

    scores = jnp.einsum("bhnqd,bhnkd->bhnqk", q_blocks, k_seen)
    scores = jnp.where(mask, scores, -jnp.inf)
    weights = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    out = jnp.einsum("bhnqk,bhnkd->bhnqd", weights, v_seen)
    return out.reshape(batch, heads, padded, value_dim)[:, :, :seq]


def sliding_window_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    *,
    window: int | None,
    scale: float | None = None,
    block_size: int | None = None,
    implementation: str = "auto",
) -> Float[Array, "B T H Dv"]:
    """Causal softmax attention of each query over its last ``window`` keys (itself included).

    Args:
      q: ``[B, T, H, D]`` (rotary already applied).
      k: ``[B, T, H, D]`` (rotary already applied).
      v: ``[B, T, H, Dv]``.
      window: keys seen per query including itself; ``None`` for full causal attention.
      scale: score scale, default ``D ** -0.5``.
      block_size: query/key block length (default ``min(128, window)`` for a window, 512 for
        full attention; for the kernel: the backend's default, 128 on TPU and 64 on GPU).
      implementation: ``auto`` (the Pallas kernel on TPU/GPU when it supports the arguments,
        else XLA), ``xla`` (the reference) or ``pallas`` (the kernel; interpreted on CPU).

    Returns ``[B, T, H, Dv]`` in ``v.dtype``; scores, softmax and sums in float32.
    """
    _check_inputs(q, k, v)
    _check_window(window)
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    check_implementation(implementation)
    layout = sequence_layout(q.shape[0], q.shape[1], q.shape[2])
    if layout is not None and window is not None:
        check_sequence_implementation("sliding_window_attention", implementation)
        # The kernel sees one shard's slice (its arguments are checked at that length).
        local = [layout.local_struct(x) for x in (q, k, v)]
        use_kernel = implementation != "xla" and use_pallas(
            implementation, _kernel_unsupported(*local, window, block_size), _kernel_request(q)
        )
        return window_attention_sharded(
            q, k, v, layout, window=window, scale=scale, block_size=block_size,
            use_kernel=use_kernel,
        )  # fmt: skip
    if layout is not None:
        check_sequence_implementation("full causal attention", implementation)
        return full_attention_sharded(q, k, v, layout, scale=scale, block_size=block_size)
    if implementation != "xla" and use_pallas(
        implementation, _kernel_unsupported(q, k, v, window, block_size), _kernel_request(q)
    ):
        return _pallas(q, k, v, window, scale, block_size)
    seq, head_dim = q.shape[1], q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    dtype = jnp.result_type(jnp.float32, q.dtype, k.dtype, v.dtype)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2).astype(dtype) for x in (q, k, v))
    qh = qh * jnp.asarray(scale, dtype)

    if window is not None and window < seq:
        block = block_size if block_size is not None else min(DEFAULT_BLOCK_SIZE, window)
        out = _windowed_blocks(qh, kh, vh, window, block)
    else:
        block = block_size if block_size is not None else FULL_ATTENTION_BLOCK_SIZE
        out = _full_direct(qh, kh, vh, None) if seq <= block else _full_flash(qh, kh, vh, block)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def windowed_attention_with_history(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    earlier: tuple[Float[Array, "B W H D"], Float[Array, "B W H Dv"]] | None,
    has_earlier: Array,
    *,
    window: int,
    scale: float | None = None,
    block_size: int | None = None,
    earlier_counts: Int[Array, " B"] | None = None,
) -> Float[Array, "B T H Dv"]:
    """:func:`sliding_window_attention` (XLA) of a slice of a longer sequence: ``earlier`` holds
    the ``W = window - 1`` keys and values just before ``k[:, 0]`` (None when ``window`` is 1),
    which the first queries see where the boolean scalar ``has_earlier`` is true (elsewhere the
    slice is the sequence's start); with ``earlier_counts [B]`` instead, row ``b`` sees only
    the last ``earlier_counts[b]`` of them (fewer keys came before it). Returns
    ``[B, T, H, Dv]`` in ``v.dtype``."""
    _check_inputs(q, k, v)
    _check_window(window)
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    dtype = jnp.result_type(jnp.float32, q.dtype, k.dtype, v.dtype)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2).astype(dtype) for x in (q, k, v))
    qh = qh * jnp.asarray(scale, dtype)
    if earlier is not None:
        earlier = tuple(jnp.swapaxes(x, 1, 2).astype(dtype) for x in earlier)
    block = block_size if block_size is not None else min(DEFAULT_BLOCK_SIZE, window)
    out = _windowed_blocks(qh, kh, vh, window, block, earlier, has_earlier, earlier_counts)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def _kernel_unsupported(q, k, v, window, block_size) -> str | None:
    from pallas_kernels.window_attention import unsupported_reason

    backend, _ = kernel_backend()
    return unsupported_reason(
        q.shape,
        v.shape,
        window=window,
        block_size=block_size,
        backend=backend,
        dtypes=(q.dtype, k.dtype, v.dtype),
    )


def _kernel_request(q: Array) -> KernelRequest:
    dtype = jnp.dtype(q.dtype)
    return KernelRequest("window_attention", dtype, functools.partial(_probe, dtype))


def window_kernel_chosen(
    q: jax.ShapeDtypeStruct,
    v: jax.ShapeDtypeStruct,
    *,
    window: int,
    block_size: int | None,
    implementation: str,
) -> bool:
    """Whether ``implementation`` runs the Pallas window kernel on a call whose queries and keys
    have ``q``'s shape and dtype ``[B, T, H, D]`` and whose values ``v``'s ``[B, T, H, Dv]``:
    ``xla`` never, ``pallas`` always (``ValueError`` when the kernel cannot take them), ``auto``
    as :func:`jaxbased.ops.dispatch.use_pallas` decides. For callers that run the kernel on
    arrays they assemble themselves (a sequence shard's packed keys and their halo)."""
    check_implementation(implementation)
    if implementation == "xla":
        return False
    unsupported = _kernel_unsupported(q, q, v, window, block_size)
    return use_pallas(implementation, unsupported, _kernel_request(q))


def _probe(dtype: jnp.dtype, target: KernelTarget) -> None:
    """The kernel on ``target`` against the XLA path, forward and gradients, on a small problem
    of its class: 80 tokens (a partial last block on GPU), 2 heads of 32, a window of 33."""
    from pallas_kernels.window_attention import window_attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 80, 2, 32)).astype(dtype) for _ in range(3))

    def kernel(q, k, v):
        return window_attention(
            q, k, v, window=33, backend=target.backend, interpret=target.interpret
        )

    def reference(q, k, v):
        return sliding_window_attention(q, k, v, window=33, implementation="xla")

    compare_with_reference(kernel, reference, (q, k, v), dtype.name)


def _pallas(q, k, v, window, scale, block_size):
    from pallas_kernels.window_attention import window_attention

    backend, interpret = kernel_backend()

    def kernel(q, k, v):
        return window_attention(
            q,
            k,
            v,
            window=window,
            scale=scale,
            block_size=block_size,
            backend=backend,
            interpret=interpret,
        )

    partition = mesh_partition(q.shape[0], q.shape[2])
    tokens = None if partition is None else token_spec(partition)
    return shard_kernel(kernel, partition, (tokens, tokens, tokens), tokens)(q, k, v)


def fill_kv_cache(
    keys: Float[Array, "B T H D"],
    values: Float[Array, "B T H D"],
    capacity: int,
    lengths: Int[Array, " B"] | None = None,
) -> KVCache:
    """The ring buffer after a prefill of positions ``0 .. T-1`` (its last ``capacity`` tokens).

    With ``lengths [B]`` (right-padded prompts, row ``b`` valid at positions ``< lengths[b]``),
    slot ``s`` of row ``b`` holds the latest valid position ``p ≡ s (mod capacity)``:
    ``p = len - 1 - ((len - 1 - s) mod capacity)``, or -1 (empty) when ``p < 0``. Padding never
    enters the cache.

    Under a mesh that splits time (a sequence-parallel prefill) the same cache is assembled from
    the shards and comes out replicated over ``sequence``
    (:func:`jaxbased.ops.sequence_parallel_prefill.fill_kv_cache_sharded`).
    """
    layout = sequence_layout(keys.shape[0], keys.shape[1], keys.shape[2])
    if layout is not None:  # a prefill over a time-split mesh
        from jaxbased.ops.sequence_parallel_prefill import fill_kv_cache_sharded

        return fill_kv_cache_sharded(keys, values, capacity, lengths, layout)
    if lengths is not None:
        return _fill_kv_cache_ragged(keys, values, capacity, jnp.asarray(lengths, jnp.int32))
    batch, seq, heads, head_dim = keys.shape
    cache = init_kv_cache(batch, capacity, heads, head_dim, keys.dtype)
    kept = min(seq, capacity)
    positions = jnp.arange(seq - kept, seq, dtype=jnp.int32)
    slots = positions % capacity
    kept_keys = jnp.swapaxes(keys[:, seq - kept :], 1, 2)  # [B, H, kept, D]
    kept_values = jnp.swapaxes(values[:, seq - kept :], 1, 2).astype(keys.dtype)
    return KVCache(
        keys=cache.keys.at[:, :, slots].set(kept_keys),
        values=cache.values.at[:, :, slots].set(kept_values),
        slot_positions=cache.slot_positions.at[:, slots].set(positions),
    )


def _fill_kv_cache_ragged(keys: Array, values: Array, capacity: int, lengths: Array) -> KVCache:
    # A gather per slot (no scatter): slot s of row b reads position p[b, s] of the prompt.
    from jaxbased.ops.sequence_parallel_prefill import ring_buffer_positions

    seq = keys.shape[1]
    positions = ring_buffer_positions(lengths, capacity)  # [B, S], <= last, ≡ slot
    index = jnp.clip(positions, 0, seq - 1)[:, None, :, None]  # [B, 1, S, 1]
    filled = (positions >= 0)[:, None, :, None]  # empty slots hold zeros, as in init_kv_cache

    def gather(x: Array) -> Array:  # [B, T, H, D] -> [B, H, S, D]
        gathered = jnp.take_along_axis(jnp.swapaxes(x, 1, 2), index, axis=2)
        return jnp.where(filled, gathered, 0).astype(keys.dtype)

    return KVCache(keys=gather(keys), values=gather(values), slot_positions=positions)


def sliding_window_attention_step(
    q: Float[Array, "B H D"],
    k: Float[Array, "B H D"],
    v: Float[Array, "B H Dv"],
    cache: KVCache,
    position: Int[Array, " B"],
    *,
    window: int | None,
    scale: float | None = None,
    return_probabilities: bool = False,
) -> (
    tuple[Float[Array, "B H Dv"], KVCache]
    | tuple[Float[Array, "B H Dv"], KVCache, Float[Array, "B H S"]]
):
    """One decoding step: write ``k, v`` at slot ``position % capacity``, then attend.

    Args:
      q: ``[B, H, D]`` (rotary already applied at ``position``).
      k: ``[B, H, D]`` (rotary already applied at ``position``).
      v: ``[B, H, Dv]``.
      cache: the ring buffer; its capacity must be ``>= window`` (or the maximum length).
      position: ``[B]`` absolute position of the new token in each row.

    Returns the output ``[B, H, Dv]`` and the updated cache (and, with
    ``return_probabilities``, the float32 softmax weights over the slots ``[B, H, S]``, 0 on
    empty and masked slots: what an EchoAtt sharing layer reuses). Slots are updated in place: the
    write and both matrix-vector products work on a ``[B * H, S, D]`` view of the buffers, so
    that the update stays one scatter of ``B * H`` rows. (With ``[B, H, S, D]`` operands and
    ``B = 1``, XLA:CPU turns the update into a ``dynamic_update_slice``, drops the unit batch
    dimension of the products, and then duplicates the update into both shapes, copying the
    whole cache several times per step: 10x slower at 8k slots.)
    """
    _check_window(window)
    capacity = cache.slot_positions.shape[1]
    if window is not None and capacity < window:
        raise ValueError(f"cache capacity {capacity} is smaller than window={window}")
    batch, heads, head_dim = q.shape
    value_dim = v.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    position = jnp.asarray(position, jnp.int32).reshape(batch)
    slot = position % capacity
    # Row r = b * H + h of the [B*H, S, D] views; each row writes one slot.
    rows = jnp.arange(batch * heads)
    row_slot = jnp.repeat(slot, heads)
    keys = cache.keys.reshape(batch * heads, capacity, head_dim)
    values = cache.values.reshape(batch * heads, capacity, value_dim)
    keys = keys.at[rows, row_slot].set(k.reshape(-1, head_dim).astype(keys.dtype))
    values = values.at[rows, row_slot].set(v.reshape(-1, value_dim).astype(values.dtype))
    stored = cache.slot_positions.at[jnp.arange(batch), slot].set(position)
    mask = (stored >= 0) & (stored <= position[:, None])
    if window is not None:
        mask &= position[:, None] - stored < window
    row_mask = jnp.repeat(mask, heads, axis=0)  # [B*H, S]
    dtype = jnp.result_type(jnp.float32, q.dtype, keys.dtype)
    row_q = q.reshape(batch * heads, head_dim).astype(dtype) * scale
    scores = jnp.einsum("rd,rsd->rs", row_q, keys.astype(dtype))
    scores = jnp.where(row_mask, scores, -jnp.inf)
    weights = jnp.where(row_mask, jax.nn.softmax(scores, axis=-1), 0.0)
    out = jnp.einsum("rs,rsd->rd", weights, values.astype(dtype))
    cache = KVCache(
        keys=keys.reshape(cache.keys.shape),
        values=values.reshape(cache.values.shape),
        slot_positions=stored,
    )
    out = out.reshape(batch, heads, value_dim).astype(v.dtype)
    if return_probabilities:
        return out, cache, weights.reshape(batch, heads, capacity)
    return out, cache
