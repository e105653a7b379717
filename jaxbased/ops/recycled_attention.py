"""Recycled Attention: a decode policy for full softmax-attention layers.

See docs/recycled_attention.md.

Each full-attention layer keeps its whole KV cache (nothing is evicted) and, per KV head, a
*recycled set* of ``K`` cache slots. A decode step of the layer is one of two kinds:

- **full step**: attend over every cached key (exactly :func:`sliding_window_attention_step`
  with ``window=None``), then *refresh* the set: the ``K`` slots of largest selection score,
  computed from this step's attention probabilities ``p [B, H, S]``;
- **recycled step**: attend over the ``K`` slots of the set only. The new token's key and value
  go into the full cache as always, and into the set in place of its lowest-scored entry.

Selection scores (``head_selection``), for KV head ``g`` with query heads ``G g .. G g + G - 1``:

- ``first_head`` (v1): ``s_j = p[G g, j]``, the first query head of the group;
- ``group_max`` (RefreshKV): ``s_j = max_{|i - j| <= pool_size // 2} max_h p[h, i]``, the max
  over the group's query heads, then a max-pool over neighbouring positions;
- ``recent``: ``s_j = 1 + position_j``: the set is the last ``K`` positions, a local-only
  (StreamingLLM-style, without sink tokens) baseline that ignores the probabilities.

A token written on a recycled step gets score ``1 + position`` (above every probability), so
the tokens generated since the last full step are evicted last, oldest first; empty entries
(score ``-inf``) go first. With ``K`` at least the number of cached tokens the set holds every
token and a recycled step equals a full step.

Schedule, per layer: with ``n`` the steps since that layer's last full step (the prefill counts
as a full step: its last prompt token's probabilities choose the first set), step ``n`` is full
when ``n >= stride``, or, with a ``similarity_threshold`` ``s``, when ``n`` is a multiple of
``check_every`` and ``cos(q, q_full) < s`` for some row, where ``q`` is the step's query (all
heads, before rotary) and ``q_full`` that of the layer's last full step. The choice is a
``lax.cond`` on a scalar, so both kinds are compiled once and every row of a batch takes the
same kind of step.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.ops.window_attention import KVCache

#: The allowed ``head_selection`` values (docs/recycled_attention.md#head-selection).
HEAD_SELECTIONS: tuple[str, ...] = ("first_head", "group_max", "recent")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RecycledAttentionPolicy:
    """How full-attention layers decode under Recycled Attention (checked on construction).

    Attributes:
      top_k: ``K``, cache slots each KV head attends on a recycled step (>= 1; capped at the
        cache capacity, where recycled steps equal full ones).
      stride: a layer takes a full step once ``stride`` steps have passed since its last one
        (>= 1; 1: every step is full, i.e. plain full attention).
      similarity_threshold: None (no dynamic rule), or ``s`` in ``[-1, 1]``: every
        ``check_every`` steps a layer also takes a full step when the cosine similarity of its
        query to its last full step's query is below ``s``.
      check_every: steps between two similarity checks (>= 1).
      head_selection: ``first_head``, ``group_max`` (default) or ``recent``; see the module
        docstring.
      pool_size: the neighbourhood of ``group_max``'s max-pool, in positions (odd, >= 1).
    """

    top_k: int
    stride: int = 10
    similarity_threshold: float | None = None
    check_every: int = 5
    head_selection: str = "group_max"
    pool_size: int = 5

    def __post_init__(self) -> None:
        if not _is_int(self.top_k) or self.top_k < 1:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1")
        if not _is_int(self.stride) or self.stride < 1:
            raise ValueError(f"stride={self.stride!r} must be an integer >= 1")
        threshold = self.similarity_threshold
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not -1.0 <= threshold <= 1.0
        ):
            raise ValueError(
                f"similarity_threshold={threshold!r} must be a number in [-1, 1] or None"
            )
        if not _is_int(self.check_every) or self.check_every < 1:
            raise ValueError(f"check_every={self.check_every!r} must be an integer >= 1")
        if self.head_selection not in HEAD_SELECTIONS:
            raise ValueError(
                f"head_selection={self.head_selection!r} is not known; allowed: {HEAD_SELECTIONS}"
            )
        if not _is_int(self.pool_size) or self.pool_size < 1 or self.pool_size % 2 == 0:
            raise ValueError(f"pool_size={self.pool_size!r} must be an odd integer >= 1")

    @classmethod
    def local_only(cls, top_k: int) -> RecycledAttentionPolicy:
        """The local-only baseline: attend the last ``top_k`` positions, never a full step."""
        return cls(top_k=top_k, stride=2**30, head_selection="recent")

    def set_size(self, capacity: int) -> int:
        """Entries of the recycled set for a cache of ``capacity`` slots: ``min(K, capacity)``."""
        return min(self.top_k, capacity)


@flax.struct.dataclass
class RecycledKVCache:
    """A full-attention layer's decode cache under a :class:`RecycledAttentionPolicy`.

    Attributes:
      full: the layer's whole KV cache (``[B, H, S, D]`` keys and values, ``[B, S]`` positions).
      slots: ``[B, H, K]`` int32, the cache slots of the recycled set per KV head.
      scores: ``[B, H, K]`` float32, their selection scores (``-inf``: an empty entry).
      full_query: ``[B, H, D]`` float32, the query (before rotary) of the last full step.
      steps_since_full: int32 scalar, decode steps since the layer's last full step.
      full_steps: int32 scalar, full steps taken while decoding (the prefill not counted).
      policy: the policy (static: part of the pytree structure).
    """

    full: KVCache
    slots: Int[Array, "B H K"]
    scores: Float[Array, "B H K"]
    full_query: Float[Array, "B H D"]
    steps_since_full: Int[Array, ""]
    full_steps: Int[Array, ""]
    policy: RecycledAttentionPolicy = flax.struct.field(pytree_node=False)


def selection_scores(
    probabilities: Float[Array, "B Hq S"],
    slot_positions: Int[Array, "B S"],
    *,
    kv_heads: int,
    head_selection: str,
    pool_size: int = 5,
) -> Float[Array, "B Hkv S"]:
    """Per KV head, the score of every cache slot (``-inf`` for empty slots).

    ``probabilities [B, Hq, S]`` float: one query's attention probabilities per query head
    (``Hq = G * kv_heads``, zero at empty slots); ``slot_positions [B, S]``: the position in
    each slot, -1 when empty. Slots are positions (a full-attention cache), so neighbours in
    the slot axis are neighbours in the sequence. See the module docstring for the three rules.
    """
    batch, query_heads, slots = probabilities.shape
    if query_heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide the query heads {query_heads}")
    if head_selection not in HEAD_SELECTIONS:
        raise ValueError(
            f"head_selection={head_selection!r} is not known; allowed: {HEAD_SELECTIONS}"
        )
    valid = (slot_positions >= 0)[:, None, :]
    grouped = probabilities.astype(jnp.float32).reshape(batch, kv_heads, -1, slots)
    if head_selection == "first_head":
        scores = grouped[:, :, 0]
    elif head_selection == "group_max":
        scores = jnp.where(valid, grouped.max(axis=2), 0.0)
        if pool_size > 1:
            scores = jax.lax.reduce_window(
                scores,
                -jnp.inf,
                jax.lax.max,
                window_dimensions=(1, 1, pool_size),
                window_strides=(1, 1, 1),
                padding=((0, 0), (0, 0), (pool_size // 2, pool_size // 2)),
            )
    else:  # recent
        recency = 1.0 + slot_positions.astype(jnp.float32)[:, None, :]
        scores = jnp.broadcast_to(recency, (batch, kv_heads, slots))
    return jnp.where(valid, scores, -jnp.inf)


def select_recycled_slots(
    scores: Float[Array, "B H S"], set_size: int
) -> tuple[Int[Array, "B H K"], Float[Array, "B H K"]]:
    """The ``set_size`` slots of largest score per row and head (ties: the lower slot), and
    their scores, ``[B, H, K]`` int32 and float32 (``lax.top_k``)."""
    values, indices = jax.lax.top_k(scores, set_size)
    return indices.astype(jnp.int32), values


def _probabilities(q: Array, keys: Array, slot_positions: Array, scale: float) -> Array:
    """``softmax_j(scale q_h . k_hj)`` over the filled slots, float32 ``[B, H, S]``."""
    mask = (slot_positions >= 0)[:, None, :]
    scores = jnp.einsum("bhd,bhsd->bhs", q.astype(jnp.float32) * scale, keys.astype(jnp.float32))
    scores = jnp.where(mask, scores, -jnp.inf)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)


def init_recycled_cache(
    full: KVCache,
    last_query: Float[Array, "B H D"],
    last_raw_query: Float[Array, "B H D"],
    policy: RecycledAttentionPolicy,
    *,
    scale: float | None = None,
) -> RecycledKVCache:
    """The recycled cache after a prefill: the set is chosen from the attention probabilities
    of each row's last prompt token.

    ``full``: the prefilled KV cache (only each row's prompt tokens filled); ``last_query
    [B, H, D]``: that token's query, rotary applied; ``last_raw_query``: the same before rotary
    (the reference of the similarity rule).
    """
    head_dim = last_query.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    heads = full.keys.shape[1]
    probabilities = _probabilities(last_query, full.keys, full.slot_positions, scale)
    scores = selection_scores(
        probabilities,
        full.slot_positions,
        kv_heads=heads,
        head_selection=policy.head_selection,
        pool_size=policy.pool_size,
    )
    slots, set_scores = select_recycled_slots(scores, policy.set_size(full.slot_positions.shape[1]))
    return RecycledKVCache(
        full=full,
        slots=slots,
        scores=set_scores,
        full_query=last_raw_query.astype(jnp.float32),
        steps_since_full=jnp.zeros((), jnp.int32),
        full_steps=jnp.zeros((), jnp.int32),
        policy=policy,
    )


def _write(full: KVCache, k: Array, v: Array, position: Array) -> KVCache:
    """``k, v [B, H, D]`` into slot ``position % S`` of every row (in place, as in
    :func:`sliding_window_attention_step`: one scatter of ``B * H`` rows)."""
    batch, heads, capacity, head_dim = full.keys.shape
    value_dim = full.values.shape[-1]
    slot = position % capacity
    rows = jnp.arange(batch * heads)
    row_slot = jnp.repeat(slot, heads)
    keys = full.keys.reshape(batch * heads, capacity, head_dim)
    values = full.values.reshape(batch * heads, capacity, value_dim)
    keys = keys.at[rows, row_slot].set(k.reshape(-1, head_dim).astype(keys.dtype))
    values = values.at[rows, row_slot].set(v.reshape(-1, value_dim).astype(values.dtype))
    return KVCache(
        keys=keys.reshape(full.keys.shape),
        values=values.reshape(full.values.shape),
        slot_positions=full.slot_positions.at[jnp.arange(batch), slot].set(position),
    )


def query_similarity(
    query: Float[Array, "B H D"], reference: Float[Array, "B H D"]
) -> Float[Array, " B"]:
    """Cosine similarity per row of the two queries, all heads flattened into one vector
    (float32; 1 where either is zero)."""
    a = query.reshape(query.shape[0], -1).astype(jnp.float32)
    b = reference.reshape(reference.shape[0], -1).astype(jnp.float32)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    dot = jnp.sum(a * b, axis=-1)
    return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 1.0)


def full_step_due(cache: RecycledKVCache, raw_query: Float[Array, "B H D"]) -> tuple[Array, Array]:
    """Whether this step is a full one (bool scalar), and the steps since the last full step
    counting this one (int32 scalar)."""
    policy = cache.policy
    steps = cache.steps_since_full + 1
    due = steps >= policy.stride
    if policy.similarity_threshold is not None:
        similarity = query_similarity(raw_query, cache.full_query)
        checked = steps % policy.check_every == 0
        due = due | (checked & jnp.any(similarity < policy.similarity_threshold))
    return due, steps


def recycled_attention_step(
    q: Float[Array, "B H D"],
    k: Float[Array, "B H D"],
    v: Float[Array, "B H Dv"],
    raw_query: Float[Array, "B H D"],
    cache: RecycledKVCache,
    position: Int[Array, " B"],
    *,
    scale: float | None = None,
) -> tuple[Float[Array, "B H Dv"], RecycledKVCache]:
    """One decode step of a full-attention layer under the cache's policy.

    Args:
      q: ``[B, H, D]``, rotary applied at ``position``.
      k: ``[B, H, D]``, rotary applied at ``position``.
      v: ``[B, H, Dv]``.
      raw_query: ``[B, H, D]``, the query before rotary (for the similarity rule).
      cache: the layer's :class:`RecycledKVCache`.
      position: ``[B]`` int32, the new token's position in each row.

    Returns the output ``[B, H, Dv]`` (v's dtype) and the new cache. The new ``k, v`` are
    written into the full cache outside the ``lax.cond``, so that the branches only read the
    big buffers and return the small set (no copy of the cache per step).
    """
    batch, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    policy = cache.policy
    position = jnp.asarray(position, jnp.int32).reshape(batch)
    full = _write(cache.full, k, v, position)
    capacity = full.slot_positions.shape[1]
    do_full, steps = full_step_due(cache, raw_query)
    dtype = jnp.result_type(jnp.float32, q.dtype, full.keys.dtype)

    def full_step(_: None) -> tuple[Array, ...]:
        # The arithmetic of sliding_window_attention_step(window=None), plus the refresh.
        mask = (full.slot_positions >= 0) & (full.slot_positions <= position[:, None])
        row_mask = jnp.repeat(mask, heads, axis=0)
        keys = full.keys.reshape(batch * heads, capacity, head_dim)
        values = full.values.reshape(batch * heads, capacity, -1)
        row_q = q.reshape(batch * heads, head_dim).astype(dtype) * scale
        logits = jnp.einsum("rd,rsd->rs", row_q, keys.astype(dtype))
        logits = jnp.where(row_mask, logits, -jnp.inf)
        weights = jnp.where(row_mask, jax.nn.softmax(logits, axis=-1), 0.0)
        out = jnp.einsum("rs,rsd->rd", weights, values.astype(dtype))
        scores = selection_scores(
            weights.reshape(batch, heads, capacity),
            full.slot_positions,
            kv_heads=heads,
            head_selection=policy.head_selection,
            pool_size=policy.pool_size,
        )
        slots, set_scores = select_recycled_slots(scores, cache.slots.shape[-1])
        return (
            out.reshape(batch, heads, -1),
            slots,
            set_scores,
            raw_query.astype(jnp.float32),
            jnp.zeros((), jnp.int32),
            cache.full_steps + 1,
        )

    def recycled_step(_: None) -> tuple[Array, ...]:
        # The new token replaces the lowest-scored entry of each head's set.
        evicted = jnp.argmin(cache.scores, axis=-1)  # [B, H]
        row = jnp.arange(batch)[:, None]
        head = jnp.arange(heads)[None, :]
        new_slot = jnp.broadcast_to((position % capacity)[:, None], (batch, heads))
        slots = cache.slots.at[row, head, evicted].set(new_slot)
        new_score = jnp.broadcast_to(1.0 + position.astype(jnp.float32)[:, None], (batch, heads))
        set_scores = cache.scores.at[row, head, evicted].set(new_score)
        index = slots[..., None]  # [B, H, K, 1]
        keys = jnp.take_along_axis(full.keys, index, axis=2).astype(dtype)
        values = jnp.take_along_axis(full.values, index, axis=2).astype(dtype)
        mask = set_scores > -jnp.inf
        logits = jnp.einsum("bhd,bhkd->bhk", q.astype(dtype) * scale, keys)
        logits = jnp.where(mask, logits, -jnp.inf)
        weights = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
        out = jnp.einsum("bhk,bhkd->bhd", weights, values)
        return out, slots, set_scores, cache.full_query, steps, cache.full_steps

    out, slots, set_scores, full_query, steps, full_steps = jax.lax.cond(
        do_full, full_step, recycled_step, None
    )
    new_cache = RecycledKVCache(
        full=full,
        slots=slots,
        scores=set_scores,
        full_query=full_query,
        steps_since_full=steps,
        full_steps=full_steps,
        policy=policy,
    )
    return out.astype(v.dtype), new_cache


__all__ = [
    "HEAD_SELECTIONS",
    "RecycledAttentionPolicy",
    "RecycledKVCache",
    "full_step_due",
    "init_recycled_cache",
    "query_similarity",
    "recycled_attention_step",
    "select_recycled_slots",
    "selection_scores",
]
