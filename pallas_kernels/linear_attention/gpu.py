"""GPU kernels (Pallas' Triton lowering) of chunked causal linear attention.

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
added by value block 0 only), and with decay a partial of the decay's key term per token.
``sum_d dy_d y_d`` is computed by XLA before the kernels.
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


@dataclasses.dataclass(frozen=True)
class _Static(ChunkedCall):
    """:class:`ChunkedCall` plus the GPU's value blocking and warps."""

    value_block: int
    num_warps: int

    @property
    def value_blocks(self) -> int:
        return self.padded_value_dim // self.value_block


def _static(
    config: Any,
    seq_len: int,
    value_dim: int,
    has_initial_state: bool,
    has_decay: bool,
    heads_per_group: int,
) -> _Static:
    padded_value_dim = next_power_of_two(value_dim, 16)
    return _Static.create(
        config,
        seq_len,
        value_dim,
        padded_value_dim,
        has_initial_state=has_initial_state,
        has_decay=has_decay,
        heads_per_group=heads_per_group,
        value_block=min(config.value_block_size or 32, padded_value_dim),
        num_warps=config.num_warps or (4 if config.chunk_size <= 32 else 8),
    )


def _to_kernel(x: jax.Array, static: _Static, width: int) -> jax.Array:
    """``[B, T, H, X] -> [B, T_pad, H, width]`` zero padded, in the operand dtype."""
    return pad_axis(pad_axis(x.astype(static.operand_dtype), 1, static.padded_seq), 3, width)


# Block specs -------------------------------------------------------------------------------------
def _row_specs(static: _Static, width: int, blocked: bool) -> pl.BlockSpec:
    """Whole (padded) sequence of one (batch, head): ``blocked``, one value block of a head's
    values; else the ``width`` lanes of the queries or keys of the head's group."""
    if blocked:
        return pl.BlockSpec(
            (None, static.padded_seq, None, static.value_block), lambda b, h, j: (b, 0, h, j)
        )
    shape = (None, static.padded_seq, None, width)
    return pl.BlockSpec(shape, lambda b, h, j: (b, 0, static.group_of(h), 0))


def _per_token_spec(static: _Static) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, static.padded_seq), lambda b, h, j: (b, h, 0))


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


def _compiler_params(static: _Static):
    return plgpu.CompilerParams(num_warps=static.num_warps, num_stages=2)


# Inside the kernels ------------------------------------------------------------------------------
def _load_features(static: _Static, refs) -> ChunkFeatures:
    factors = []
    if refs:
        for segment in static.layout.segments:
            columns = pl.ds(segment.row_offset, segment.rows)
            factors.append(Factors(*(ref[:, columns] for ref in refs)))
    return static.features(factors)


def _load_states(static: _Static, kv_ref, k_ref, k_scale=None) -> list[SegmentState]:
    states = []
    for segment in static.layout.segments:
        rows = pl.ds(segment.row_offset, segment.rows)
        k = k_ref[:, rows]
        states.append(SegmentState(kv_ref[rows, :], k if k_scale is None else k * k_scale))
    return states


def _initial_states(static: _Static, initial_refs) -> list[SegmentState]:
    """The initial state's segments, or zeros."""
    if static.has_initial_state:
        return _load_states(static, *initial_refs)
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


def _chunk_tokens(static: _Static, chunk):
    """``(start, pl.ds)`` of chunk ``chunk``'s tokens."""
    start = pl.multiple_of(chunk * static.chunk_size, static.chunk_size)
    return start, pl.ds(start, static.chunk_size)


def _load_decay(static: _Static, decay_ref, tokens):
    if not static.has_decay:
        return None
    return chunk_decay(decay_ref[tokens].reshape(1, static.chunk_size))


