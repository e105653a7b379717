"""GPU kernels (Pallas' Triton lowering) of chunked causal Taylor linear attention.

Why Triton and not Mosaic GPU: with JAX 0.10 both exist, but Mosaic GPU programs warpgroups of
Hopper/Blackwell (``wgmma``/``tcgen05``) and needs a different kernel per architecture, while
the Triton lowering runs on every CUDA GPU JAX supports (and lowers from a CPU host with
``jax.export``, which the tests use). An H100/H200-specific Mosaic GPU kernel is future work.

Grid ``(B, H, Dp / BV)``: one program per batch row, head and block of ``BV`` value columns;
each program loops over the chunks with ``lax.fori_loop`` and carries its slice of the state
``S [rows, BV]`` and the normalizer ``z [1, rows]`` (float32) in registers, split in segments
whose sizes are powers of two (Triton's rule for block-level arrays). Every program recomputes
the intra-chunk kernel ``A`` and the denominator for its value block (cheap: ``F``-dim dots), so
value blocks are independent.

Layout: batch-major ``[B, T_pad, H, X]`` read with strided blocks (no transpose); ``F`` and the
value dim are padded to powers of two >= 16, ``T`` to a multiple of the chunk.

Backward: ``dq`` forward over the chunks, ``dk, dv`` backward over them carrying ``dS``; each
value block yields a partial ``dq``/``dk`` that the wrapper sums (the normalizer's terms are
added by value block 0 only). ``sum_d dy_d y_d`` is computed by XLA before the kernels.
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

from pallas_kernels._common import next_power_of_two, pad_axis
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


@dataclasses.dataclass(frozen=True)
class _Static:
    """Compile-time parameters of one call: the op's config plus the shapes."""

    layout: TaylorLayout
    seq_len: int
    chunk_size: int
    num_chunks: int
    value_dim: int
    padded_value_dim: int
    value_block: int
    eps: float
    operand_dtype: Any
    has_initial_state: bool
    has_decay: bool
    normalize: bool
    interpret: Any
    num_warps: int

    @property
    def rows(self) -> int:
        return self.layout.rows

    @property
    def padded_seq(self) -> int:
        return self.num_chunks * self.chunk_size

    @property
    def value_blocks(self) -> int:
        return self.padded_value_dim // self.value_block


def _static(
    config: Any, seq_len: int, value_dim: int, has_initial_state: bool, has_decay: bool
) -> _Static:
    padded_value_dim = next_power_of_two(value_dim, 16)
    value_block = min(config.value_block_size or 32, padded_value_dim)
    num_warps = config.num_warps or (4 if config.chunk_size <= 32 else 8)
    return _Static(
        layout=config.layout,
        seq_len=seq_len,
        chunk_size=config.chunk_size,
        num_chunks=-(-seq_len // config.chunk_size),
        value_dim=value_dim,
        padded_value_dim=padded_value_dim,
        value_block=value_block,
        eps=config.eps,
        operand_dtype=config.operand_dtype,
        has_initial_state=has_initial_state,
        has_decay=has_decay,
        normalize=config.normalize,
        interpret=config.interpret,
        num_warps=num_warps,
    )


def _to_kernel(x: jax.Array, static: _Static, width: int) -> jax.Array:
    """``[B, T, H, X] -> [B, T_pad, H, width]`` zero padded, in the operand dtype."""
    return pad_axis(pad_axis(x.astype(static.operand_dtype), 1, static.padded_seq), 3, width)


def _state_to_kernel(kv: jax.Array, k: jax.Array, static: _Static):
    kv = pad_axis(static.layout.to_rows(kv.astype(jnp.float32), axis=2), 3, static.padded_value_dim)
    k = static.layout.to_rows(k.astype(jnp.float32), axis=2)[:, :, None, :]
    return kv, k


def _state_from_kernel(kv: jax.Array, k: jax.Array, static: _Static):
    kv = static.layout.from_rows(kv[..., : static.value_dim], axis=2)
    k = static.layout.from_rows(k[:, :, 0, :], axis=2)
    return kv, k


def _row_specs(static: _Static, width: int, blocked: bool) -> pl.BlockSpec:
    """Whole (padded) sequence of one (batch, head); ``blocked``: one value block of it."""
    if blocked:
        return pl.BlockSpec(
            (None, static.padded_seq, None, static.value_block), lambda b, h, j: (b, 0, h, j)
        )
    return pl.BlockSpec((None, static.padded_seq, None, width), lambda b, h, j: (b, 0, h, 0))


def _per_token_spec(static: _Static) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, static.padded_seq), lambda b, h, j: (b, h, 0))


