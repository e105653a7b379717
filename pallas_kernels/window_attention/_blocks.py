"""Block plan and per-block math of causal windowed softmax attention, shared by both kernels.

Query ``i`` sees keys ``j`` with ``i - window < j <= i`` (``window=None``: every ``j <= i``).
Queries and keys are cut in blocks of ``block`` tokens. Query block ``b`` needs key blocks
``b - lookback .. b`` with ``lookback = ceil((window - 1) / block)`` (capped at ``N - 1``; all
earlier blocks for full attention): the others are never loaded nor computed.

Online softmax (FlashAttention-2), float32: per query row a running maximum ``m``, sum ``l`` and
unnormalized output ``acc``; after the last key block ``o = acc / l`` and the log-sum-exp
``lse = m + log(l)`` is kept for the backward pass, which recomputes ``p = exp(s - lse)`` and
uses ``delta_i = sum_d o_id do_id``:

    dv = p^T do,   ds = p * (do v^T - delta),   dq = scale * ds k,   dk = scale * ds^T q
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import MASK_VALUE, matmul


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Blocks of one call.

    Attributes:
      seq_len: ``T``; block: tokens per query/key block; num_blocks: ``ceil(T / block)``;
      lookback: key blocks before the diagonal one that a query block needs; window: keys seen
      per query (None: all previous).
    """

    seq_len: int
    block: int
    num_blocks: int
    lookback: int
    window: int | None

    @property
    def steps(self) -> int:
        """Key blocks visited per query block (and query blocks per key block)."""
        return self.lookback + 1

    @property
    def padded_seq(self) -> int:
        return self.num_blocks * self.block


def make_plan(seq_len: int, block: int, window: int | None) -> BlockPlan:
    """Blocks for ``seq_len`` tokens in blocks of ``block`` with ``window`` keys per query."""
    num_blocks = -(-seq_len // block)
    needed = num_blocks if window is None else -(-(window - 1) // block)
    lookback = min(needed, num_blocks - 1)
    return BlockPlan(seq_len, block, num_blocks, lookback, window)


@dataclasses.dataclass(frozen=True)
class WindowCall:
    """Compile-time parameters of one kernel call, common to both backends.

    Attributes:
      plan: the blocks; head_dim, value_dim: ``D, Dv``; padded_head_dim, padded_value_dim:
      padded as the backend wants them; scale, operand_dtype, interpret: from the op's config.
    """

    plan: BlockPlan
    head_dim: int
    value_dim: int
    padded_head_dim: int
    padded_value_dim: int
    scale: float
    operand_dtype: Any
    interpret: Any

    @classmethod
    def create(
        cls,
        config: Any,
        head_dim: int,
        value_dim: int,
        padded_head_dim: int,
        padded_value_dim: int,
        **extra: Any,
    ):
        """From a ``WindowAttentionConfig`` and the shapes (``extra``: a backend's own fields)."""
        return cls(
            plan=config.plan,
            head_dim=head_dim,
            value_dim=value_dim,
            padded_head_dim=padded_head_dim,
            padded_value_dim=padded_value_dim,
            scale=config.scale,
            operand_dtype=config.operand_dtype,
            interpret=config.interpret,
            **extra,
        )


def visible(plan: BlockPlan, query_block, key_block) -> jax.Array:
    """``[block, block]`` bool: in query block ``query_block`` and key block ``key_block``,
    key ``c`` is visible to query ``r`` (causal, inside the window)."""
    shape = (plan.block, plan.block)
    query_position = query_block * plan.block + lax.broadcasted_iota(jnp.int32, shape, 0)
    key_position = key_block * plan.block + lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = key_position <= query_position
    if plan.window is not None:
        mask = mask & (query_position - key_position < plan.window)
    return mask


def scores(q: jax.Array, k: jax.Array, scale: float, operand_dtype) -> jax.Array:
    """``scale * q k^T`` ``[block_q, block_k]`` float32."""
    return matmul(q, k, operand_dtype, transpose_rhs=True) * scale


def online_softmax_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    running_max: jax.Array,
    running_sum: jax.Array,
    accumulator: jax.Array,
    *,
    scale: float,
    operand_dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold one key block into the running ``(m [bq, 1], l [bq, 1], acc [bq, Dv])``."""
    logits = jnp.where(mask, scores(q, k, scale, operand_dtype), MASK_VALUE)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=1, keepdims=True))
    probabilities = jnp.where(mask, jnp.exp(logits - new_max), 0.0)
    correction = jnp.exp(running_max - new_max)
    new_sum = correction * running_sum + jnp.sum(probabilities, axis=1, keepdims=True)
    new_accumulator = correction * accumulator + matmul(probabilities, v, operand_dtype)
    return new_max, new_sum, new_accumulator


def backward_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    log_sum_exp: jax.Array,
    delta: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    operand_dtype,
) -> tuple[jax.Array, jax.Array]:
    """``p = exp(s - lse)`` and ``ds = p * (do v^T - delta)`` for one (query, key) block pair,
    both ``[bq, bk]`` float32 (``lse, delta [bq, 1]``)."""
    probabilities = jnp.where(mask, jnp.exp(scores(q, k, scale, operand_dtype) - log_sum_exp), 0.0)
    d_probabilities = matmul(do, v, operand_dtype, transpose_rhs=True)
    return probabilities, probabilities * (d_probabilities - delta)