# Forward -----------------------------------------------------------------------------------------
def _forward_kernel(*refs, static: _Static):
    q_ref, k_ref, v_ref, *refs = refs
    decay_ref, factor_refs, initial_refs, refs = split_kernel_refs(static, refs)
    y_ref, denominator_ref, final_kv_ref, final_k_ref = refs
    features = _load_features(static, factor_refs)
    first_value_block = pl.program_id(2) == 0

    def body(chunk, states):
        start, tokens = _chunk_tokens(static, chunk)
        y, denominator, states = chunk_forward(
            q_ref[tokens, :],
            k_ref[tokens, :],
            v_ref[tokens, :],
            states,
            features,
            eps=static.eps,
            key_valid=static.key_valid(start),
            decay=_load_decay(static, decay_ref, tokens),
            normalize=static.normalize,
        )
        y_ref[tokens, :] = y.astype(y_ref.dtype)

        @pl.when(first_value_block)
        def _store_denominator():
            denominator_ref[tokens] = denominator.reshape(static.chunk_size)

        return states

    states = lax.fori_loop(0, static.num_chunks, body, _initial_states(static, initial_refs))
    _store_states(static, states, final_kv_ref, final_k_ref, first_value_block)


def forward(
    config: Any,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    initial_state: tuple[jax.Array, jax.Array] | None,
    log_decay: jax.Array | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array], Residuals]:
    """Forward kernel for ``config`` (a ``LinearAttentionConfig``). ``q, k [B, T, G, F]``
    (``G`` divides ``H``), ``v [B, T, H, Dv]``; ``initial_state`` is None or
    ``(kv [B, H, D', Dv], k [B, H, D'])``;
    ``log_decay`` None or ``[B, T, H]`` float32.

    Returns ``y [B, T, H, Dv]``, the final state ``(kv, k)`` float32 and the residuals.
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
    padded_feature_dim = static.layout.padded_feature_dim
    q_kernel = _to_kernel(q, static, padded_feature_dim)
    k_kernel = _to_kernel(k, static, padded_feature_dim)
    v_kernel = _to_kernel(v, static, static.padded_value_dim)
    decay_kernel = kernel_state = None
    if log_decay is not None:
        cumulative = chunk_cumulative_log_decay(log_decay, static.chunk_size, static.num_chunks)
        decay_kernel = cumulative.reshape(batch, heads, static.padded_seq)
    if initial_state is not None:
        kernel_state = static.state_to_kernel(*initial_state)
    inputs, in_specs = kernel_inputs(
        static,
        [
            (q_kernel, _row_specs(static, padded_feature_dim, blocked=False)),
            (k_kernel, _row_specs(static, padded_feature_dim, blocked=False)),
            (v_kernel, _row_specs(static, static.padded_value_dim, blocked=True)),
        ],
        None if decay_kernel is None else (decay_kernel, _per_token_spec(static)),
        kernel_state,
        _state_specs(static),
    )
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
    final_state = static.state_from_kernel(final_kv, final_k)
    residuals = Residuals(
        q_kernel,
        k_kernel,
        v_kernel,
        kernel_state,
        y,
        denominator,
        decay_kernel,
        final_state if log_decay is not None else None,
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
    decay_ref, factor_refs, initial_refs, (dq_ref,) = split_kernel_refs(static, refs)
    features = _load_features(static, factor_refs)
    normalizer_scale = (pl.program_id(2) == 0).astype(jnp.float32)

    def body(chunk, states):
        start, tokens = _chunk_tokens(static, chunk)
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
            features,
            key_valid=static.key_valid(start),
            decay=_load_decay(static, decay_ref, tokens),
        )
        dq_ref[tokens, :] = dq
        return states

    lax.fori_loop(0, static.num_chunks, body, _initial_states(static, initial_refs))


def _backward_key_value_kernel(*refs, static: _Static):
    q_ref, k_ref, v_ref, dy_ref, y_dot_dy_ref, denominator_ref, *refs = refs
    decay_ref, factor_refs, _, refs = split_kernel_refs(static, refs, reads_initial_state=False)
    features = _load_features(static, factor_refs)
    final_d_kv_ref, final_d_k_ref, dk_ref, dv_ref, *refs = refs
    key_term_ref = refs.pop(0) if static.has_decay else None
    initial_d_kv_ref, initial_d_k_ref = refs
    normalizer_scale = (pl.program_id(2) == 0).astype(jnp.float32)
    d_states = _load_states(static, final_d_kv_ref, final_d_k_ref, k_scale=normalizer_scale)

    def body(step, d_states):
        _, tokens = _chunk_tokens(static, static.num_chunks - 1 - step)
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
            features,
            decay=_load_decay(static, decay_ref, tokens),
        )
        dk_ref[tokens, :] = dk
        dv_ref[tokens, :] = dv.astype(dv_ref.dtype)
        if static.has_decay:
            key_term_ref[tokens] = key_term.reshape(static.chunk_size)
        return d_states

    d_states = lax.fori_loop(0, static.num_chunks, body, d_states)
    _store_states(static, d_states, initial_d_kv_ref, initial_d_k_ref, None)


def backward(
    config: Any,
    residuals: Residuals,
    dy: jax.Array,
    d_final_state: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array], jax.Array | None]:
    """Backward kernels for ``config``; ``residuals`` from :func:`forward`.

    Returns ``dq, dk, dv`` (operand dtype, ``[B, T, H, X]``), the initial state's cotangent
    ``(d_kv [B, H, D', Dv], d_k [B, H, D'])`` float32 and ``d log_decay [B, T, H]`` float32
    (None without decay).
    """
    batch, _, heads, _ = dy.shape
    padded_feature_dim = residuals.q.shape[-1]
    static = _static(
        config,
        dy.shape[1],
        dy.shape[-1],
        residuals.initial_state is not None,
        residuals.cumulative_decay is not None,
        heads // residuals.q.shape[2],
    )
    dy_kernel = _to_kernel(dy, static, static.padded_value_dim)
    y_dot_dy = jnp.sum(dy.astype(jnp.float32) * residuals.y.astype(jnp.float32), axis=-1)
    y_dot_dy = pad_axis(jnp.swapaxes(y_dot_dy, 1, 2), 2, static.padded_seq)  # [B, H, T_pad]
    grid = (batch, heads, static.value_blocks)
    partial_shape = (static.value_blocks, batch, static.padded_seq, heads, padded_feature_dim)

    def inputs_and_specs(state):
        features = _row_specs(static, padded_feature_dim, blocked=False)
        value_block = _row_specs(static, static.padded_value_dim, blocked=True)
        operands = [
            (residuals.q, features),
            (residuals.k, features),
            (residuals.v, value_block),
            (dy_kernel, value_block),
            (y_dot_dy, _per_token_spec(static)),
            (residuals.denominator, _per_token_spec(static)),
        ]
        decay = None
        if static.has_decay:
            decay = (residuals.cumulative_decay, _per_token_spec(static))
        return kernel_inputs(static, operands, decay, state, _state_specs(static))

    query_inputs, query_specs = inputs_and_specs(residuals.initial_state)
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

    # The dk/dv kernel reads the final state's cotangent where dq reads the initial state.
    key_value_inputs, key_value_specs = inputs_and_specs(static.state_to_kernel(*d_final_state))
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
        in_specs=key_value_specs,
        out_specs=[
            _partial_spec(static, padded_feature_dim),
            _row_specs(static, static.padded_value_dim, blocked=True),
            *(spec for spec, _ in key_term_outputs),
            _state_specs(static)[0],
            pl.BlockSpec((None, None, None, 1, static.rows), lambda b, h, j: (j, b, h, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(residuals.v.shape, static.operand_dtype),
            *(shape for _, shape in key_term_outputs),
            jax.ShapeDtypeStruct((batch, heads, static.rows, static.padded_value_dim), jnp.float32),
            jax.ShapeDtypeStruct((static.value_blocks, batch, heads, 1, static.rows), jnp.float32),
        ],
        compiler_params=_compiler_params(static),
        interpret=static.interpret,
        name="based_linear_attention_backward_key_value",
    )(*key_value_inputs)

    feature_dim = static.layout.feature_dim

    def unpad(x: jax.Array, width: int) -> jax.Array:
        return x[:, : static.seq_len, :, :width].astype(static.operand_dtype)

    # Partial dq, dk per value block and head, summed over both (heads of a group share q, k).
    dq = unpad(static.sum_over_groups(dq_partial.sum(0), 2), feature_dim)
    dk = unpad(static.sum_over_groups(dk_partial.sum(0), 2), feature_dim)
    dv = unpad(dv_kernel, static.value_dim)
    d_initial = static.state_from_kernel(d_initial_kv, d_initial_k.sum(0))
    d_log_decay = None
    if static.has_decay:
        d_log_decay = log_decay_cotangent(
            static,
            y_dot_dy,
            residuals.denominator,
            key_term[0].sum(0),
            residuals.final_state,
            d_final_state,
        )
    return dq, dk, dv, d_initial, d_log_decay
