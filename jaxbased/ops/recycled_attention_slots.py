"""Recycled Attention with a schedule per row, for continuous batching (docs/serving.md).

:func:`jaxbased.ops.recycled_attention.recycled_attention_step` keeps one step counter per
layer, so every row of a batch takes the same kind of step: right for ``generate``, whose rows
start together. A serving engine's slots start at different times, and each must follow its own
schedule, or a request's tokens would depend on what else is running. Here each row has its
own counter and its own last full query, and a step is decided per row:

- row ``b`` is **due** when ``force_full[b]``, or ``n_b >= stride``, or (with a
  ``similarity_threshold`` ``s``) ``n_b`` is a multiple of ``check_every`` and
  ``cos(q_b, q_full_b) < s``; ``n_b`` counts the steps since that row's last full step,
  this one included;
- the full-attention pass over the whole cache is computed (a ``lax.cond`` on a scalar) only
  when some row that counts is due: ``any(due & (active | force_full))``. Rows that are not
  ``active`` (the engine's free slots) never cause one;
- in that pass a due row takes the full step (its output over every key, a refreshed set, its
  counter back to 0) and every other row its recycled step, exactly as if the pass had not
  happened; the recycled steps of all rows are computed in it too (``O(K)`` per row, small
  next to the full pass). Without a due row, every row takes its recycled step.

So a row's outputs are those of ``generate`` on that row alone, whatever the other rows do, and
the price is that the full pass runs whenever *any* active row is due: with ``N`` active rows
at unrelated phases and stride ``S``, on about ``1 - (1 - 1/S)^N`` of the steps, not ``1/S``.

The flags ``active`` and ``force_full`` are inputs that the caller sets before a step
(:func:`set_row_flags`): the engine marks its occupied slots ``active`` on every decode step,
and ``force_full`` makes every step of a chunked prefill full, so that the set after a prompt's
last token is chosen from that token's probabilities, as after a whole-prompt prefill.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxbased.ops.recycled_attention import (
    RecycledAttentionPolicy,
    RecycledKVCache,
    attention_over_set,
    full_attention_with_refresh,
    query_similarity,
    write_token,
)
from jaxbased.ops.window_attention import KVCache


@flax.struct.dataclass
class SlotRecycledKVCache:
    """A full-attention layer's decode cache under a policy, with a schedule per row.

    Attributes:
      full: the layer's whole KV cache (``[B, H, S, D]`` keys and values, ``[B, S]`` positions).
      slots: ``[B, H, K]`` int32, the cache slots of the recycled set per KV head.
      scores: ``[B, H, K]`` float32, their selection scores (``-inf``: an empty entry).
      full_query: ``[B, H, D]`` float32, each row's query (before rotary) at its last full step.
      steps_since_full: ``[B]`` int32, decode steps since each row's last full step.
      full_steps: ``[B]`` int32, full steps each row took while decoding.
      active: ``[B]`` bool, rows whose schedule may cause the full pass (set by the caller).
      force_full: ``[B]`` bool, rows whose next step is full whatever the schedule (set by the
        caller).
      policy: the policy (static: part of the pytree structure).

    A scanned model stacks every leaf ``[repeats, ...]`` over its unit's repeats.
    """

    full: KVCache
    slots: Int[Array, "B H K"]
    scores: Float[Array, "B H K"]
    full_query: Float[Array, "B H D"]
    steps_since_full: Int[Array, " B"]
    full_steps: Int[Array, " B"]
    active: Bool[Array, " B"]
    force_full: Bool[Array, " B"]
    policy: RecycledAttentionPolicy = flax.struct.field(pytree_node=False)


def _row_shape(full: KVCache) -> tuple[int, ...]:
    """``[..., B]``: the shape of a per-row leaf (with a scanned model's leading axis)."""
    return full.slot_positions.shape[:-1]


def slot_cache_from_prefill(cache: RecycledKVCache) -> SlotRecycledKVCache:
    """The per-row form of a prefilled :class:`RecycledKVCache`: the same set and query, each
    row's counters those of the layer (0 after a prefill), neither flag set."""
    rows = _row_shape(cache.full)

    def per_row(counter: Array) -> Array:
        return jnp.broadcast_to(counter[..., None], rows).astype(jnp.int32)

    return SlotRecycledKVCache(
        full=cache.full,
        slots=cache.slots,
        scores=cache.scores,
        full_query=cache.full_query,
        steps_since_full=per_row(cache.steps_since_full),
        full_steps=per_row(cache.full_steps),
        active=jnp.zeros(rows, bool),
        force_full=jnp.zeros(rows, bool),
        policy=cache.policy,
    )


def empty_slot_cache(full: KVCache, policy: RecycledAttentionPolicy) -> SlotRecycledKVCache:
    """An empty per-row cache around the empty KV cache ``full`` (every set entry empty:
    slot 0, score ``-inf``; zero queries and counters; no flag set)."""
    keys = full.keys  # [..., B, H, S, D]
    *lead, heads, capacity, head_dim = keys.shape
    set_shape = (*lead, heads, policy.set_size(capacity))
    rows = _row_shape(full)
    return SlotRecycledKVCache(
        full=full,
        slots=jnp.zeros(set_shape, jnp.int32),
        scores=jnp.full(set_shape, -jnp.inf, jnp.float32),
        full_query=jnp.zeros((*lead, heads, head_dim), jnp.float32),
        steps_since_full=jnp.zeros(rows, jnp.int32),
        full_steps=jnp.zeros(rows, jnp.int32),
        active=jnp.zeros(rows, bool),
        force_full=jnp.zeros(rows, bool),
        policy=policy,
    )


def _is_layer_cache(node: Any) -> bool:
    return isinstance(node, RecycledKVCache | SlotRecycledKVCache)


def to_slot_caches(tree: Any) -> Any:
    """``tree`` (e.g. a ``ModelCache``) with every :class:`RecycledKVCache` replaced by its
    per-row form (:func:`slot_cache_from_prefill`); other nodes unchanged."""

    def convert(node: Any) -> Any:
        return slot_cache_from_prefill(node) if isinstance(node, RecycledKVCache) else node

    return jax.tree.map(convert, tree, is_leaf=_is_layer_cache)


def set_row_flags(
    tree: Any,
    *,
    active: Bool[Array, " B"] | None = None,
    force_full: Bool[Array, " B"] | bool | None = None,
    clear_full_steps: bool = False,
) -> Any:
    """``tree`` with the flags of every :class:`SlotRecycledKVCache` set: ``active`` and
    ``force_full`` (``[B]`` bool or a bool for every row; None leaves a flag as it is, and a
    scanned model's stacked flags take the same rows in every repeat), and with
    ``clear_full_steps`` the full-step counts set to 0."""

    def update(node: Any) -> Any:
        if not isinstance(node, SlotRecycledKVCache):
            return node
        shape = node.active.shape
        changes = {}
        if active is not None:
            changes["active"] = jnp.broadcast_to(jnp.asarray(active, bool), shape)
        if force_full is not None:
            changes["force_full"] = jnp.broadcast_to(jnp.asarray(force_full, bool), shape)
        if clear_full_steps:
            changes["full_steps"] = jnp.zeros_like(node.full_steps)
        return node.replace(**changes)

    return jax.tree.map(update, tree, is_leaf=_is_layer_cache)


def rows_due(
    cache: SlotRecycledKVCache, raw_query: Float[Array, "B H D"]
) -> tuple[Bool[Array, " B"], Int[Array, " B"]]:
    """Per row, whether its step is full by its own schedule or ``force_full`` (``[B]``
    bool), and its steps since its last full step counting this one (``[B]`` int32)."""
    policy = cache.policy
    steps = cache.steps_since_full + 1
    due = (steps >= policy.stride) | cache.force_full
    if policy.similarity_threshold is not None:
        similarity = query_similarity(raw_query, cache.full_query)
        checked = steps % policy.check_every == 0
        due = due | (checked & (similarity < policy.similarity_threshold))
    return due, steps


def slot_recycled_attention_step(
    q: Float[Array, "B H D"],
    k: Float[Array, "B H D"],
    v: Float[Array, "B H Dv"],
    raw_query: Float[Array, "B H D"],
    cache: SlotRecycledKVCache,
    position: Int[Array, " B"],
    *,
    scale: float | None = None,
) -> tuple[Float[Array, "B H Dv"], SlotRecycledKVCache]:
    """One decode step of a full-attention layer, each row on its own schedule (module
    docstring).

    Args:
      q: ``[B, H, D]``, rotary applied at ``position``.
      k: ``[B, H, D]``, rotary applied at ``position``.
      v: ``[B, H, Dv]``.
      raw_query: ``[B, H, D]``, the query before rotary (for the similarity rule).
      cache: the layer's :class:`SlotRecycledKVCache`.
      position: ``[B]`` int32, the new token's position in each row.

    Returns the output ``[B, H, Dv]`` (v's dtype) and the new cache (flags unchanged). As in
    the batch-wide step, the new ``k, v`` are written outside the ``lax.cond``, so the
    branches only read the big buffers.
    """
    batch, _, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    policy = cache.policy
    position = jnp.asarray(position, jnp.int32).reshape(batch)
    full = write_token(cache.full, k, v, position)
    due, steps = rows_due(cache, raw_query)
    set_size = cache.slots.shape[-1]

    def recycled_only(_: None) -> tuple[Array, ...]:
        out, slots, scores = attention_over_set(q, full, position, cache.slots, cache.scores, scale)
        return out, slots, scores, cache.full_query, steps, cache.full_steps

    def with_full_pass(_: None) -> tuple[Array, ...]:
        recycled_out, recycled_slots, recycled_scores = attention_over_set(
            q, full, position, cache.slots, cache.scores, scale
        )
        full_out, full_slots, full_scores = full_attention_with_refresh(
            q, full, position, set_size, policy, scale
        )
        row = due[:, None]
        return (
            jnp.where(row[..., None], full_out, recycled_out),
            jnp.where(row[..., None], full_slots, recycled_slots),
            jnp.where(row[..., None], full_scores, recycled_scores),
            jnp.where(row[..., None], raw_query.astype(jnp.float32), cache.full_query),
            jnp.where(due, 0, steps),
            cache.full_steps + due.astype(jnp.int32),
        )

    counted = due & (cache.active | cache.force_full)
    out, slots, scores, full_query, steps, full_steps = jax.lax.cond(
        jnp.any(counted), with_full_pass, recycled_only, None
    )
    new_cache = cache.replace(
        full=full,
        slots=slots,
        scores=scores,
        full_query=full_query,
        steps_since_full=steps,
        full_steps=full_steps,
    )
    return out.astype(v.dtype), new_cache


__all__ = [
    "SlotRecycledKVCache",
    "empty_slot_cache",
    "rows_due",
    "set_row_flags",
    "slot_cache_from_prefill",
    "slot_recycled_attention_step",
    "to_slot_caches",
]
