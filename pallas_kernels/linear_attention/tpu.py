"""Mosaic TPU kernels of chunked causal Taylor linear attention (forward, dq, dk/dv).

Grid ``(B, H, N)`` over batch, heads and chunks of ``C`` tokens. The chunk axis is sequential
("arbitrary"); the state ``S [rows, Dp]`` and normalizer ``z [1, rows]`` (float32) live in VMEM
scratch across it and never go to HBM except once at the end (the returned final state). Batch
and heads are "parallel" (split across the two TensorCores of a megacore chip).

Kernel layout: head-major ``[B, H, T_pad, X]`` with ``T_pad`` a multiple of ``C``; ``q, k`` keep
their ``F`` lanes (a block may span a whole minor dim) and values are padded to 64 lanes or a
multiple of 128 (``Dp``). Per-row denominators are stored lane-dense as ``[B, H, N, 8, C]``
(each chunk's row replicated over 8 sublanes) instead of a ``[T, 128]`` broadcast.

Backward: ``dq`` runs forward over the chunks and rebuilds the state; ``dk, dv`` run backward
over the chunks (reversed index maps) carrying the state's cotangent ``dS [rows, Dp]``,
``dz [1, rows]`` in VMEM, which ends as the initial state's cotangent.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import column_to_row, pad_axis, row_to_column, tpu_lane_width
from pallas_kernels.linear_attention._taylor import (
    Factors,
    SegmentState,
    TaylorLayout,
    chunk_backward_key_value,
    chunk_backward_query,
    chunk_cumulative_log_decay,
    chunk_decay,
    chunk_forward,
    log_decay_cotangent,
    output_cotangents,
)

SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class _Static:
    """Compile-time parameters of one call: the op's config plus the shapes."""

    layout: TaylorLayout
    seq_len: int
    chunk_size: int
    num_chunks: int
    value_dim: int
    padded_value_dim: int
    eps: float
    operand_dtype: Any
    has_initial_state: bool
    has_decay: bool
    normalize: bool
    interpret: Any

    @property
    def rows(self) -> int:
        return self.layout.rows