def _whole_spec(shape: tuple[int, ...]) -> pl.BlockSpec:
    return pl.BlockSpec(shape, lambda b, h, j: (0,) * len(shape))


def _factor_specs(static: _Static) -> list[pl.BlockSpec]:
    padded_feature_dim, rows = static.layout.padded_feature_dim, static.rows
    return [_whole_spec((padded_feature_dim, rows))] * 2 + [_whole_spec((1, rows))] * 3


def _state_specs(static: _Static) -> list[pl.BlockSpec]:
    return [
        pl.BlockSpec((None, None, static.rows, static.value_block), lambda b, h, j: (b, h, 0, j)),
        pl.BlockSpec((None, None, 1, static.rows), lambda b, h, j: (b, h, 0, 0)),
    ]


def _partial_spec(static: _Static, width: int) -> pl.BlockSpec:
    """Per-value-block partial sums ``[NVB, B, T_pad, H, width]``."""
    return pl.BlockSpec(
        (None, None, static.padded_seq, None, width), lambda b, h, j: (j, b, 0, h, 0)
    )


def _load_factors(static: _Static, refs) -> list[Factors]:
    left_ref, right_ref, left_bias_ref, right_bias_ref, scale_ref = refs
    factors = []
    for segment in static.layout.segments:
        columns = pl.ds(segment.row_offset, segment.rows)
        factors.append(
            Factors(
                left_ref[:, columns],
                right_ref[:, columns],
                left_bias_ref[:, columns],
                right_bias_ref[:, columns],
                scale_ref[:, columns],
            )
        )
    return factors


def _load_states(static: _Static, kv_ref, k_ref, k_scale=None) -> list[SegmentState]:
    states = []
    for segment in static.layout.segments:
        rows = pl.ds(segment.row_offset, segment.rows)
        k = k_ref[:, rows]
        states.append(SegmentState(kv_ref[rows, :], k if k_scale is None else k * k_scale))
    return states


def _zero_states(static: _Static) -> list[SegmentState]:
    return [
        SegmentState(
            jnp.zeros((segment.rows, static.value_block), jnp.float32),
            jnp.zeros((1, segment.rows), jnp.float32),
        )
        for segment in static.layout.segments
    ]


def _store_states(static: _Static, states, kv_ref, k_ref, write_k) -> None:
    for segment, state in zip(static.layout.segments, states, strict=True):
        rows = pl.ds(segment.row_offset, segment.rows)
        kv_ref[rows, :] = state.kv

        if write_k is None:
            k_ref[:, rows] = state.k
        else:

            @pl.when(write_k)
            def _store_k(rows=rows, state=state):
                k_ref[:, rows] = state.k


def _key_valid(static: _Static, start) -> jax.Array | None:
    if static.seq_len % static.chunk_size == 0:
        return None
    positions = start + lax.broadcasted_iota(jnp.int32, (static.chunk_size, 1), 0)
    return positions < static.seq_len


def _load_decay(static: _Static, decay_ref, tokens):
    if not static.has_decay:
        return None
    return chunk_decay(decay_ref[tokens].reshape(1, static.chunk_size))


def _factor_arrays(static: _Static) -> list[jax.Array]:
    return [jnp.asarray(a) for a in static.layout.factors()]


def _compiler_params(static: _Static):
    return plgpu.CompilerParams(num_warps=static.num_warps, num_stages=2)


# Forward -----------------------------------------------------------------------------------------
def _forward_kernel(*refs, static: _Static):
    q_ref, k_ref, v_ref, *refs = refs
    decay_ref = refs.pop(0) if static.has_decay else None
    factor_refs, refs = refs[:5], refs[5:]
    if static.has_initial_state:
        initial_kv_ref, initial_k_ref, *refs = refs
    y_ref, denominator_ref, final_kv_ref, final_k_ref = refs
    first_value_block = pl.program_id(2) == 0
    factors = _load_factors(static, factor_refs)
    if static.has_initial_state:
        states = _load_states(static, initial_kv_ref, initial_k_ref)
    else:
        states = _zero_states(static)
    chunk_size = static.chunk_size

    def body(chunk, states):
        start = pl.multiple_of(chunk * chunk_size, chunk_size)
        tokens = pl.ds(start, chunk_size)
        y, denominator, states = chunk_forward(
            q_ref[tokens, :],
            k_ref[tokens, :],
            v_ref[tokens, :],
            states,
            factors,
            feature_dim=static.layout.feature_dim,
            eps=static.eps,
            operand_dtype=static.operand_dtype,
            key_valid=_key_valid(static, start),
            decay=_load_decay(static, decay_ref, tokens),
            normalize=static.normalize,
        )
        y_ref[tokens, :] = y.astype(y_ref.dtype)

        @pl.when(first_value_block)
        def _store_denominator():
            denominator_ref[tokens] = denominator.reshape(chunk_size)

        return states

    states = lax.fori_loop(0, static.num_chunks, body, states)
    _store_states(static, states, final_kv_ref, final_k_ref, first_value_block)


