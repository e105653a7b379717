"""GPU kernels (Pallas' Triton lowering) of causal windowed softmax attention.

Triton rather than Mosaic GPU for the reasons given in ``pallas_kernels/_common.py``: it runs on
every CUDA GPU JAX supports and lowers from a CPU host.

Forward and ``dq``: grid ``(B, H, N)``, one program per query block, looping
(``lax.fori_loop`` with bounds from the program id) over key blocks ``max(0, i - lookback) .. i``
only; the running max/sum/accumulator stay in registers. ``dk, dv``: grid ``(B, H, N)``, one
program per key block, looping over query blocks ``j .. min(N - 1, j + lookback)``.
``delta = sum(o * do)`` is computed by XLA before the backward kernels.

Layout: batch-major ``[B, T_pad, H, D]`` read with strided blocks (no transpose); head dims
padded to a power of two >= 16; log-sum-exp and delta as ``[B, H, T_pad]``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import MASK_VALUE, matmul, next_power_of_two, pad_axis
from pallas_kernels.window_attention._blocks import (
    BlockPlan,
    WindowCall,
    backward_step,
    online_softmax_step,
    visible,
)


@dataclasses.dataclass(frozen=True)
class _Static(WindowCall):
    """:class:`WindowCall` plus the number of Triton warps."""

    num_warps: int


def _static(config: Any, head_dim: int, value_dim: int) -> _Static:
    padded_head_dim = next_power_of_two(head_dim, 16)
    return _Static.create(
        config,
        head_dim,
        value_dim,
        padded_head_dim,
        next_power_of_two(value_dim, 16),
        num_warps=config.num_warps or (4 if padded_head_dim <= 64 else 8),
    )


def _to_kernel(x: jax.Array, static: _Static, width: int) -> jax.Array:
    """``[B, T, H, X] -> [B, T_pad, H, width]``."""
    x = x.astype(static.operand_dtype)
    return pad_axis(pad_axis(x, 1, static.plan.padded_seq), 3, width)


def _block_spec(static: _Static, width: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, static.plan.block, None, width), lambda b, h, i: (b, i, h, 0))


def _sequence_spec(static: _Static, width: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, static.plan.padded_seq, None, width), lambda b, h, i: (b, 0, h, 0))


def _row_block_spec(static: _Static) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, static.plan.block), lambda b, h, i: (b, h, i))


def _row_sequence_spec(static: _Static) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, static.plan.padded_seq), lambda b, h, i: (b, h, 0))


def _compiler_params(static: _Static):
    return plgpu.CompilerParams(num_warps=static.num_warps, num_stages=2)


def _tokens(plan: BlockPlan, block_index):
    return pl.ds(pl.multiple_of(block_index * plan.block, plan.block), plan.block)


# Forward -----------------------------------------------------------------------------------------
def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, static: _Static):
    plan = static.plan
    query_block = pl.program_id(2)
    q = q_ref[...]

    def body(key_block, carry):
        tokens = _tokens(plan, key_block)
        mask = visible(plan, query_block, key_block)
        return online_softmax_step(
            q,
            k_ref[tokens, :],
            v_ref[tokens, :],
            mask,
            *carry,
            scale=static.scale,
            operand_dtype=static.operand_dtype,
        )

    init = (
        jnp.full((plan.block, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((plan.block, 1), jnp.float32),
        jnp.zeros((plan.block, static.padded_value_dim), jnp.float32),
    )
    first = jnp.maximum(query_block - plan.lookback, 0)
    running_max, running_sum, accumulator = lax.fori_loop(first, query_block + 1, body, init)
    o_ref[...] = (accumulator / running_sum).astype(o_ref.dtype)
    lse_ref[...] = (running_max + jnp.log(running_sum)).reshape(plan.block)


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
        grid=(batch, heads, plan.num_blocks),
        in_specs=[
            _block_spec(static, static.padded_head_dim),
            _sequence_spec(static, static.padded_head_dim),
            _sequence_spec(static, static.padded_value_dim),
        ],
        out_specs=[_block_spec(static, static.padded_value_dim), _row_block_spec(static)],
        out_shape=[
            jax.ShapeDtypeStruct(v_kernel.shape, static.operand_dtype),
            jax.ShapeDtypeStruct((batch, heads, plan.padded_seq), jnp.float32),
        ],
        compiler_params=_compiler_params(static),
        interpret=static.interpret,
        name="window_attention_forward",
    )(q_kernel, k_kernel, v_kernel)
    o = o_kernel[:, : plan.seq_len, :, : static.value_dim]
    return o, (q_kernel, k_kernel, v_kernel, o, log_sum_exp)


# Backward ----------------------------------------------------------------------------------------
def _backward_query_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, static: _Static
):
    plan = static.plan
    query_block = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    log_sum_exp = lse_ref[...].reshape(plan.block, 1)
    delta = delta_ref[...].reshape(plan.block, 1)

    def body(key_block, dq):
        tokens = _tokens(plan, key_block)
        k = k_ref[tokens, :]
        mask = visible(plan, query_block, key_block)
        _, d_scores = backward_step(
            q,
            k,
            v_ref[tokens, :],
            do,
            log_sum_exp,
            delta,
            mask,
            scale=static.scale,
            operand_dtype=static.operand_dtype,
        )
        return dq + matmul(d_scores, k, static.operand_dtype)

    first = jnp.maximum(query_block - plan.lookback, 0)
    dq = lax.fori_loop(
        first, query_block + 1, body, jnp.zeros((plan.block, static.padded_head_dim), jnp.float32)
    )
    dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _backward_key_value_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, static: _Static
):
    plan = static.plan
    key_block = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    dt = static.operand_dtype

    def body(query_block, carry):
        dk, dv = carry
        tokens = _tokens(plan, query_block)
        q, do = q_ref[tokens, :], do_ref[tokens, :]
        mask = visible(plan, query_block, key_block)
        probabilities, d_scores = backward_step(
            q,
            k,
            v,
            do,
            lse_ref[tokens].reshape(plan.block, 1),
            delta_ref[tokens].reshape(plan.block, 1),
            mask,
            scale=static.scale,
            operand_dtype=dt,
        )
        dv = dv + matmul(probabilities, do, dt, transpose_lhs=True)
        dk = dk + matmul(d_scores, q, dt, transpose_lhs=True)
        return dk, dv

    last = jnp.minimum(key_block + plan.lookback + 1, plan.num_blocks)
    init = (
        jnp.zeros((plan.block, static.padded_head_dim), jnp.float32),
        jnp.zeros((plan.block, static.padded_value_dim), jnp.float32),
    )
    dk, dv = lax.fori_loop(key_block, last, body, init)
    dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(
    config: Any, residuals: tuple, do: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Backward kernels: ``do [B, T, H, Dv]`` -> ``dq, dk [B, T, H, D]``, ``dv [B, T, H, Dv]``."""
    q_kernel, k_kernel, v_kernel, o, log_sum_exp = residuals
    static = _static(config, config.head_dim, do.shape[-1])
    plan = static.plan
    batch, _, heads, _ = q_kernel.shape
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, T, H]
    delta = pad_axis(jnp.swapaxes(delta, 1, 2), 2, plan.padded_seq)  # [B, H, T_pad]
    do_kernel = _to_kernel(do, static, static.padded_value_dim)
    inputs = (q_kernel, k_kernel, v_kernel, do_kernel, log_sum_exp, delta)
    grid = (batch, heads, plan.num_blocks)
    head, value = static.padded_head_dim, static.padded_value_dim

    dq_kernel = pl.pallas_call(
        functools.partial(_backward_query_kernel, static=static),
        grid=grid,
        in_specs=[
            _block_spec(static, head),
            _sequence_spec(static, head),
            _sequence_spec(static, value),
            _block_spec(static, value),
            _row_block_spec(static),
            _row_block_spec(static),
        ],
        out_specs=_block_spec(static, head),
        out_shape=jax.ShapeDtypeStruct(q_kernel.shape, static.operand_dtype),
        compiler_params=_compiler_params(static),
        interpret=static.interpret,
        name="window_attention_backward_query",
    )(*inputs)

    dk_kernel, dv_kernel = pl.pallas_call(
        functools.partial(_backward_key_value_kernel, static=static),
        grid=grid,
        in_specs=[
            _sequence_spec(static, head),
            _block_spec(static, head),
            _block_spec(static, value),
            _sequence_spec(static, value),
            _row_sequence_spec(static),
            _row_sequence_spec(static),
        ],
        out_specs=[_block_spec(static, head), _block_spec(static, value)],
        out_shape=[
            jax.ShapeDtypeStruct(k_kernel.shape, static.operand_dtype),
            jax.ShapeDtypeStruct(v_kernel.shape, static.operand_dtype),
        ],
        compiler_params=_compiler_params(static),
        interpret=static.interpret,
        name="window_attention_backward_key_value",
    )(*inputs)

    def unpad(x: jax.Array, width: int) -> jax.Array:
        return x[:, : plan.seq_len, :, :width]

    return (
        unpad(dq_kernel, static.head_dim),
        unpad(dk_kernel, static.head_dim),
        unpad(dv_kernel, static.value_dim),
    )
