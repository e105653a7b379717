"""Core Context Aware attention (CCA-Attention): pooled core tokens of past groups and a local
window under one softmax; see docs/mixers/cca_attention.md.

Keys and values are those of full attention (``qkv_proj``, rotary, ``out_proj``: the
``attention`` mixer's parameters, so a Transformer++ checkpoint's attention layers load
unchanged). Tokens ``[n g, (n + 1) g)`` form group ``n`` (``g = group_size``); once the group is
complete its keys and values are pooled, per head, into one core key and value, weighted by the
softmax of the group's last query against the group's keys:

    w_j = softmax_{j in group n}(scale * q_{(n+1)g-1} . k_j),   K_n = sum_j w_j k_j,
    V_n = sum_j w_j v_j

Query ``i`` (0-based) sees the ``c_i = max(0, floor((i + 1 - s) / g))`` core tokens of the groups
that end before its last ``s = local_window`` tokens, and the raw keys ``c_i g .. i`` (between
``s`` and ``s + g - 1`` of them once ``i >= s - 1``; all of ``0 .. i`` before). Every earlier token
is covered exactly once, by its group's core token or as a raw key, under ONE softmax over both:

    y_i = softmax([scale * q_i . K_{0 .. c_i - 1}; scale * q_i . k_{c_i g .. i}]) [V; v]

Rotary rotates every query and key at its own position before pooling, so a core key is the
pooling-weighted mix of rotated keys and its score with any query is the weighted mean of that
query's scores with the group's keys (docs/mixers/cca_attention.md#rotary-and-core-keys).

Decode cache (:class:`CCACache`): a ring buffer of the last ``s + g`` rotated keys and values and
one core key/value slot per group that ``max_len`` can complete (``floor(max_len / g)``).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxbased.layers.attention import AttentionConfig, SlidingWindowAttention
from jaxbased.layers.mixer import MixerContext, require_positive_int
from jaxbased.ops.sequence_parallel import sequence_layout
from jaxbased.ops.sequence_parallel_attention import cca_attention_sharded
from jaxbased.ops.window_attention import KVCache, fill_kv_cache, init_kv_cache


@dataclasses.dataclass(frozen=True)
class CCAAttentionConfig(AttentionConfig):
    """The ``cca_attention`` mixer: ``attention``'s fields (heads, rotary) plus the grouping.

    Attributes:
      group_size: tokens ``g`` pooled into one core key and value (1: every token is its own
        core token, which is full causal attention).
      local_window: raw keys ``s`` a query sees at least, itself included, before the core
        tokens take over (``>= group_size``).
      block_size: queries per block of the forward pass (memory ``~ block * (T / g + s + g)``
        per head; the result does not depend on it).
    """

    group_size: int = 16
    local_window: int = 256
    block_size: int = 128

    def check(self) -> None:
        super().check()
        require_positive_int(self, "group_size", "local_window", "block_size")
        if self.local_window < self.group_size:
            raise ValueError(
                f"local_window={self.local_window} must be >= group_size={self.group_size}: "
                "a query's raw keys reach back to where complete groups end"
            )

    def core_slots(self, max_len: int) -> int:
        """Core key/value slots of a decode cache for ``max_len`` tokens: the groups they can
        complete, ``floor(max_len / g)`` (at least one slot)."""
        return max(1, max_len // self.group_size)

    def ring_slots(self) -> int:
        """Raw key/value slots of the decode cache: ``local_window + group_size``."""
        return self.local_window + self.group_size


@flax.struct.dataclass
class CCACache:
    """Decode state of a CCA layer.

    local: ring buffer of the last ``s + g`` rotated keys and values
      (:class:`~jaxbased.ops.KVCache`, ``[B, H, s + g, D]``, slot positions ``[B, s + g]``).
    core_keys, core_values: ``[B, H, M, D]``, the pooled key and value of group ``n`` in slot
      ``n`` (zeros until the group completes; ``M = floor(max_len / g)``).
    """

    local: KVCache
    core_keys: Float[Array, "B H M D"]
    core_values: Float[Array, "B H M D"]


def visible_core_tokens(
    positions: Int[Array, " *shape"], group_size: int, local_window: int
) -> Int[Array, " *shape"]:
    """``c_i = max(0, floor((i + 1 - s) / g))``: core tokens query ``i`` sees; its raw keys are
    ``c_i g .. i``."""
    return jnp.maximum(0, (positions + 1 - local_window) // group_size)


def pool_groups(
    q: Float[Array, "B H T D"],
    k: Float[Array, "B H T D"],
    v: Float[Array, "B H T Dv"],
    group_size: int,
    scale: float,
) -> tuple[Float[Array, "B H M D"], Float[Array, "B H M Dv"]]:
    """Core keys and values of the ``M = ceil(T / g)`` groups, head-major: group ``n`` pools
    ``k, v`` at ``n g .. (n + 1) g - 1`` weighted by ``softmax(scale * q_last . k)`` with
    ``q_last`` the query at ``(n + 1) g - 1``. A trailing partial group is pooled over zero
    padding (no query sees it: only complete groups become visible). Float32 or wider in, same
    out."""
    batch, heads, seq, head_dim = k.shape
    groups = -(-seq // group_size)
    pad = ((0, 0), (0, 0), (0, groups * group_size - seq), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    grouped_k = k.reshape(batch, heads, groups, group_size, head_dim)
    grouped_v = v.reshape(batch, heads, groups, group_size, v.shape[-1])
    last_queries = q[:, :, group_size - 1 :: group_size]  # [B, H, M, D]
    scores = jnp.einsum("bhmd,bhmgd->bhmg", last_queries, grouped_k) * scale
    weights = jax.nn.softmax(scores, axis=-1)
    return (
        jnp.einsum("bhmg,bhmgd->bhmd", weights, grouped_k),
        jnp.einsum("bhmg,bhmgd->bhmd", weights, grouped_v),
    )


def _one_softmax(core_scores, core_mask, local_scores, local_mask, core_values, local_values):
    """Softmax over the concatenated core and local scores (masked), applied to the values."""
    scores = jnp.concatenate([core_scores, local_scores], axis=-1)
    mask = jnp.concatenate([core_mask, local_mask], axis=-1)
    scores = jnp.where(mask, scores, -jnp.inf)
    weights = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    core_weights, local_weights = jnp.split(weights, [core_scores.shape[-1]], axis=-1)
    return jnp.einsum("...qm,...md->...qd", core_weights, core_values) + jnp.einsum(
        "...qk,...kd->...qd", local_weights, local_values
    )


def cca_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    *,
    group_size: int,
    local_window: int,
    scale: float | None = None,
    block_size: int = 128,
) -> Float[Array, "B T H Dv"]:
    """Causal CCA attention (module docstring): core tokens before the local window plus the
    local raw keys, one softmax.

    Args:
      q: ``[B, T, H, D]``, rotary already applied.
      k: ``[B, T, H, D]``, rotary already applied.
      v: ``[B, T, H, Dv]``.
      group_size: ``g``, tokens per core token.
      local_window: ``s >= g``, raw keys a query sees at least.
      scale: score scale of both the pooling and the attention, default ``D ** -0.5``.
      block_size: queries per block; a block of queries starting at ``p`` reads every core token
        and the raw keys ``p - (s + g - 2) .. p + block - 1``.

    Returns ``[B, T, H, Dv]`` in ``v.dtype``; scores, softmax and sums in float32 or wider.
    Work ``O(T (T / g + s + g))``, memory ``O(block (T / g + s + g))`` per head. Under a mesh
    that splits time (``sequence > 1``) it runs
    :func:`~jaxbased.ops.sequence_parallel_attention.cca_attention_sharded`.
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, dim] alike; got {q.shape}, {k.shape}, {v.shape}"
        )
    batch, seq, heads, head_dim = q.shape
    layout = sequence_layout(batch, seq, heads)
    if layout is not None:
        return cca_attention_sharded(
            q,
            k,
            v,
            layout,
            group_size=group_size,
            local_window=local_window,
            scale=scale,
            block_size=block_size,
        )
    scale = head_dim**-0.5 if scale is None else scale
    dtype = jnp.result_type(jnp.float32, q.dtype, k.dtype, v.dtype)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2).astype(dtype) for x in (q, k, v))
    core_keys, core_values = pool_groups(qh, kh, vh, group_size, scale)
    lookback = local_window + group_size - 2  # raw keys before the first query it may see
    history = ((0, 0), (0, 0), (lookback, 0), (0, 0))  # zeros at positions < 0, never seen
    out = attend_with_history(
        qh * jnp.asarray(scale, dtype),
        jnp.pad(kh, history),
        jnp.pad(vh, history),
        core_keys,
        core_values,
        jnp.asarray(0),
        group_size=group_size,
        local_window=local_window,
        block_size=block_size,
    )
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def attend_with_history(
    queries: Float[Array, "B H L D"],
    keys: Float[Array, "B H W D"],
    values: Float[Array, "B H W Dv"],
    core_keys: Float[Array, "B H M D"],
    core_values: Float[Array, "B H M Dv"],
    query_start: Array,
    *,
    group_size: int,
    local_window: int,
    block_size: int,
) -> Float[Array, "B H L Dv"]:
    """CCA attention of ``L`` head-major queries (already scaled) at absolute positions
    ``query_start .. query_start + L - 1``, the core of the whole unsharded op and of each
    sequence shard.

    ``keys, values``: the raw keys of positions ``query_start - (s + g - 2) .. query_start + L
    - 1`` (``W = s + g - 2 + L``); those at negative positions are never seen.
    ``core_keys, core_values``: the core tokens of groups ``0 .. M - 1`` of the sequence (group
    ``n`` visible to query ``i`` when ``n < c_i``). A block of queries starting at ``p`` reads
    every core token and the raw keys ``p - (s + g - 2) .. p + block - 1``. Float32 or wider.
    """
    batch, heads, seq, _ = queries.shape
    core_index = jnp.arange(core_keys.shape[2])
    block = min(block_size, seq)
    num_blocks = -(-seq // block)
    padded = num_blocks * block
    lookback = local_window + group_size - 2
    queries = jnp.pad(queries, ((0, 0), (0, 0), (0, padded - seq), (0, 0)))
    key_pad = ((0, 0), (0, 0), (0, padded - seq), (0, 0))
    keys, values = jnp.pad(keys, key_pad), jnp.pad(values, key_pad)

    def attend_block(index: Array) -> Array:
        start = index * block
        block_queries = jax.lax.dynamic_slice_in_dim(queries, start, block, axis=2)
        block_keys = jax.lax.dynamic_slice_in_dim(keys, start, lookback + block, axis=2)
        block_values = jax.lax.dynamic_slice_in_dim(values, start, lookback + block, axis=2)
        query_pos = query_start + start + jnp.arange(block)[:, None]  # [Q, 1]
        key_pos = query_start + start - lookback + jnp.arange(lookback + block)[None, :]
        visible = visible_core_tokens(query_pos, group_size, local_window)  # [Q, 1]
        local_mask = (key_pos >= visible * group_size) & (key_pos <= query_pos)
        core_mask = core_index[None, :] < visible
        core_scores = jnp.einsum("bhqd,bhmd->bhqm", block_queries, core_keys)
        local_scores = jnp.einsum("bhqd,bhkd->bhqk", block_queries, block_keys)
        return _one_softmax(
            core_scores, core_mask, local_scores, local_mask, core_values, block_values
        )  # [B, H, Q, Dv]

    if num_blocks == 1:
        out = attend_block(jnp.asarray(0))
    else:
        out = jax.lax.map(attend_block, jnp.arange(num_blocks))  # [n, B, H, Q, Dv]
        out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, padded, -1)
    return out[:, :, :seq]