def forward(
    config: Any,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    initial_state: tuple[jax.Array, jax.Array] | None,
    log_decay: jax.Array | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array], tuple]:
    """Forward kernel for ``config`` (a ``LinearAttentionConfig``). ``q, k [B, T, H, F]``,
    ``v [B, T, H, Dv]``; ``initial_state`` is None or ``(kv [B, H, D', Dv], k [B, H, D'])``;
    ``log_decay`` None or ``[B, T, H]`` float32.

    Returns ``y [B, T, H, Dv]``, the final state ``(kv, k)`` float32 and the residuals.
    """
    static = _static(
        config, q.shape[1], v.shape[-1], initial_state is not None, log_decay is not None
    )
    batch, _, heads, _ = q.shape
    padded_feature_dim = static.layout.padded_feature_dim
    q_kernel = _to_kernel(q, static, padded_feature_dim)
    k_kernel = _to_kernel(k, static, padded_feature_dim)
    v_kernel = _to_kernel(v, static, static.padded_value_dim)
    decay_kernel = None
    if log_decay is not None:
        cumulative = chunk_cumulative_log_decay(log_decay, static.chunk_size, static.num_chunks)
        decay_kernel = cumulative.reshape(batch, heads, static.padded_seq)
    inputs = [
        q_kernel,
        k_kernel,
        v_kernel,
        *([] if decay_kernel is None else [decay_kernel]),
        *_factor_arrays(static),
    ]
    in_specs = [
        _row_specs(static, padded_feature_dim, blocked=False),
        _row_specs(static, padded_feature_dim, blocked=False),
        _row_specs(static, static.padded_value_dim, blocked=True),
        *([] if decay_kernel is None else [_per_token_spec(static)]),
        *_factor_specs(static),
    ]
    kernel_state = None
    if initial_state is not None:
        kernel_state = _state_to_kernel(*initial_state, static)
        inputs += list(kernel_state)
        in_specs += _state_specs(static)
    y_kernel, denominator, final_kv, final_k = pl.pallas_call(
        functools.partial(_forward_kernel, static=static),
        grid=(batch, heads, static.value_blocks),
        in_specs=in_specs,
        out_specs=[
            _row_specs(static, static.padded_value_dim, blocked=True),
            _per_token_spec(static),
            *_state_specs(static),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(v_kernel.shape, static.operand_dtype),
            jax.ShapeDtypeStruct((batch, heads, static.padded_seq), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, static.rows, static.padded_value_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, 1, static.rows), jnp.float32),
        ],
        compiler_params=_compiler_params(static),
        interpret=static.interpret,
        name="based_linear_attention_forward",
    )(*inputs)
    y = y_kernel[:, : static.seq_len, :, : static.value_dim]
    final_state = _state_from_kernel(final_kv, final_k, static)
    residuals = (
        q_kernel,
        k_kernel,
        v_kernel,
        kernel_state,
        y,
        denominator,
        decay_kernel,
        None if decay_kernel is None else final_state,
    )
    return y, final_state, residuals


# Backward ----------------------------------------------------------------------------------------
def _cotangents(static: _Static, dy_ref, y_dot_dy_ref, denominator_ref, tokens, normalizer_scale):
    """``(dN, dD)`` of the chunk; ``dD`` is None without the normalizer (``dN = dy``)."""
    if not static.normalize:
        return dy_ref[tokens, :].astype(jnp.float32), None
    chunk_size = static.chunk_size
    denominator = denominator_ref[tokens].reshape(chunk_size, 1)
    y_dot_dy = y_dot_dy_ref[tokens].reshape(chunk_size, 1)
    d_numerator, d_denominator = output_cotangents(
        dy_ref[tokens, :].astype(jnp.float32), y_dot_dy, denominator, static.eps
    )
    # The normalizer's cotangent enters once: value block 0 adds it, the others add zero.
    return d_numerator, d_denominator * normalizer_scale


