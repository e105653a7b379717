"""GPU kernels (Pallas' Triton lowering) of the selective scan (forward, backward).

Grid ``(B, Dp / BD)``: one program per batch row and block of ``BD`` channels (32 by
default), looping over the chunks with ``lax.fori_loop`` and keeping the state
``h [Np, BD]`` float32 in registers. A chunk's ``C`` tokens are unrolled (:mod:`._chunk`):
each reads its rows of ``u, delta, b, c`` at the chunk's offset and writes its output row.
The state before every chunk is written out as the backward's checkpoint.

Backward: the same grid, the chunks in reverse, carrying ``dh`` and the cotangent of ``a^T``
in registers; each chunk is replayed from its checkpoint (its ``C + 1`` states in registers),
then run backward. ``db, dc`` are written per channel block and summed by the wrapper.

Triton needs power-of-two block sides: ``BD`` and ``Np`` are powers of two (``Np >= 16``);
the sequence is one whole block of ``T_pad`` rows read row by row.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import next_power_of_two, round_up
from pallas_kernels.selective_scan._call import Residuals, ScanCall
from pallas_kernels.selective_scan._chunk import chunk_backward, chunk_forward


def make_call(
    config: Any, seq_len: int, channels: int, state_dim: int, has_initial_state: bool
) -> ScanCall:
    block = config.channel_block_size or 32
    return ScanCall(
        seq_len=seq_len,
        chunk_size=config.chunk_size,
        num_chunks=-(-seq_len // config.chunk_size),
        channels=channels,
        padded_channels=round_up(channels, block),
        channel_block=block,
        state_dim=state_dim,
        padded_state=next_power_of_two(state_dim, 16),
        has_initial_state=has_initial_state,
        interpret=config.interpret,
        num_warps=config.num_warps or 4,
    )


def _sequence_spec(call: ScanCall, width: int | None = None) -> pl.BlockSpec:
    """The whole sequence of one batch row: one channel block of a ``[B, T_pad, Dp]`` array,
    or (``width``) all ``width`` lanes of a ``[B, T_pad, Np]`` one."""
    if width is None:
        shape = (None, call.padded_seq, call.channel_block)
        return pl.BlockSpec(shape, lambda b, d: (b, 0, d))
    return pl.BlockSpec((None, call.padded_seq, width), lambda b, d: (b, 0, 0))


def _a_spec(call: ScanCall) -> pl.BlockSpec:
    return pl.BlockSpec((call.padded_state, call.channel_block), lambda b, d: (0, d))


def _state_spec(call: ScanCall) -> pl.BlockSpec:
    return pl.BlockSpec((None, call.padded_state, call.channel_block), lambda b, d: (b, 0, d))


def _checkpoint_spec(call: ScanCall) -> pl.BlockSpec:
    shape = (None, call.num_chunks * call.padded_state, call.channel_block)
    return pl.BlockSpec(shape, lambda b, d: (b, 0, d))


def _compiler_params(call: ScanCall):
    return plgpu.CompilerParams(num_warps=call.num_warps, num_stages=1)


def _row_reader(refs: dict[str, Any], start):
    return lambda name, t: refs[name][pl.ds(start + t, 1), :]


def _row_writer(refs: dict[str, Any], start):
    def write(name, t, row):
        ref = refs[name]
        ref[pl.ds(start + t, 1), :] = row.astype(ref.dtype)

    return write


def _checkpoint_rows(call: ScanCall, chunk):
    return pl.ds(pl.multiple_of(chunk * call.padded_state, call.padded_state), call.padded_state)


# Forward -----------------------------------------------------------------------------------------
def _forward_kernel(*refs, call: ScanCall):
    u_ref, delta_ref, b_ref, c_ref, a_ref, *refs = refs
    initial_ref = refs.pop(0) if call.has_initial_state else None
    y_ref, final_ref, checkpoint_ref = refs
    a_t = a_ref[...]
    inputs = {"u": u_ref, "delta": delta_ref, "b": b_ref, "c": c_ref}
    if initial_ref is None:
        h = jnp.zeros((call.padded_state, call.channel_block), jnp.float32)
    else:
        h = initial_ref[...]

    def body(chunk, h):
        start = pl.multiple_of(chunk * call.chunk_size, call.chunk_size)
        checkpoint_ref[_checkpoint_rows(call, chunk), :] = h
        read, write = _row_reader(inputs, start), _row_writer({"y": y_ref}, start)
        return chunk_forward(h, a_t, call.chunk_size, read, write)

    final_ref[...] = lax.fori_loop(0, call.num_chunks, body, h)


def forward(call: ScanCall, u, delta, a_t, b, c, initial_state, out_dtype):
    """As :func:`pallas_kernels.selective_scan.tpu.forward`."""
    batch = u.shape[0]
    in_specs = [
        _sequence_spec(call),
        _sequence_spec(call),
        _sequence_spec(call, call.padded_state),
        _sequence_spec(call, call.padded_state),
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
        grid=(batch, call.channel_blocks),
        in_specs=in_specs,
        out_specs=[_sequence_spec(call), _state_spec(call), _checkpoint_spec(call)],
        out_shape=[
            jax.ShapeDtypeStruct(u.shape, out_dtype),
            jax.ShapeDtypeStruct(state_shape, jnp.float32),
            jax.ShapeDtypeStruct(checkpoint_shape, jnp.float32),
        ],
        compiler_params=_compiler_params(call),
        interpret=call.interpret,
        name="selective_scan_forward",
    )(*inputs)


# Backward ----------------------------------------------------------------------------------------
def _backward_kernel(*refs, call: ScanCall):
    (
        u_ref, delta_ref, b_ref, c_ref, a_ref, checkpoint_ref, dy_ref, d_final_ref,
        du_ref, d_delta_ref, db_ref, dc_ref, da_ref, d_initial_ref,
    ) = refs  # fmt: skip
    a_t = a_ref[...]
    inputs = {"u": u_ref, "delta": delta_ref, "b": b_ref, "c": c_ref, "dy": dy_ref}
    outputs = {"du": du_ref, "ddelta": d_delta_ref, "db": db_ref, "dc": dc_ref}

    def body(step, carry):
        dh, da_t = carry
        chunk = call.num_chunks - 1 - step
        start = pl.multiple_of(chunk * call.chunk_size, call.chunk_size)
        h_start = checkpoint_ref[_checkpoint_rows(call, chunk), :]
        read, write = _row_reader(inputs, start), _row_writer(outputs, start)
        return chunk_backward(h_start, dh, da_t, a_t, call.chunk_size, read, write)

    zeros = jnp.zeros((call.padded_state, call.channel_block), jnp.float32)
    dh, da_t = lax.fori_loop(0, call.num_chunks, body, (d_final_ref[...], zeros))
    d_initial_ref[...] = dh
    da_ref[...] = da_t


def backward(call: ScanCall, residuals: Residuals, dy, d_final, du_dtype, d_delta_dtype):
    """As :func:`pallas_kernels.selective_scan.tpu.backward`."""
    batch = dy.shape[0]
    partial_spec = pl.BlockSpec(
        (None, None, call.padded_seq, call.padded_state), lambda b, d: (d, b, 0, 0)
    )
    partial_shape = (call.channel_blocks, batch, call.padded_seq, call.padded_state)
    state_shape = (batch, call.padded_state, call.padded_channels)
    channels = _sequence_spec(call)
    state_rows = _sequence_spec(call, call.padded_state)
    return pl.pallas_call(
        functools.partial(_backward_kernel, call=call),
        grid=(batch, call.channel_blocks),
        in_specs=[
            channels,
            channels,
            state_rows,
            state_rows,
            _a_spec(call),
            _checkpoint_spec(call),
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
        compiler_params=_compiler_params(call),
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
