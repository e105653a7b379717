"""Mosaic TPU kernels of the selective scan (forward, backward).

Grid ``(B, Dp / BD, N_chunks)``: batch rows and channel blocks are "parallel" (split across
the TensorCores of a megacore chip), chunks "arbitrary" (sequential). The state
``h [Np, BD]`` float32 lives in VMEM scratch across the chunks and goes to HBM once at the
end, plus once per chunk as the checkpoint the backward replays from. Each grid step loads
its chunk's ``[C, BD]`` and ``[C, Np]`` blocks and unrolls the ``C`` tokens
(:mod:`._chunk`); output rows are collected in a float32 VMEM tile and stored once per chunk.

Backward: the same grid with the chunks reversed; ``dh`` and the cotangent of ``a^T`` live in
VMEM scratch; each step replays its chunk from the checkpoint, then runs it backward.
``db, dc`` are written per channel block (the wrapper sums the blocks), ``da`` per batch row.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import round_up, tpu_lane_width
from pallas_kernels.selective_scan._call import Residuals, ScanCall
from pallas_kernels.selective_scan._chunk import chunk_backward, chunk_forward


def make_call(
    config: Any, seq_len: int, channels: int, state_dim: int, has_initial_state: bool
) -> ScanCall:
    padded_channels = tpu_lane_width(channels)
    block = config.channel_block_size or 128
    block = min(block, padded_channels) if padded_channels % 128 == 0 else padded_channels
    return ScanCall(
        seq_len=seq_len,
        chunk_size=config.chunk_size,
        num_chunks=-(-seq_len // config.chunk_size),
        channels=channels,
        padded_channels=padded_channels,
        channel_block=block,
        state_dim=state_dim,
        padded_state=round_up(state_dim, 8),
        has_initial_state=has_initial_state,
        interpret=config.interpret,
    )


def _chunk_index(call: ScanCall, reverse: bool):
    last = call.num_chunks - 1
    return (lambda n: last - n) if reverse else (lambda n: n)


def _channel_spec(call: ScanCall, reverse: bool = False) -> pl.BlockSpec:
    """One chunk of one channel block of a ``[B, T_pad, Dp]`` array."""
    chunk = _chunk_index(call, reverse)
    shape = (None, call.chunk_size, call.channel_block)
    return pl.BlockSpec(shape, lambda b, d, n: (b, chunk(n), d))


def _state_row_spec(call: ScanCall, reverse: bool = False) -> pl.BlockSpec:
    """One chunk of a ``[B, T_pad, Np]`` array (``b``, ``c``)."""
    chunk = _chunk_index(call, reverse)
    return pl.BlockSpec(
        (None, call.chunk_size, call.padded_state), lambda b, d, n: (b, chunk(n), 0)
    )


def _a_spec(call: ScanCall) -> pl.BlockSpec:
    return pl.BlockSpec((call.padded_state, call.channel_block), lambda b, d, n: (0, d))


def _state_spec(call: ScanCall) -> pl.BlockSpec:
    """One channel block of a ``[B, Np, Dp]`` state."""
    return pl.BlockSpec((None, call.padded_state, call.channel_block), lambda b, d, n: (b, 0, d))


def _checkpoint_spec(call: ScanCall, reverse: bool = False) -> pl.BlockSpec:
    """The state before one chunk, in ``[B, N_chunks * Np, Dp]``."""
    chunk = _chunk_index(call, reverse)
    shape = (None, call.padded_state, call.channel_block)
    return pl.BlockSpec(shape, lambda b, d, n: (b, chunk(n), d))


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _tile_reader(refs: dict[str, Any]):
    tiles = {name: ref[...].astype(jnp.float32) for name, ref in refs.items()}
    return lambda name, t: tiles[name][t : t + 1, :]


def _row_writer(scratch: dict[str, Any]):
    def write(name, t, row):
        scratch[name][t : t + 1, :] = row

    return write


# Forward -----------------------------------------------------------------------------------------
def _forward_kernel(*refs, call: ScanCall):
    u_ref, delta_ref, b_ref, c_ref, a_ref, *refs = refs
    initial_ref = refs.pop(0) if call.has_initial_state else None
    y_ref, final_ref, checkpoint_ref, h_scratch, y_rows = refs
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _start():
        if initial_ref is None:
            h_scratch[...] = jnp.zeros(h_scratch.shape, jnp.float32)
        else:
            h_scratch[...] = initial_ref[...]

    h = h_scratch[...]
    checkpoint_ref[...] = h
    read = _tile_reader({"u": u_ref, "delta": delta_ref, "b": b_ref, "c": c_ref})
    h = chunk_forward(h, a_ref[...], call.chunk_size, read, _row_writer({"y": y_rows}))
    y_ref[...] = y_rows[...].astype(y_ref.dtype)
    h_scratch[...] = h

    @pl.when(chunk == call.num_chunks - 1)
    def _finish():
        final_ref[...] = h


def forward(call: ScanCall, u, delta, a_t, b, c, initial_state, out_dtype):
    """``u, delta [B, T_pad, Dp]``, ``a_t [Np, Dp]``, ``b, c [B, T_pad, Np]``,
    ``initial_state`` None or ``[B, Np, Dp]`` (kernel layouts). Returns ``y [B, T_pad, Dp]``
    in ``out_dtype``, the final state ``[B, Np, Dp]`` and the checkpoints."""
    batch = u.shape[0]
    in_specs = [
        _channel_spec(call),
        _channel_spec(call),
        _state_row_spec(call),
        _state_row_spec(call),
        _a_spec(call),
    ]
    inputs = [u, delta, b, c, a_t]
    if initial_state is not None:
        in_specs.append(_state_spec(call))
        inputs.append(initial_state)
    state_shape = (batch, call.padded_state, call.padded_channels)
    checkpoint_shape = (batch, call.num_chunks * call.padded_state, call.padded_channels)
    return pl.pallas_call(
        functools.partial(_forward_kernel, call=call),
        grid=(batch, call.channel_blocks, call.num_chunks),
        in_specs=in_specs,
        out_specs=[_channel_spec(call), _state_spec(call), _checkpoint_spec(call)],
        out_shape=[
            jax.ShapeDtypeStruct(u.shape, out_dtype),
            jax.ShapeDtypeStruct(state_shape, jnp.float32),
            jax.ShapeDtypeStruct(checkpoint_shape, jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((call.padded_state, call.channel_block), jnp.float32),
            pltpu.VMEM((call.chunk_size, call.channel_block), jnp.float32),
        ],
        compiler_params=_compiler_params(),
        interpret=call.interpret,
        name="selective_scan_forward",
    )(*inputs)


# Backward ----------------------------------------------------------------------------------------
def _backward_kernel(*refs, call: ScanCall):
    (
        u_ref, delta_ref, b_ref, c_ref, a_ref, checkpoint_ref, dy_ref, d_final_ref,
        du_ref, d_delta_ref, db_ref, dc_ref, da_ref, d_initial_ref,
        dh_scratch, da_scratch, du_rows, d_delta_rows, db_rows, dc_rows,
    ) = refs  # fmt: skip
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _start():
        dh_scratch[...] = d_final_ref[...]
        da_scratch[...] = jnp.zeros(da_scratch.shape, jnp.float32)

    read = _tile_reader({"u": u_ref, "delta": delta_ref, "b": b_ref, "c": c_ref, "dy": dy_ref})
    write = _row_writer({"du": du_rows, "ddelta": d_delta_rows, "db": db_rows, "dc": dc_rows})
    dh, da_t = chunk_backward(
        checkpoint_ref[...],
        dh_scratch[...],
        da_scratch[...],
        a_ref[...],
        call.chunk_size,
        read,
        write,
    )
    du_ref[...] = du_rows[...].astype(du_ref.dtype)
    d_delta_ref[...] = d_delta_rows[...].astype(d_delta_ref.dtype)
    db_ref[...] = db_rows[...]
    dc_ref[...] = dc_rows[...]
    dh_scratch[...] = dh
    da_scratch[...] = da_t

    @pl.when(step == call.num_chunks - 1)
    def _finish():
        d_initial_ref[...] = dh
        da_ref[...] = da_t


def backward(call: ScanCall, residuals: Residuals, dy, d_final, du_dtype, d_delta_dtype):
    """Cotangents from ``dy [B, T_pad, Dp]`` and ``d_final [B, Np, Dp]`` (kernel layouts):
    ``du, ddelta [B, T_pad, Dp]``, per channel block ``db, dc [NDB, B, T_pad, Np]``, per batch
    row ``da^T [B, Np, Dp]``, and the initial state's ``[B, Np, Dp]``."""
    batch = dy.shape[0]
    channels = _channel_spec(call, reverse=True)
    state_rows = _state_row_spec(call, reverse=True)
    chunk = _chunk_index(call, reverse=True)
    partial_spec = pl.BlockSpec(
        (None, None, call.chunk_size, call.padded_state), lambda b, d, n: (d, b, chunk(n), 0)
    )
    partial_shape = (call.channel_blocks, batch, call.padded_seq, call.padded_state)
    state_shape = (batch, call.padded_state, call.padded_channels)
    return pl.pallas_call(
        functools.partial(_backward_kernel, call=call),
        grid=(batch, call.channel_blocks, call.num_chunks),
        in_specs=[
            channels,
            channels,
            state_rows,
            state_rows,
            _a_spec(call),
            _checkpoint_spec(call, reverse=True),
            channels,
            _state_spec(call),
        ],
        out_specs=[
            channels,
            channels,
            partial_spec,
            partial_spec,
            _state_spec(call),
            _state_spec(call),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(dy.shape, du_dtype),
            jax.ShapeDtypeStruct(dy.shape, d_delta_dtype),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(state_shape, jnp.float32),
            jax.ShapeDtypeStruct(state_shape, jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((call.padded_state, call.channel_block), jnp.float32),
            pltpu.VMEM((call.padded_state, call.channel_block), jnp.float32),
            pltpu.VMEM((call.chunk_size, call.channel_block), jnp.float32),
            pltpu.VMEM((call.chunk_size, call.channel_block), jnp.float32),
            pltpu.VMEM((call.chunk_size, call.padded_state), jnp.float32),
            pltpu.VMEM((call.chunk_size, call.padded_state), jnp.float32),
        ],
        compiler_params=_compiler_params(),
        interpret=call.interpret,
        name="selective_scan_backward",
    )(
        residuals.u,
        residuals.delta,
        residuals.b,
        residuals.c,
        residuals.a_t,
        residuals.checkpoints,
        dy,
        d_final,
    )