def _backward_query_kernel(*refs, static: _Static):
    q_ref, k_ref, v_ref, dy_ref, y_dot_dy_ref, denominator_ref, *refs = refs
    decay_ref = refs.pop(0) if static.has_decay else None
    factor_refs, refs = refs[:5], refs[5:]
    if static.has_initial_state:
        initial_kv_ref, initial_k_ref, *refs = refs
    (dq_ref,) = refs
    normalizer_scale = (pl.program_id(2) == 0).astype(jnp.float32)
    factors = _load_factors(static, factor_refs)
    if static.has_initial_state:
        states = _load_states(static, initial_kv_ref, initial_k_ref)
    else:
        states = _zero_states(static)
    chunk_size = static.chunk_size

    def body(chunk, states):
        start = pl.multiple_of(chunk * chunk_size, chunk_size)
        tokens = pl.ds(start, chunk_size)
        d_numerator, d_denominator = _cotangents(
            static, dy_ref, y_dot_dy_ref, denominator_ref, tokens, normalizer_scale
        )
        dq, states = chunk_backward_query(
            q_ref[tokens, :],
            k_ref[tokens, :],
            v_ref[tokens, :],
            d_numerator,
            d_denominator,
            states,
            factors,
            feature_dim=static.layout.feature_dim,
            operand_dtype=static.operand_dtype,
            key_valid=_key_valid(static, start),
            decay=_load_decay(static, decay_ref, tokens),
        )
        dq_ref[tokens, :] = dq
        return states

    lax.fori_loop(0, static.num_chunks, body, states)


def _backward_key_value_kernel(*refs, static: _Static):
    q_ref, k_ref, v_ref, dy_ref, y_dot_dy_ref, denominator_ref, *refs = refs
    decay_ref = refs.pop(0) if static.has_decay else None
    factor_refs, refs = refs[:5], refs[5:]
    final_d_kv_ref, final_d_k_ref, dk_ref, dv_ref, *refs = refs
    key_term_ref = refs.pop(0) if static.has_decay else None
    initial_d_kv_ref, initial_d_k_ref = refs
    normalizer_scale = (pl.program_id(2) == 0).astype(jnp.float32)
    factors = _load_factors(static, factor_refs)
    d_states = _load_states(static, final_d_kv_ref, final_d_k_ref, k_scale=normalizer_scale)
    chunk_size = static.chunk_size

    def body(step, d_states):
        chunk = static.num_chunks - 1 - step
        start = pl.multiple_of(chunk * chunk_size, chunk_size)
        tokens = pl.ds(start, chunk_size)
        d_numerator, d_denominator = _cotangents(
            static, dy_ref, y_dot_dy_ref, denominator_ref, tokens, normalizer_scale
        )
        dk, dv, d_states, key_term = chunk_backward_key_value(
            q_ref[tokens, :],
            k_ref[tokens, :],
            v_ref[tokens, :],
            d_numerator,
            d_denominator,
            d_states,
            factors,
            feature_dim=static.layout.feature_dim,
            operand_dtype=static.operand_dtype,
            decay=_load_decay(static, decay_ref, tokens),
        )
        dk_ref[tokens, :] = dk
        dv_ref[tokens, :] = dv.astype(dv_ref.dtype)
        if static.has_decay:
            key_term_ref[tokens] = key_term.reshape(chunk_size)
        return d_states

    d_states = lax.fori_loop(0, static.num_chunks, body, d_states)
    _store_states(static, d_states, initial_d_kv_ref, initial_d_k_ref, None)


