"""Mosaic TPU kernels of chunked causal linear attention (forward, dq, dk/dv).

Grid ``(B, H, N)`` over batch, heads and chunks of ``C`` tokens. The chunk axis is sequential
("arbitrary"); the state ``S [rows, Dp]`` and normalizer ``z [1, rows]`` (float32) live in VMEM
scratch across it and never go to HBM except once at the end (the returned final state). Batch
and heads are "parallel" (split across the two TensorCores of a megacore chip).

Kernel layout: head-major ``[B, H, T_pad, X]`` with ``T_pad`` a multiple of ``C``; ``q, k`` keep
their ``F`` lanes (a block may span a whole minor dim) and values are padded to 64 lanes or a
multiple of 128 (``Dp``). Per-token rows (the denominator, the cumulative log decays, the
decay's key term) are stored lane-dense as ``[B, H, N, 8, C]`` (each chunk's row replicated
over 8 sublanes) instead of a ``[T, 128]`` broadcast.

Backward: ``dq`` runs forward over the chunks and rebuilds the state; ``dk, dv`` run backward
over the chunks (reversed index maps) carrying the state's cotangent ``dS [rows, Dp]``,
``dz [1, rows]`` in VMEM, which ends as the initial state's cotangent.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import column_to_row, pad_axis, row_to_column, tpu_lane_width
from pallas_kernels.linear_attention._call import (
    ChunkedCall,
    Residuals,
    chunk_cumulative_log_decay,
    kernel_inputs,
    log_decay_cotangent,
    split_kernel_refs,
)
from pallas_kernels.linear_attention._chunk import (
    SegmentState,
    chunk_backward_key_value,
    chunk_backward_query,
    chunk_decay,
    chunk_forward,
    output_cotangents,
)
from pallas_kernels.linear_attention._features import ChunkFeatures, Factors

SUBLANES = 8


def _static(
    config: Any,
    seq_len: int,
    value_dim: int,
    has_initial_state: bool,
    has_decay: bool,
    heads_per_group: int,
) -> ChunkedCall:
    return ChunkedCall.create(
        config,
        seq_len,
        value_dim,
        tpu_lane_width(value_dim),
        has_initial_state=has_initial_state,
        has_decay=has_decay,
        heads_per_group=heads_per_group,
    )


# Layout conversions (XLA, outside the kernels) --------------------------------------------------
def _to_kernel(x: jax.Array, static: ChunkedCall, width: int) -> jax.Array:
    """``[B, T, H, X] -> [B, H, T_pad, width]`` zero padded, in the operand dtype."""
    x = jnp.swapaxes(x, 1, 2).astype(static.operand_dtype)
    return pad_axis(pad_axis(x, 2, static.padded_seq), 3, width)


def _from_kernel(x: jax.Array, static: ChunkedCall, width: int, dtype) -> jax.Array:
    """``[B, H, T_pad, X_pad] -> [B, T, H, width]`` in ``dtype``."""
    return jnp.swapaxes(x[:, :, : static.seq_len, :width], 1, 2).astype(dtype)


def _rows_to_kernel(x: jax.Array) -> jax.Array:
    """Per-token ``[B, H, N, C]`` -> lane-dense ``[B, H, N, 8, C]`` (replicated sublanes)."""
    return jnp.broadcast_to(x[:, :, :, None, :], (*x.shape[:3], SUBLANES, x.shape[3]))


def _rows_from_kernel(x: jax.Array) -> jax.Array:
    """Lane-dense ``[B, H, N, 8, C]`` -> per-token ``[B, H, T_pad]``."""
    batch, heads, num_chunks, _, chunk_size = x.shape
    return x[:, :, :, 0, :].reshape(batch, heads, num_chunks * chunk_size)


# Block specs -------------------------------------------------------------------------------------
def _chunk_index(static: ChunkedCall, reverse: bool):
    """Grid step ``n`` -> chunk ``n`` (forward) or ``N - 1 - n`` (reverse)."""
    last = static.num_chunks - 1
    return (lambda n: last - n) if reverse else (lambda n: n)


def _chunk_spec(
    static: ChunkedCall, width: int, reverse: bool = False, grouped: bool = False
) -> pl.BlockSpec:
    """One chunk of a head's ``[B, H, T_pad, width]`` array, or (``grouped``) of its group's
    ``[B, G, T_pad, width]`` queries or keys."""
    chunk = _chunk_index(static, reverse)
    head = static.group_of if grouped else (lambda h: h)
    shape = (None, None, static.chunk_size, width)
    return pl.BlockSpec(shape, lambda b, h, n: (b, head(h), chunk(n), 0))


def _rows_spec(static: ChunkedCall, reverse: bool = False) -> pl.BlockSpec:
    chunk = _chunk_index(static, reverse)
    shape = (None, None, None, SUBLANES, static.chunk_size)
    return pl.BlockSpec(shape, lambda b, h, n: (b, h, chunk(n), 0, 0))


def _state_specs(static: ChunkedCall) -> list[pl.BlockSpec]:
    return [
        pl.BlockSpec(
            (None, None, static.rows, static.padded_value_dim), lambda b, h, n: (b, h, 0, 0)
        ),
        pl.BlockSpec((None, None, 1, static.rows), lambda b, h, n: (b, h, 0, 0)),
    ]


def _state_shapes(static: ChunkedCall, batch: int, heads: int) -> list[jax.ShapeDtypeStruct]:
    return [
        jax.ShapeDtypeStruct((batch, heads, static.rows, static.padded_value_dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, heads, 1, static.rows), jnp.float32),
    ]


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _state_scratch(static: ChunkedCall) -> list:
    return [
        pltpu.VMEM((static.rows, static.padded_value_dim), jnp.float32),
        pltpu.VMEM((1, static.rows), jnp.float32),
    ]


# Inside the kernels ------------------------------------------------------------------------------
def _load_features(static: ChunkedCall, refs) -> ChunkFeatures:
    return static.features([Factors(*(ref[...] for ref in refs))] if refs else [])


def _load_decay(static: ChunkedCall, decay_ref):
    return chunk_decay(decay_ref[0:1, :]) if static.has_decay else None


def _start_state(static: ChunkedCall, initial_refs, kv_scratch, k_scratch) -> None:
    """At the first chunk: the scratch state is the initial state, or zero."""
    if static.has_initial_state:
        initial_kv_ref, initial_k_ref = initial_refs
        kv_scratch[...] = initial_kv_ref[...]
        k_scratch[...] = initial_k_ref[...]
    else:
        kv_scratch[...] = jnp.zeros(kv_scratch.shape, jnp.float32)
        k_scratch[...] = jnp.zeros(k_scratch.shape, jnp.float32)


# Forward -----------------------------------------------------------------------------------------
def _forward_kernel(*refs, static: ChunkedCall):
    q_ref, k_ref, v_ref, *refs = refs
    decay_ref, factor_refs, initial_refs, refs = split_kernel_refs(static, refs)
    y_ref, denominator_ref, final_kv_ref, final_k_ref, kv_scratch, k_scratch = refs
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _start():
        _start_state(static, initial_refs, kv_scratch, k_scratch)

    y, denominator, (state,) = chunk_forward(
        q_ref[...],
        k_ref[...],
        v_ref[...],
        [SegmentState(kv_scratch[...], k_scratch[...])],
        _load_features(static, factor_refs),
        eps=static.eps,
        key_valid=static.key_valid(chunk * static.chunk_size),
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
) -> tuple[jax.Array, tuple[jax.Array, jax.Array], Residuals]:
    """Forward kernel for ``config`` (a ``LinearAttentionConfig``).

    ``q, k [B, T, G, F]`` (G divides H), ``v [B, T, H, Dv]``; ``initial_state`` is None or
    ``(kv [B, H, D', Dv], k [B, H, D'])``; ``log_decay`` None or ``[B, T, H]`` float32.
    Returns ``y [B, T, H, Dv]``, the final state ``(kv, k)`` float32 and the residuals for
    :func:`backward`.
    """
    batch, _, heads, _ = v.shape
    static = _static(
        config,
        q.shape[1],
        v.shape[-1],
        initial_state is not None,
        log_decay is not None,
        heads // q.shape[2],
    )
    feature_dim = static.layout.padded_feature_dim
    q_kernel = _to_kernel(q, static, feature_dim)
    k_kernel = _to_kernel(k, static, feature_dim)
    v_kernel = _to_kernel(v, static, static.padded_value_dim)
    decay_kernel = kernel_state = None
    if log_decay is not None:
        decay_kernel = _rows_to_kernel(
            chunk_cumulative_log_decay(log_decay, static.chunk_size, static.num_chunks)
        )
    if initial_state is not None:
        kernel_state = static.state_to_kernel(*initial_state)
    inputs, in_specs = kernel_inputs(
        static,
        [
            (q_kernel, _chunk_spec(static, feature_dim, grouped=True)),
            (k_kernel, _chunk_spec(static, feature_dim, grouped=True)),
            (v_kernel, _chunk_spec(static, static.padded_value_dim)),
        ],
        None if decay_kernel is None else (decay_kernel, _rows_spec(static)),
        kernel_state,
        _state_specs(static),
    )
    y_kernel, denominator, final_kv, final_k = pl.pallas_call(
        functools.partial(_forward_kernel, static=static),
        grid=(batch, heads, static.num_chunks),
        in_specs=in_specs,
        out_specs=[
            _chunk_spec(static, static.padded_value_dim),
            _rows_spec(static),
            *_state_specs(static),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(v_kernel.shape, static.operand_dtype),
            jax.ShapeDtypeStruct(
                (batch, heads, static.num_chunks, SUBLANES, static.chunk_size), jnp.float32
            ),
            *_state_shapes(static, batch, heads),
        ],
        scratch_shapes=_state_scratch(static),
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="based_linear_attention_forward",
    )(*inputs)
    y = _from_kernel(y_kernel, static, static.value_dim, v.dtype)
    final_state = static.state_from_kernel(final_kv, final_k)
    residuals = Residuals(
        q_kernel,
        k_kernel,
        v_kernel,
        kernel_state,
        y_kernel,
        denominator,
        decay_kernel,
        final_state if log_decay is not None else None,
    )
    return y, final_state, residuals


# Backward ----------------------------------------------------------------------------------------
def _cotangents(y_ref, dy_ref, denominator_ref, static: ChunkedCall):
    """``(dN, dD)`` of the chunk; ``dD`` is None without the normalizer (``dN = dy``)."""
    dy = dy_ref[...].astype(jnp.float32)
    if not static.normalize:
        return dy, None
    y_dot_dy = jnp.sum(dy * y_ref[...].astype(jnp.float32), axis=1, keepdims=True)
    denominator = row_to_column(denominator_ref[0:1, :])
    return output_cotangents(dy, y_dot_dy, denominator, static.eps)


def _backward_query_kernel(*refs, static: ChunkedCall):
    q_ref, k_ref, v_ref, y_ref, dy_ref, denominator_ref, *refs = refs
    decay_ref, factor_refs, initial_refs, refs = split_kernel_refs(static, refs)
    dq_ref, kv_scratch, k_scratch = refs
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _start():
        _start_state(static, initial_refs, kv_scratch, k_scratch)

    d_numerator, d_denominator = _cotangents(y_ref, dy_ref, denominator_ref, static)
    dq, (state,) = chunk_backward_query(
        q_ref[...],
        k_ref[...],
        v_ref[...],
        d_numerator,
        d_denominator,
        [SegmentState(kv_scratch[...], k_scratch[...])],
        _load_features(static, factor_refs),
        key_valid=static.key_valid(chunk * static.chunk_size),
        decay=_load_decay(static, decay_ref),
    )
    dq_ref[...] = dq.astype(dq_ref.dtype)
    kv_scratch[...] = state.kv
    k_scratch[...] = state.k


def _backward_key_value_kernel(*refs, static: ChunkedCall):
    q_ref, k_ref, v_ref, y_ref, dy_ref, denominator_ref, *refs = refs
    decay_ref, factor_refs, _, refs = split_kernel_refs(static, refs, reads_initial_state=False)
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
        _load_features(static, factor_refs),
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
    config: Any,
    residuals: Residuals,
    dy: jax.Array,
    d_final_state: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array], jax.Array | None]:
    """Backward kernels for ``config``; ``residuals`` from :func:`forward`.

    ``dy [B, T, H, Dv]``, ``d_final_state = (d_kv, d_k)``. Returns ``dq, dk, dv`` (operand
    dtype, ``[B, T, H, X]``), the initial state's cotangent ``(d_kv, d_k)`` float32 and
    ``d log_decay [B, T, H]`` float32 (None without decay).
    """
    batch, _, heads, _ = dy.shape
    static = _static(
        config,
        dy.shape[1],
        dy.shape[-1],
        residuals.initial_state is not None,
        residuals.cumulative_decay is not None,
        heads // residuals.q.shape[1],
    )
    feature_dim = residuals.q.shape[-1]
    # dq, dk per head; float32 when the heads of a group are summed afterwards.
    per_head_features = jax.ShapeDtypeStruct(
        (batch, heads, static.padded_seq, feature_dim),
        jnp.float32 if static.heads_per_group > 1 else static.operand_dtype,
    )
    dy_kernel = _to_kernel(dy, static, static.padded_value_dim)
    grid = (batch, heads, static.num_chunks)

    def inputs_and_specs(reverse: bool, initial_state):
        value = _chunk_spec(static, static.padded_value_dim, reverse)
        operands = [
            (residuals.q, _chunk_spec(static, feature_dim, reverse, grouped=True)),
            (residuals.k, _chunk_spec(static, feature_dim, reverse, grouped=True)),
            (residuals.v, value),
            (residuals.y, value),
            (dy_kernel, value),
            (residuals.denominator, _rows_spec(static, reverse)),
        ]
        decay = None
        if static.has_decay:
            decay = (residuals.cumulative_decay, _rows_spec(static, reverse))
        return kernel_inputs(static, operands, decay, initial_state, _state_specs(static))

    query_inputs, query_specs = inputs_and_specs(False, residuals.initial_state)
    dq_kernel = pl.pallas_call(
        functools.partial(_backward_query_kernel, static=static),
        grid=grid,
        in_specs=query_specs,
        out_specs=_chunk_spec(static, feature_dim),
        out_shape=per_head_features,
        scratch_shapes=_state_scratch(static),
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="based_linear_attention_backward_query",
    )(*query_inputs)

    # The dk/dv kernel reads the final state's cotangent where dq reads the initial state.
    d_final_kernel = static.state_to_kernel(*d_final_state)
    key_value_inputs, key_value_specs = inputs_and_specs(True, d_final_kernel)
    key_term_outputs = []
    if static.has_decay:
        key_term_outputs = [(_rows_spec(static, reverse=True), residuals.denominator.shape)]
    dk_kernel, dv_kernel, *key_term, d_initial_kv, d_initial_k = pl.pallas_call(
        functools.partial(_backward_key_value_kernel, static=static),
        grid=grid,
        in_specs=key_value_specs,
        out_specs=[
            _chunk_spec(static, feature_dim, reverse=True),
            _chunk_spec(static, static.padded_value_dim, reverse=True),
            *(spec for spec, _ in key_term_outputs),
            *_state_specs(static),
        ],
        out_shape=[
            per_head_features,
            jax.ShapeDtypeStruct(residuals.v.shape, static.operand_dtype),
            *(jax.ShapeDtypeStruct(shape, jnp.float32) for _, shape in key_term_outputs),
            *_state_shapes(static, batch, heads),
        ],
        scratch_shapes=_state_scratch(static),
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        name="based_linear_attention_backward_key_value",
    )(*key_value_inputs)

    feature_dim, dtype = static.layout.feature_dim, per_head_features.dtype
    dq = static.sum_over_groups(_from_kernel(dq_kernel, static, feature_dim, dtype), 2)
    dk = static.sum_over_groups(_from_kernel(dk_kernel, static, feature_dim, dtype), 2)
    dq, dk = dq.astype(static.operand_dtype), dk.astype(static.operand_dtype)
    dv = _from_kernel(dv_kernel, static, static.value_dim, static.operand_dtype)
    d_log_decay = None
    if static.has_decay:
        y_dot_dy = jnp.sum(dy_kernel.astype(jnp.float32) * residuals.y.astype(jnp.float32), axis=-1)
        d_log_decay = log_decay_cotangent(
            static,
            y_dot_dy,
            _rows_from_kernel(residuals.denominator),
            _rows_from_kernel(key_term[0]),
            residuals.final_state,
            d_final_state,
        )
    return dq, dk, dv, static.state_from_kernel(d_initial_kv, d_initial_k), d_log_decay