def fill_core_cache(
    core_keys: Float[Array, "B H G D"],
    core_values: Float[Array, "B H G Dv"],
    slots: int,
    group_size: int,
    lengths: Int[Array, " B"],
) -> tuple[Float[Array, "B H M D"], Float[Array, "B H M Dv"]]:
    """The first ``slots`` core tokens of a prefill, zero where row ``b`` did not complete the
    group (``n >= floor(lengths[b] / g)``: pooled over padding)."""
    groups = core_keys.shape[2]
    pad = ((0, 0), (0, 0), (0, max(0, slots - groups)), (0, 0))
    core_keys, core_values = (jnp.pad(x, pad)[:, :, :slots] for x in (core_keys, core_values))
    complete = jnp.arange(slots)[None, :] < (lengths // group_size)[:, None]  # [B, M]
    complete = complete[:, None, :, None]
    return jnp.where(complete, core_keys, 0), jnp.where(complete, core_values, 0)


def cca_attention_step(
    q: Float[Array, "B H D"],
    k: Float[Array, "B H D"],
    v: Float[Array, "B H Dv"],
    cache: CCACache,
    position: Int[Array, " B"],
    *,
    group_size: int,
    local_window: int,
    scale: float | None = None,
) -> tuple[Float[Array, "B H Dv"], CCACache]:
    """One decoding step at ``position [B]`` (``q, k`` rotated there).

    Writes ``k, v`` into ring slot ``position % (s + g)``; when the token completes its group
    (``(position + 1) % g == 0``) pools the group's ``g`` keys and values, still in the ring,
    with this token's query into core slot ``(position + 1) / g - 1``; then attends to the visible
    core tokens and the raw keys ``c g .. position`` under one softmax.
    """
    batch, _, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    local = cache.local
    capacity = local.slot_positions.shape[1]
    if capacity < local_window + group_size - 1:
        raise ValueError(
            f"ring buffer of {capacity} slots cannot hold local_window + group_size - 1 = "
            f"{local_window + group_size - 1} keys"
        )
    position = jnp.asarray(position, jnp.int32).reshape(batch)
    rows = jnp.arange(batch)
    slot = position % capacity
    keys = local.keys.at[rows, :, slot].set(k.astype(local.keys.dtype))
    values = local.values.at[rows, :, slot].set(v.astype(local.values.dtype))
    stored = local.slot_positions.at[rows, slot].set(position)

    dtype = jnp.result_type(jnp.float32, q.dtype, keys.dtype)
    query = q.astype(dtype)
    # Pool the group this token completes (computed for every row, kept where it completes).
    group_slots = (position[:, None] - group_size + 1 + jnp.arange(group_size)) % capacity
    group_keys = jnp.take_along_axis(keys, group_slots[:, None, :, None], axis=2).astype(dtype)
    group_values = jnp.take_along_axis(values, group_slots[:, None, :, None], axis=2)
    weights = jax.nn.softmax(jnp.einsum("bhd,bhgd->bhg", query, group_keys) * scale, axis=-1)
    pooled_key = jnp.einsum("bhg,bhgd->bhd", weights, group_keys)
    pooled_value = jnp.einsum("bhg,bhgd->bhd", weights, group_values.astype(dtype))
    core_slots = cache.core_keys.shape[2]
    completes = ((position + 1) % group_size == 0)[:, None, None]
    group = jnp.clip((position + 1) // group_size - 1, 0, core_slots - 1)
    old_key, old_value = cache.core_keys[rows, :, group], cache.core_values[rows, :, group]
    core_keys = cache.core_keys.at[rows, :, group].set(
        jnp.where(completes, pooled_key.astype(old_key.dtype), old_key)
    )
    core_values = cache.core_values.at[rows, :, group].set(
        jnp.where(completes, pooled_value.astype(old_value.dtype), old_value)
    )

    visible = visible_core_tokens(position, group_size, local_window)[:, None]  # [B, 1]
    core_mask = (jnp.arange(core_slots)[None, :] < visible)[:, None, None, :]
    local_mask = (stored >= visible * group_size) & (stored >= 0) & (stored <= position[:, None])
    local_mask = local_mask[:, None, None, :]
    scaled = (query * scale)[:, :, None, :]  # [B, H, 1, D]
    out = _one_softmax(
        jnp.einsum("bhqd,bhmd->bhqm", scaled, core_keys.astype(dtype)),
        core_mask,
        jnp.einsum("bhqd,bhkd->bhqk", scaled, keys.astype(dtype)),
        local_mask,
        core_values.astype(dtype),
        values.astype(dtype),
    )[:, :, 0]
    cache = CCACache(
        local=KVCache(keys=keys, values=values, slot_positions=stored),
        core_keys=core_keys,
        core_values=core_values,
    )
    return out.astype(v.dtype), cache


class CCAAttention(SlidingWindowAttention):
    """CCA-Attention: ``[B, T, d] -> [B, T, d]`` with the ``attention`` mixer's parameters
    (``qkv_proj [d, 3, H, D]``, ``out_proj [H, D, d]``, no biases) and rotary.

    Attributes:
      config: heads, rotary, ``group_size``, ``local_window``, ``block_size``.
      context: model width, dtype, init (``implementation`` is not read: XLA only).
    """

    config: CCAAttentionConfig
    context: MixerContext

    @property
    def window(self) -> int | None:
        return None

    @property
    def accepts_recycled_attention(self) -> bool:
        """Recycled Attention is for plain full attention, not CCA's pooled cache."""
        return False

    def _attention(self, q: Array, k: Array, v: Array) -> Array:
        config = self.config
        return cca_attention(
            q,
            k,
            v,
            group_size=config.group_size,
            local_window=config.local_window,
            block_size=config.block_size,
        )

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], CCACache]:
        """Forward over a prompt at positions ``0 .. T-1``; also returns the cache: the ring
        buffer of its last ``s + g`` (valid) tokens and the core tokens of its complete groups.

        ``lengths [B]``: valid tokens per row of right-padded prompts; padding never enters the
        cache (ring slots keep position -1, core slots of groups a row did not complete are 0).
        """
        config = self.config
        q, k, v = self._project(x)
        y = self.out_proj(self._attention(q, k, v))
        batch, seq = x.shape[:2]
        lengths = (
            jnp.full((batch,), seq, jnp.int32)
            if lengths is None
            else jnp.asarray(lengths, jnp.int32)
        )
        head_dim = q.shape[-1]
        dtype = jnp.result_type(jnp.float32, q.dtype)
        core_keys, core_values = pool_groups(
            *(jnp.swapaxes(part, 1, 2).astype(dtype) for part in (q, k, v)),
            config.group_size,
            head_dim**-0.5,
        )
        core_keys, core_values = fill_core_cache(
            core_keys, core_values, config.core_slots(max_len), config.group_size, lengths
        )
        local = fill_kv_cache(k, v, config.ring_slots(), lengths)
        cache = CCACache(
            local=local,
            core_keys=core_keys.astype(local.keys.dtype),
            core_values=core_values.astype(local.keys.dtype),
        )
        return y, cache

    def decode_step(
        self, x: Float[Array, "B D"], cache: CCACache, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], CCACache]:
        """One token per row at absolute ``position [B]``."""
        config = self.config
        qkv = self.qkv_proj(x)  # [B, 3, H, D]
        rows_positions = position[:, None]
        q = self._rotate(qkv[:, None, 0], rows_positions)[:, 0]
        k = self._rotate(qkv[:, None, 1], rows_positions)[:, 0]
        y, cache = cca_attention_step(
            q,
            k,
            qkv[:, 2],
            cache,
            position,
            group_size=config.group_size,
            local_window=config.local_window,
        )
        return self.out_proj(y), cache

    def init_cache(self, batch_size: int, max_len: int) -> CCACache:
        config, context = self.config, self.context
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be >= 1 for the core-token cache")
        heads, head_dim = config.heads, config.head_dim(context.d_model)
        core_shape = (batch_size, heads, config.core_slots(max_len), head_dim)
        return CCACache(
            local=init_kv_cache(
                batch_size, config.ring_slots(), heads, head_dim, context.compute_dtype
            ),
            core_keys=jnp.zeros(core_shape, context.compute_dtype),
            core_values=jnp.zeros(core_shape, context.compute_dtype),
        )

    def flops(self, seq_len: int) -> float:
        """Projections, pooling (one score and two weighted sums per token and channel) and
        ``q·k`` and ``p·v`` over the keys a query sees on average, exact for causal queries:
        ``mean_i(c_i + i - c_i g + 1)``."""
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        config, d = self.config, self.context.d_model
        positions = np.arange(seq_len)
        visible = np.maximum(0, (positions + 1 - config.local_window) // config.group_size)
        keys_seen = float(np.mean(visible + positions - visible * config.group_size + 1))
        return 2 * d * 3 * d + 2 * d * d + 6 * d + 4 * keys_seen * d