def backward(
    config: Any, residuals: tuple, dy: jax.Array, d_final_state: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array], jax.Array | None]:
    """Backward kernels for ``config``; ``residuals`` from :func:`forward`.

    Returns ``dq, dk, dv`` (operand dtype, ``[B, T, H, X]``), the initial state's cotangent
    ``(d_kv [B, H, D', Dv], d_k [B, H, D'])`` float32 and ``d log_decay [B, T, H]`` float32
    (None without decay).
    """
    q_kernel, k_kernel, v_kernel, kernel_state, y, denominator, decay_kernel, final_state = (
        residuals
    )
    static = _static(
        config, dy.shape[1], dy.shape[-1], kernel_state is not None, decay_kernel is not None
    )
    batch, _, heads, padded_feature_dim = q_kernel.shape
    dy_kernel = _to_kernel(dy, static, static.padded_value_dim)
    y_dot_dy = jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1)  # [B, T, H]
    y_dot_dy = pad_axis(jnp.swapaxes(y_dot_dy, 1, 2), 2, static.padded_seq)  # [B, H, T_pad]
    d_final_kv, d_final_k = _state_to_kernel(*d_final_state, static)
    grid = (batch, heads, static.value_blocks)
    common_inputs = [q_kernel, k_kernel, v_kernel, dy_kernel, y_dot_dy, denominator]
    common_specs = [
        _row_specs(static, padded_feature_dim, blocked=False),
        _row_specs(static, padded_feature_dim, blocked=False),
        _row_specs(static, static.padded_value_dim, blocked=True),
        _row_specs(static, static.padded_value_dim, blocked=True),
        _per_token_spec(static),
        _per_token_spec(static),
    ]
    if static.has_decay:
        common_inputs.append(decay_kernel)
        common_specs.append(_per_token_spec(static))
    common_specs += _factor_specs(static)
    factor_arrays = _factor_arrays(static)
    partial_shape = (static.value_blocks, batch, static.padded_seq, heads, padded_feature_dim)

    query_inputs = [*common_inputs, *factor_arrays]
    query_specs = list(common_specs)
    if kernel_state is not None:
        query_inputs += list(kernel_state)
        query_specs += _state_specs(static)
    dq_partial = pl.pallas_call(
        functools.partial(_backward_query_kernel, static=static),
        grid=grid,
        in_specs=query_specs,
        out_specs=_partial_spec(static, padded_feature_dim),
        out_shape=jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        compiler_params=_compiler_params(static),
        interpret=static.interpret,
        name="based_linear_attention_backward_query",
    )(*query_inputs)

    # Per-value-block partial sums of the decay's key term [NVB, B, H, T_pad].
    key_term_outputs = []
    if static.has_decay:
        key_term_outputs = [
            (
                pl.BlockSpec((None, None, None, static.padded_seq), lambda b, h, j: (j, b, h, 0)),
                jax.ShapeDtypeStruct(
                    (static.value_blocks, batch, heads, static.padded_seq), jnp.float32
                ),
            )
        ]
    dk_partial, dv_kernel, *key_term, d_initial_kv, d_initial_k = pl.pallas_call(
        functools.partial(_backward_key_value_kernel, static=static),
        grid=grid,
        in_specs=[
            *common_specs,
            pl.BlockSpec(
                (None, None, static.rows, static.value_block), lambda b, h, j: (b, h, 0, j)
            ),
            pl.BlockSpec((None, None, 1, static.rows), lambda b, h, j: (b, h, 0, 0)),
        ],
        out_specs=[
            _partial_spec(static, padded_feature_dim),
            _row_specs(static, static.padded_value_dim, blocked=True),
            *(spec for spec, _ in key_term_outputs),
            pl.BlockSpec(
                (None, None, static.rows, static.value_block), lambda b, h, j: (b, h, 0, j)
            ),
            pl.BlockSpec((None, None, None, 1, static.rows), lambda b, h, j: (j, b, h, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(v_kernel.shape, static.operand_dtype),
            *(shape for _, shape in key_term_outputs),
            jax.ShapeDtypeStruct((batch, heads, static.rows, static.padded_value_dim), jnp.float32),
            jax.ShapeDtypeStruct((static.value_blocks, batch, heads, 1, static.rows), jnp.float32),
        ],
        compiler_params=_compiler_params(static),
        interpret=static.interpret,
        name="based_linear_attention_backward_key_value",
    )(*common_inputs, *factor_arrays, d_final_kv, d_final_k)

    feature_dim = static.layout.feature_dim

    def unpad(x: jax.Array, width: int) -> jax.Array:
        return x[:, : static.seq_len, :, :width].astype(static.operand_dtype)

    dq = unpad(dq_partial.sum(0), feature_dim)
    dk = unpad(dk_partial.sum(0), feature_dim)
    dv = unpad(dv_kernel, static.value_dim)
    d_initial = _state_from_kernel(d_initial_kv, d_initial_k.sum(0), static)
    d_log_decay = None
    if static.has_decay:
        d_log_decay = log_decay_cotangent(
            y_dot_dy,
            denominator,
            key_term[0].sum(0),
            final_state,
            d_final_state,
            seq_len=static.seq_len,
            eps=static.eps,
            normalize=static.normalize,
        )
    return dq, dk, dv, d_initial, d_log_decay