def _static(
    config: Any, seq_len: int, value_dim: int, has_initial_state: bool, has_decay: bool
) -> _Static:
    return _Static(
        layout=config.layout,
        seq_len=seq_len,
        chunk_size=config.chunk_size,
        num_chunks=-(-seq_len // config.chunk_size),
        value_dim=value_dim,
        padded_value_dim=tpu_lane_width(value_dim),
        eps=config.eps,
        operand_dtype=config.operand_dtype,
        has_initial_state=has_initial_state,
        has_decay=has_decay,
        normalize=config.normalize,
        interpret=config.interpret,
    )


# Layout conversions (XLA, outside the kernels) --------------------------------------------------
def _to_kernel(x: jax.Array, static: _Static, width: int) -> jax.Array:
    """``[B, T, H, X] -> [B, H, T_pad, width]`` zero padded, in the operand dtype."""
    x = jnp.swapaxes(x, 1, 2).astype(static.operand_dtype)
    x = pad_axis(x, 2, static.num_chunks * static.chunk_size)
    return pad_axis(x, 3, width)


def _from_kernel(x: jax.Array, static: _Static, width: int, dtype) -> jax.Array:
    """``[B, H, T_pad, X_pad] -> [B, T, H, width]`` in ``dtype``."""
    return jnp.swapaxes(x[:, :, : static.seq_len, :width], 1, 2).astype(dtype)


def _state_to_kernel(kv: jax.Array, k: jax.Array, static: _Static):
    kv = static.layout.to_rows(kv.astype(jnp.float32), axis=2)
    kv = pad_axis(kv, 3, static.padded_value_dim)
    k = static.layout.to_rows(k.astype(jnp.float32), axis=2)[:, :, None, :]
    return kv, k


def _state_from_kernel(kv: jax.Array, k: jax.Array, static: _Static):
    kv = static.layout.from_rows(kv[..., : static.value_dim], axis=2)
    k = static.layout.from_rows(k[:, :, 0, :], axis=2)
    return kv, k


def _rows_to_kernel(x: jax.Array) -> jax.Array:
    """Per-token ``[B, H, N, C]`` -> lane-dense ``[B, H, N, 8, C]`` (replicated sublanes)."""
    return jnp.broadcast_to(x[:, :, :, None, :], (*x.shape[:3], SUBLANES, x.shape[3]))


def _rows_from_kernel(x: jax.Array) -> jax.Array:
    """Lane-dense ``[B, H, N, 8, C]`` -> per-token ``[B, H, T_pad]``."""
    batch, heads, num_chunks, _, chunk_size = x.shape
    return x[:, :, :, 0, :].reshape(batch, heads, num_chunks * chunk_size)


# Block specs -------------------------------------------------------------------------------------
def _chunk_spec(static: _Static, width: int, reverse: bool = False) -> pl.BlockSpec:
    last = static.num_chunks - 1
    if reverse:
        return pl.BlockSpec(
            (None, None, static.chunk_size, width), lambda b, h, n: (b, h, last - n, 0)
        )
    return pl.BlockSpec((None, None, static.chunk_size, width), lambda b, h, n: (b, h, n, 0))


def _rows_spec(static: _Static, reverse: bool = False) -> pl.BlockSpec:
    last = static.num_chunks - 1
    shape = (None, None, None, SUBLANES, static.chunk_size)
    if reverse:
        return pl.BlockSpec(shape, lambda b, h, n: (b, h, last - n, 0, 0))
    return pl.BlockSpec(shape, lambda b, h, n: (b, h, n, 0, 0))


def _whole_spec(shape: tuple[int, ...]) -> pl.BlockSpec:
    return pl.BlockSpec(shape, lambda b, h, n: (0,) * len(shape))


def _state_specs(static: _Static) -> list[pl.BlockSpec]:
    return [
        pl.BlockSpec(
            (None, None, static.rows, static.padded_value_dim), lambda b, h, n: (b, h, 0, 0)
        ),
        pl.BlockSpec((None, None, 1, static.rows), lambda b, h, n: (b, h, 0, 0)),
    ]


def _factor_specs(static: _Static) -> list[pl.BlockSpec]:
    padded_feature_dim, rows = static.layout.padded_feature_dim, static.rows
    return [_whole_spec((padded_feature_dim, rows))] * 2 + [_whole_spec((1, rows))] * 3


def _factor_arrays(static: _Static) -> list[jax.Array]:
    return [jnp.asarray(a) for a in static.layout.factors()]


def _load_factors(refs) -> list[Factors]:
    return [Factors(*(ref[...] for ref in refs))]


def _key_valid(static: _Static, chunk_index) -> jax.Array | None:
    if static.seq_len % static.chunk_size == 0:
        return None
    positions = chunk_index * static.chunk_size + lax.broadcasted_iota(
        jnp.int32, (static.chunk_size, 1), 0
    )
    return positions < static.seq_len


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _state_scratch(static: _Static) -> list:
    return [
        pltpu.VMEM((static.rows, static.padded_value_dim), jnp.float32),
        pltpu.VMEM((1, static.rows), jnp.float32),
    ]


# Forward -----------------------------------------------------------------------------------------
def _load_decay(static: _Static, decay_ref):
    return chunk_decay(decay_ref[0:1, :]) if static.has_decay else None


def _forward_kernel(*refs, static: _Static):
    q_ref, k_ref, v_ref, *refs = refs
    decay_ref = refs.pop(0) if static.has_decay else None
    factor_refs, refs = refs[:5], refs[5:]
    if static.has_initial_state:
        initial_kv_ref, initial_k_ref, *refs = refs
    y_ref, denominator_ref, final_kv_ref, final_k_ref, kv_scratch, k_scratch = refs
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _start():
        if static.has_initial_state:
            kv_scratch[...] = initial_kv_ref[...]
            k_scratch[...] = initial_k_ref[...]
        else:
            kv_scratch[...] = jnp.zeros(kv_scratch.shape, jnp.float32)
            k_scratch[...] = jnp.zeros(k_scratch.shape, jnp.float32)

    y, denominator, (state,) = chunk_forward(
        q_ref[...],
        k_ref[...],
        v_ref[...],
        [SegmentState(kv_scratch[...], k_scratch[...])],
        _load_factors(factor_refs),
        feature_dim=static.layout.feature_dim,
        eps=static.eps,
        operand_dtype=static.operand_dtype,
        key_valid=_key_valid(static, chunk),
        decay=_load_decay(static, decay_ref),
        normalize=static.normalize,
    )
    y_ref[...] = y.astype(y_ref.dtype)
    denominator_ref[...] = jnp.broadcast_to(column_to_row(denominator), denominator_ref.shape)
    kv_scratch[...] = state.kv
    k_scratch[...] = state.k

    @pl.when(chunk == static.num_chunks - 1)
    def _finish():
        final_kv_ref[...] = state.kv
        final_k_ref[...] = state.k


def forward(
    config: Any,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    initial_state: tuple[jax.Array, jax.Array] | None,
    log_decay: jax.Array | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array], tuple]:
    """Forward kernel for ``config`` (a ``LinearAttentionConfig``).

    ``q, k [B, T, H, F]``, ``v [B, T, H, Dv]``; ``initial_state`` is None or
    ``(kv [B, H, D', Dv], k [B, H, D'])``; ``log_decay`` None or ``[B, T, H]`` float32.
    Returns ``y [B, T, H, Dv]``, the final state ``(kv, k)`` float32 and the residuals for
    :func:`backward`.
    """
    static = _static(
        config, q.shape[1], v.shape[-1], initial_state is not None, log_decay is not None
    )
    operand_dtype = static.operand_dtype
    batch, _, heads, feature_dim = q.shape
    q_kernel = _to_kernel(q, static, feature_dim)
    k_kernel = _to_kernel(k, static, feature_dim)
    v_kernel = _to_kernel(v, static, static.padded_value_dim)
    decay_kernel = None
    if log_decay is not None:
        decay_kernel = _rows_to_kernel(
            chunk_cumulative_log_decay(log_decay, static.chunk_size, static.num_chunks)
        )
    inputs = [
        q_kernel,
        k_kernel,
        v_kernel,
        *([] if decay_kernel is None else [decay_kernel]),
        *_factor_arrays(static),
    ]
    in_specs = [
        _chunk_spec(static, feature_dim),
        _chunk_spec(static, feature_dim),
        _chunk_spec(static, static.padded_value_dim),
        *([] if decay_kernel is None else [_rows_spec(static)]),
        *_factor_specs(static),
    ]
    kernel_state = None
    if initial_state is not None:
        kernel_state = _state_to_kernel(*initial_state, static)
        inputs += list(kernel_state)
        in_specs += _state_specs(static)
    padded_seq = static.num_chunks * static.chunk_size
    out_shape = [
        jax.ShapeDtypeStruct((batch, heads, padded_seq, static.padded_value_dim), operand_dtype),
        jax.ShapeDtypeStruct(
            (batch, heads, static.num_chunks, SUBLANES, static.chunk_size), jnp.float32
        ),
        jax.ShapeDtypeStruct((batch, heads, static.rows, static.padded_value_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, heads, 1, static.rows), jnp.float32),
    ]
    out_specs = [
        _chunk_spec(static, static.padded_value_dim),
        _rows_spec(static),
        *_state_specs(static),
    ]
    y_kernel, denominator, final_kv, final_k = pl.pallas_call(
        functools.partial(_forward_kernel, static=static),
        grid=(batch, heads, static.num_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=_state_scratch(static),
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="based_linear_attention_forward",
    )(*inputs)
    y = _from_kernel(y_kernel, static, static.value_dim, v.dtype)
    final_state = _state_from_kernel(final_kv, final_k, static)
    residuals = (
        q_kernel,
        k_kernel,
        v_kernel,
        kernel_state,
        y_kernel,
        denominator,
        decay_kernel,
        None if decay_kernel is None else final_state,
    )
    return y, final_state, residuals


# Backward ----------------------------------------------------------------------------------------
def _cotangents(y_ref, dy_ref, denominator_ref, static: _Static):
    """``(dN, dD)`` of the chunk; ``dD`` is None without the normalizer (``dN = dy``)."""
    dy = dy_ref[...].astype(jnp.float32)
    if not static.normalize:
        return dy, None
    y_dot_dy = jnp.sum(dy * y_ref[...].astype(jnp.float32), axis=1, keepdims=True)
    denominator = row_to_column(denominator_ref[0:1, :])
    return output_cotangents(dy, y_dot_dy, denominator, static.eps)


def _backward_query_kernel(*refs, static: _Static):
    q_ref, k_ref, v_ref, y_ref, dy_ref, denominator_ref, *refs = refs
    decay_ref = refs.pop(0) if static.has_decay else None
    factor_refs, refs = refs[:5], refs[5:]
    if static.has_initial_state:
        initial_kv_ref, initial_k_ref, *refs = refs
    dq_ref, kv_scratch, k_scratch = refs
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _start():
        if static.has_initial_state:
            kv_scratch[...] = initial_kv_ref[...]
            k_scratch[...] = initial_k_ref[...]
        else:
            kv_scratch[...] = jnp.zeros(kv_scratch.shape, jnp.float32)
            k_scratch[...] = jnp.zeros(k_scratch.shape, jnp.float32)

    d_numerator, d_denominator = _cotangents(y_ref, dy_ref, denominator_ref, static)
    dq, (state,) = chunk_backward_query(
        q_ref[...],
        k_ref[...],
        v_ref[...],
        d_numerator,
        d_denominator,
        [SegmentState(kv_scratch[...], k_scratch[...])],
        _load_factors(factor_refs),
        feature_dim=static.layout.feature_dim,
        operand_dtype=static.operand_dtype,
        key_valid=_key_valid(static, chunk),
        decay=_load_decay(static, decay_ref),
    )
    dq_ref[...] = dq.astype(dq_ref.dtype)
    kv_scratch[...] = state.kv
    k_scratch[...] = state.k


def _backward_key_value_kernel(*refs, static: _Static):
    q_ref, k_ref, v_ref, y_ref, dy_ref, denominator_ref, *refs = refs
    decay_ref = refs.pop(0) if static.has_decay else None
    factor_refs, refs = refs[:5], refs[5:]
    final_d_kv_ref, final_d_k_ref, dk_ref, dv_ref, *refs = refs
    key_term_ref = refs.pop(0) if static.has_decay else None
    initial_d_kv_ref, initial_d_k_ref, d_kv_scratch, d_k_scratch = refs
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _start():
        d_kv_scratch[...] = final_d_kv_ref[...]
        d_k_scratch[...] = final_d_k_ref[...]

    d_numerator, d_denominator = _cotangents(y_ref, dy_ref, denominator_ref, static)
    dk, dv, (d_state,), key_term = chunk_backward_key_value(
        q_ref[...],
        k_ref[...],
        v_ref[...],
        d_numerator,
        d_denominator,
        [SegmentState(d_kv_scratch[...], d_k_scratch[...])],
        _load_factors(factor_refs),
        feature_dim=static.layout.feature_dim,
        operand_dtype=static.operand_dtype,
        decay=_load_decay(static, decay_ref),
    )
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if static.has_decay:
        key_term_ref[...] = jnp.broadcast_to(column_to_row(key_term), key_term_ref.shape)
    d_kv_scratch[...] = d_state.kv
    d_k_scratch[...] = d_state.k

    @pl.when(step == static.num_chunks - 1)
    def _finish():
        initial_d_kv_ref[...] = d_state.kv
        initial_d_k_ref[...] = d_state.k


def backward(
    config: Any, residuals: tuple, dy: jax.Array, d_final_state: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array], jax.Array | None]:
    """Backward kernels for ``config``; ``residuals`` from :func:`forward`.

    ``dy [B, T, H, Dv]``, ``d_final_state = (d_kv, d_k)``. Returns ``dq, dk, dv`` (operand
    dtype, ``[B, T, H, X]``), the initial state's cotangent ``(d_kv, d_k)`` float32 and
    ``d log_decay [B, T, H]`` float32 (None without decay).
    """
    (
        q_kernel,
        k_kernel,
        v_kernel,
        kernel_state,
        y_kernel,
        denominator,
        decay_kernel,
        final_state,
    ) = residuals
    static = _static(
        config, dy.shape[1], dy.shape[-1], kernel_state is not None, decay_kernel is not None
    )
    batch, heads, _, feature_dim = q_kernel.shape
    dy_kernel = _to_kernel(dy, static, static.padded_value_dim)
    d_final_kv, d_final_k = _state_to_kernel(*d_final_state, static)
    common_inputs = [q_kernel, k_kernel, v_kernel, y_kernel, dy_kernel, denominator]
    if decay_kernel is not None:
        common_inputs.append(decay_kernel)
    grid = (batch, heads, static.num_chunks)

    def common_specs(reverse: bool) -> list[pl.BlockSpec]:
        return [
            _chunk_spec(static, feature_dim, reverse),
            _chunk_spec(static, feature_dim, reverse),
            _chunk_spec(static, static.padded_value_dim, reverse),
            _chunk_spec(static, static.padded_value_dim, reverse),
            _chunk_spec(static, static.padded_value_dim, reverse),
            _rows_spec(static, reverse),
            *([_rows_spec(static, reverse)] if static.has_decay else []),
            *_factor_specs(static),
        ]

    query_inputs = [*common_inputs, *_factor_arrays(static)]
    query_specs = common_specs(reverse=False)
    if kernel_state is not None:
        query_inputs += list(kernel_state)
        query_specs += _state_specs(static)
    dq_kernel = pl.pallas_call(
        functools.partial(_backward_query_kernel, static=static),
        grid=grid,
        in_specs=query_specs,
        out_specs=_chunk_spec(static, feature_dim),
        out_shape=jax.ShapeDtypeStruct(q_kernel.shape, static.operand_dtype),
        scratch_shapes=_state_scratch(static),
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="based_linear_attention_backward_query",
    )(*query_inputs)

    key_term_outputs = []
    if static.has_decay:
        key_term_outputs = [(_rows_spec(static, reverse=True), denominator.shape)]
    dk_kernel, dv_kernel, *key_term, d_initial_kv, d_initial_k = pl.pallas_call(
        functools.partial(_backward_key_value_kernel, static=static),
        grid=grid,
        in_specs=[*common_specs(reverse=True), *_state_specs(static)],
        out_specs=[
            _chunk_spec(static, feature_dim, reverse=True),
            _chunk_spec(static, static.padded_value_dim, reverse=True),
            *(spec for spec, _ in key_term_outputs),
            *_state_specs(static),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(k_kernel.shape, static.operand_dtype),
            jax.ShapeDtypeStruct(v_kernel.shape, static.operand_dtype),
            *(jax.ShapeDtypeStruct(shape, jnp.float32) for _, shape in key_term_outputs),
            jax.ShapeDtypeStruct((batch, heads, static.rows, static.padded_value_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, 1, static.rows), jnp.float32),
        ],
        scratch_shapes=_state_scratch(static),
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="based_linear_attention_backward_key_value",
    )(*query_inputs[: len(common_inputs) + 5], d_final_kv, d_final_k)

    dq = _from_kernel(dq_kernel, static, feature_dim, static.operand_dtype)
    dk = _from_kernel(dk_kernel, static, feature_dim, static.operand_dtype)
    dv = _from_kernel(dv_kernel, static, static.value_dim, static.operand_dtype)
    d_log_decay = None
    if static.has_decay:
        y_dot_dy = jnp.sum(dy_kernel.astype(jnp.float32) * y_kernel.astype(jnp.float32), axis=-1)
        d_log_decay = log_decay_cotangent(
            y_dot_dy,
            _rows_from_kernel(denominator),
            _rows_from_kernel(key_term[0]),
            final_state,
            d_final_state,
            seq_len=static.seq_len,
            eps=static.eps,
            normalize=static.normalize,
        )
    d_initial = _state_from_kernel(d_initial_kv, d_initial_k, static)
    return dq, dk, dv, d_initial, d_log_decay
