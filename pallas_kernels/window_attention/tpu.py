"""Mosaic TPU kernels of causal windowed softmax attention (forward, dq, dk/dv).

Forward and ``dq``: grid ``(B, H, N, steps)``; query block ``i`` visits key blocks
``i - lookback + t`` for ``t < steps`` (negative ones are skipped by ``pl.when`` and their
index map is clamped to block 0, so nothing outside the window is fetched twice or computed).
``dk, dv``: grid ``(B, H, N, steps)``; key block ``j`` visits query blocks ``j + t`` up to the
last one. Running statistics and accumulators live in VMEM scratch across the step axis
("arbitrary"); batch, heads and the outer block axis are "parallel".

Layout: head-major ``[B, H, T_pad, D]`` (head dims padded to 64 or a multiple of 128 lanes);
the log-sum-exp is stored lane-dense as ``[B, H, N, 8, block]``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (
    MASK_VALUE,
    column_to_row,
    matmul,
    pad_axis,
    row_to_column,
    tpu_lane_width,
)
from pallas_kernels.window_attention._blocks import (
    BlockPlan,
    WindowCall,
    backward_step,
    online_softmax_step,
    visible,
)

SUBLANES = 8
LANES = 128


def _static(config: Any, head_dim: int, value_dim: int) -> WindowCall:
    return WindowCall.create(
        config, head_dim, value_dim, tpu_lane_width(head_dim), tpu_lane_width(value_dim)
    )


def _to_kernel(x: jax.Array, static: WindowCall, width: int) -> jax.Array:
    """``[B, T, H, X] -> [B, H, T_pad, width]``."""
    x = jnp.swapaxes(x, 1, 2).astype(static.operand_dtype)
    return pad_axis(pad_axis(x, 2, static.plan.padded_seq), 3, width)


def _from_kernel(x: jax.Array, static: WindowCall, width: int) -> jax.Array:
    return jnp.swapaxes(x[:, :, : static.plan.seq_len, :width], 1, 2)


def _compiler_params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def _outer_spec(static: WindowCall, width: int) -> pl.BlockSpec:
    """The block indexed by the outer (grid axis 2) block index."""
    return pl.BlockSpec((None, None, static.plan.block, width), lambda b, h, i, t: (b, h, i, 0))


def _rows_outer_spec(static: WindowCall) -> pl.BlockSpec:
    return pl.BlockSpec(
        (None, None, None, SUBLANES, static.plan.block), lambda b, h, i, t: (b, h, i, 0, 0)
    )


def _key_block(plan: BlockPlan, query_block, step):
    return query_block - plan.lookback + step


def _key_spec(static: WindowCall, width: int) -> pl.BlockSpec:
    plan = static.plan

    def index(b, h, i, t):
        return (b, h, jnp.maximum(_key_block(plan, i, t), 0), 0)

    return pl.BlockSpec((None, None, plan.block, width), index)


def _query_major_position(plan: BlockPlan):
    """In the forward and ``dq`` kernels: ``(query block, step, key block)`` of the grid point."""
    query_block, step = pl.program_id(2), pl.program_id(3)
    return query_block, step, _key_block(plan, query_block, step)


def _query_block(key_block, step):
    return key_block + step


def _query_spec(static: WindowCall, width: int) -> pl.BlockSpec:
    plan = static.plan

    def index(b, h, j, t):
        return (b, h, jnp.minimum(_query_block(j, t), plan.num_blocks - 1), 0)

    return pl.BlockSpec((None, None, plan.block, width), index)


def _rows_query_spec(static: WindowCall) -> pl.BlockSpec:
    plan = static.plan

    def index(b, h, j, t):
        return (b, h, jnp.minimum(_query_block(j, t), plan.num_blocks - 1), 0, 0)

    return pl.BlockSpec((None, None, None, SUBLANES, plan.block), index)


# Forward -----------------------------------------------------------------------------------------
def _forward_kernel(
    q_ref, k_ref, v_ref, o_ref, lse_ref, max_scratch, sum_scratch, acc_scratch, *, static
):
    plan = static.plan
    query_block, step, key_block = _query_major_position(plan)

    @pl.when(step == 0)
    def _start():
        max_scratch[...] = jnp.full(max_scratch.shape, MASK_VALUE, jnp.float32)
        sum_scratch[...] = jnp.zeros(sum_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    @pl.when(key_block >= 0)
    def _fold():
        mask = visible(plan, query_block, key_block)
        running_max, running_sum, accumulator = online_softmax_step(
            q_ref[...],
            k_ref[...],
            v_ref[...],
            mask,
            max_scratch[:, 0:1],
            sum_scratch[:, 0:1],
            acc_scratch[...],
            scale=static.scale,
            operand_dtype=static.operand_dtype,
        )
        max_scratch[...] = jnp.broadcast_to(running_max, max_scratch.shape)
        sum_scratch[...] = jnp.broadcast_to(running_sum, sum_scratch.shape)
        acc_scratch[...] = accumulator

    @pl.when(step == plan.steps - 1)
    def _finish():
        running_sum = sum_scratch[:, 0:1]
        o_ref[...] = (acc_scratch[...] / running_sum).astype(o_ref.dtype)
        log_sum_exp = max_scratch[:, 0:1] + jnp.log(running_sum)
        lse_ref[...] = jnp.broadcast_to(column_to_row(log_sum_exp), lse_ref.shape)


def forward(config: Any, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple]:
    """Forward kernel: ``q, k [B, T, H, D]``, ``v [B, T, H, Dv]`` -> ``o [B, T, H, Dv]`` and the
    residuals for :func:`backward`."""
    static = _static(config, q.shape[-1], v.shape[-1])
    plan = static.plan
    batch, _, heads, _ = q.shape
    q_kernel = _to_kernel(q, static, static.padded_head_dim)
    k_kernel = _to_kernel(k, static, static.padded_head_dim)
    v_kernel = _to_kernel(v, static, static.padded_value_dim)
    o_kernel, log_sum_exp = pl.pallas_call(
        functools.partial(_forward_kernel, static=static),
        grid=(batch, heads, plan.num_blocks, plan.steps),
        in_specs=[
            _outer_spec(static, static.padded_head_dim),
            _key_spec(static, static.padded_head_dim),
            _key_spec(static, static.padded_value_dim),
        ],
        out_specs=[_outer_spec(static, static.padded_value_dim), _rows_outer_spec(static)],
        out_shape=[
            jax.ShapeDtypeStruct(v_kernel.shape, static.operand_dtype),
            jax.ShapeDtypeStruct(
                (batch, heads, plan.num_blocks, SUBLANES, plan.block), jnp.float32
            ),
        ],
        scratch_shapes=[
            pltpu.VMEM((plan.block, LANES), jnp.float32),
            pltpu.VMEM((plan.block, LANES), jnp.float32),
            pltpu.VMEM((plan.block, static.padded_value_dim), jnp.float32),
        ],
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="window_attention_forward",
    )(q_kernel, k_kernel, v_kernel)
    o = _from_kernel(o_kernel, static, static.value_dim)
    return o, (q_kernel, k_kernel, v_kernel, o_kernel, log_sum_exp)


# Backward ----------------------------------------------------------------------------------------
def _delta(o_ref, do_ref) -> jax.Array:
    """``sum_d o_d do_d`` per query row, ``[block, 1]`` float32."""
    return jnp.sum(
        o_ref[...].astype(jnp.float32) * do_ref[...].astype(jnp.float32), axis=1, keepdims=True
    )


def _backward_query_kernel(
    q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, dq_ref, dq_scratch, *, static
):
    plan = static.plan
    query_block, step, key_block = _query_major_position(plan)

    @pl.when(step == 0)
    def _start():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    @pl.when(key_block >= 0)
    def _accumulate():
        mask = visible(plan, query_block, key_block)
        k = k_ref[...]
        _, d_scores = backward_step(
            q_ref[...],
            k,
            v_ref[...],
            do_ref[...],
            row_to_column(lse_ref[0:1, :]),
            _delta(o_ref, do_ref),
            mask,
            scale=static.scale,
            operand_dtype=static.operand_dtype,
        )
        dq_scratch[...] += matmul(d_scores, k, static.operand_dtype) * static.scale

    @pl.when(step == plan.steps - 1)
    def _finish():
        dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)


def _backward_key_value_kernel(
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    do_ref,
    lse_ref,
    dk_ref,
    dv_ref,
    dk_scratch,
    dv_scratch,
    *,
    static,
):
    plan = static.plan
    key_block, step = pl.program_id(2), pl.program_id(3)
    query_block = _query_block(key_block, step)

    @pl.when(step == 0)
    def _start():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    @pl.when(query_block < plan.num_blocks)
    def _accumulate():
        mask = visible(plan, query_block, key_block)
        q, do = q_ref[...], do_ref[...]
        probabilities, d_scores = backward_step(
            q,
            k_ref[...],
            v_ref[...],
            do,
            row_to_column(lse_ref[0:1, :]),
            _delta(o_ref, do_ref),
            mask,
            scale=static.scale,
            operand_dtype=static.operand_dtype,
        )
        dt = static.operand_dtype
        dv_scratch[...] += matmul(probabilities, do, dt, transpose_lhs=True)
        dk_scratch[...] += matmul(d_scores, q, dt, transpose_lhs=True) * static.scale

    @pl.when(step == plan.steps - 1)
    def _finish():
        dk_ref[...] = dk_scratch[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def backward(
    config: Any, residuals: tuple, do: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Backward kernels: ``do [B, T, H, Dv]`` -> ``dq, dk [B, T, H, D]``, ``dv [B, T, H, Dv]``."""
    q_kernel, k_kernel, v_kernel, o_kernel, log_sum_exp = residuals
    static = _static(config, config.head_dim, do.shape[-1])
    plan = static.plan
    batch, heads = q_kernel.shape[:2]
    do_kernel = _to_kernel(do, static, static.padded_value_dim)
    inputs = (q_kernel, k_kernel, v_kernel, o_kernel, do_kernel, log_sum_exp)
    grid = (batch, heads, plan.num_blocks, plan.steps)
    head, value = static.padded_head_dim, static.padded_value_dim

    dq_kernel = pl.pallas_call(
        functools.partial(_backward_query_kernel, static=static),
        grid=grid,
        in_specs=[
            _outer_spec(static, head),
            _key_spec(static, head),
            _key_spec(static, value),
            _outer_spec(static, value),
            _outer_spec(static, value),
            _rows_outer_spec(static),
        ],
        out_specs=_outer_spec(static, head),
        out_shape=jax.ShapeDtypeStruct(q_kernel.shape, static.operand_dtype),
        scratch_shapes=[pltpu.VMEM((plan.block, head), jnp.float32)],
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="window_attention_backward_query",
    )(*inputs)

    dk_kernel, dv_kernel = pl.pallas_call(
        functools.partial(_backward_key_value_kernel, static=static),
        grid=grid,
        in_specs=[
            _query_spec(static, head),
            _outer_spec(static, head),
            _outer_spec(static, value),
            _query_spec(static, value),
            _query_spec(static, value),
            _rows_query_spec(static),
        ],
        out_specs=[_outer_spec(static, head), _outer_spec(static, value)],
        out_shape=[
            jax.ShapeDtypeStruct(k_kernel.shape, static.operand_dtype),
            jax.ShapeDtypeStruct(v_kernel.shape, static.operand_dtype),
        ],
        scratch_shapes=[
            pltpu.VMEM((plan.block, head), jnp.float32),
            pltpu.VMEM((plan.block, value), jnp.float32),
        ],
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="window_attention_backward_key_value",
    )(*inputs)

    return (
        _from_kernel(dq_kernel, static, static.head_dim),
        _from_kernel(dk_kernel, static, static.head_dim),
        _from_kernel(dv_kernel, static, static.value_dim),
    )
