"""Mamba-1's selective scan as Pallas kernels (TPU and GPU) with a ``custom_vjp``.

Per batch row, with a diagonal state ``h [D, N]``:

    h_t = exp(delta_t[:, None] * a) * h_{t-1} + (delta_t * u_t)[:, None] * b_t[None, :]
    y_t = h_t @ c_t

``u, delta [B, T, D]``, ``a [D, N]``, ``b, c [B, T, N]``. The kernels keep the float32 state of
a block of channels on chip (VMEM on TPU, registers on GPU) across the whole sequence, scanning
it token by token in chunks of ``C`` (``_chunk.py``); it goes to device memory only as the
final state and once per chunk as a checkpoint for the backward, which replays each chunk from
its checkpoint and runs it in reverse. Nothing of size ``T x D x N`` is ever written.

- ``tpu.py``: Mosaic TPU kernels (grid over batch, channel blocks, chunks).
- ``gpu.py``: Triton kernels (grid over batch, channel blocks; loop over chunks).
- ``_chunk.py``: the per-token math both share, forward and backward.
- ``_call.py``: one call's static parameters and the kernels' layouts.

The reference is the XLA scan of ``jaxbased.ops.selective_scan`` (its tests compare them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels._common import check_block, check_interpret, resolve_backend
from pallas_kernels.selective_scan import gpu, tpu
from pallas_kernels.selective_scan._call import Residuals

__all__ = ["DEFAULT_CHUNK_SIZE", "SelectiveScanConfig", "selective_scan", "unsupported_reason"]

#: Tokens unrolled per chunk (and between checkpoints). GPU: the backward keeps the chunk's
#: states in registers, and 8 is what fits 4 warps without spills on sm_90 (BENCHMARKS.md).
DEFAULT_CHUNK_SIZE: dict[str, int] = {"tpu": 16, "gpu": 8}

_BACKENDS = {"tpu": tpu, "gpu": gpu}


@dataclasses.dataclass(frozen=True)
class SelectiveScanConfig:
    """Static parameters of one call (hashable: a ``custom_vjp`` static argument).

    Attributes:
      backend: ``tpu`` or ``gpu``.
      chunk_size: tokens per chunk ``C`` (TPU: a multiple of 8).
      interpret: False, True, or a ``pltpu.InterpretParams`` (TPU).
      channel_block_size: channels per program (None: 128 on TPU, 32 on GPU; a power of two
        >= 16 on GPU, a multiple of 128 on TPU).
      num_warps: GPU only, Triton warps per program (None: 4).
    """

    backend: str
    chunk_size: int
    interpret: Any
    channel_block_size: int | None = None
    num_warps: int | None = None


def unsupported_reason(
    u_shape: tuple[int, ...],
    state_dim: int,
    *,
    backend: str,
    chunk_size: int | None,
    dtypes: tuple[Any, ...] = (),
) -> str | None:
    """Why the kernels cannot run these arguments (a sentence), or None when they can."""
    if len(u_shape) != 3:
        return f"u must be [B, T, D]; got shape {u_shape}"
    if state_dim < 1:
        return f"the state dim must be >= 1; got {state_dim}"
    if any(jnp.dtype(dtype) == jnp.float64 for dtype in dtypes):
        return "float64 inputs: the kernels compute in float32"
    chunk = DEFAULT_CHUNK_SIZE[backend] if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        return f"chunk_size={chunk!r} must be a positive integer"
    if backend == "tpu" and chunk % 8:
        return f"chunk_size={chunk} must be a multiple of 8 for the TPU kernel"
    return None


def _call(config: SelectiveScanConfig, u_shape, state_dim: int, has_initial_state: bool):
    _, seq, channels = u_shape
    return _BACKENDS[config.backend].make_call(config, seq, channels, state_dim, has_initial_state)


def _forward(config: SelectiveScanConfig, u, delta, a, b, c, initial_state):
    call = _call(config, u.shape, a.shape[1], initial_state is not None)
    initial_k = None if initial_state is None else call.state_to_kernel(initial_state)
    residuals = Residuals(
        call.tokens_to_kernel(u, call.padded_channels),
        call.tokens_to_kernel(delta, call.padded_channels),
        call.tokens_to_kernel(b, call.padded_state),
        call.tokens_to_kernel(c, call.padded_state),
        call.a_to_kernel(a),
        None,
    )
    y, final, checkpoints = _BACKENDS[config.backend].forward(
        call, residuals.u, residuals.delta, residuals.a_t, residuals.b, residuals.c, initial_k,
        u.dtype,
    )  # fmt: skip
    outputs = (
        call.tokens_from_kernel(y, call.channels, u.dtype),
        call.state_from_kernel(final),
    )
    # a and the initial state are kept for their dtype and presence (a is [D, N]: small).
    return outputs, (residuals._replace(checkpoints=checkpoints), a, initial_state)


def _apply(config, u, delta, a, b, c, initial_state):
    outputs, _ = _forward(config, u, delta, a, b, c, initial_state)
    return outputs


def _apply_backward(config, saved, cotangents):
    residuals, a, initial_state = saved
    dy, d_final = cotangents
    channels, state_dim = a.shape
    call = _call(config, dy.shape, state_dim, initial_state is not None)
    du, d_delta, db, dc, da_t, d_initial = _BACKENDS[config.backend].backward(
        call,
        residuals,
        call.tokens_to_kernel(dy.astype(jnp.float32), call.padded_channels),
        call.state_to_kernel(d_final),
        jnp.float32,
        jnp.float32,
    )
    da = jnp.swapaxes(jnp.sum(da_t, axis=0), 0, 1)[:channels, :state_dim]
    return (
        call.tokens_from_kernel(du, channels, residuals.u.dtype),
        call.tokens_from_kernel(d_delta, channels, residuals.delta.dtype),
        da.astype(a.dtype),
        call.tokens_from_kernel(jnp.sum(db, axis=0), state_dim, residuals.b.dtype),
        call.tokens_from_kernel(jnp.sum(dc, axis=0), state_dim, residuals.c.dtype),
        None if initial_state is None else call.state_from_kernel(d_initial),
    )


_apply_with_vjp = jax.custom_vjp(_apply, nondiff_argnums=(0,))
_apply_with_vjp.defvjp(_forward, _apply_backward)


def selective_scan(
    u: Float[Array, "B T D"],
    delta: Float[Array, "B T D"],
    a: Float[Array, "D N"],
    b: Float[Array, "B T N"],
    c: Float[Array, "B T N"],
    initial_state: Float[Array, "B D N"] | None = None,
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
    interpret: Any = False,
    channel_block_size: int | None = None,
    num_warps: int | None = None,
) -> tuple[Float[Array, "B T D"], Float[Array, "B D N"]]:
    """Mamba-1's scan by a Pallas kernel (differentiable in every input).

    Args:
      u: ``[B, T, D]`` inputs (any ``T``: the tail chunk is padded exactly).
      delta: ``[B, T, D]`` step sizes (>= 0, after softplus).
      a: ``[D, N]`` rates (<= 0).
      b: ``[B, T, N]`` input projection.
      c: ``[B, T, N]`` output projection.
      initial_state: None or ``[B, D, N]`` to continue from.
      chunk_size: tokens per chunk (None: 16 on TPU, 8 on GPU); on TPU a multiple of 8.
      backend: ``tpu``, ``gpu`` or None (the default platform's; CPU: ``tpu``).
      interpret: run in Pallas' interpreter (required on CPU); for ``tpu`` a
        ``pltpu.InterpretParams`` selects the TPU interpreter.
      channel_block_size: tuning (see :class:`SelectiveScanConfig`).
      num_warps: GPU tuning (see :class:`SelectiveScanConfig`).

    Returns:
      ``y [B, T, D]`` in ``u.dtype`` and the final state ``[B, D, N]`` float32. All arithmetic
      is float32 (the scan has no matmul).
    """
    backend = resolve_backend(backend, interpret)
    interpret = check_interpret(interpret, backend)
    if len(u.shape) != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must be [B, T, D]; got u={u.shape}, delta={delta.shape}")
    if a.ndim != 2 or a.shape[0] != u.shape[2]:
        raise ValueError(f"a must be [D, N] with D = {u.shape[2]}; got shape {a.shape}")
    expected = (*u.shape[:2], a.shape[1])
    if b.shape != expected or c.shape != expected:
        raise ValueError(f"b and c must be [B, T, N] = {expected}; got {b.shape}, {c.shape}")
    reason = unsupported_reason(
        u.shape,
        a.shape[1],
        backend=backend,
        chunk_size=chunk_size,
        dtypes=(u.dtype, delta.dtype, a.dtype, b.dtype, c.dtype),
    )
    if reason is not None:
        raise ValueError(reason)
    if channel_block_size is not None:
        check_block("channel_block_size", channel_block_size, backend)
        if backend == "tpu" and channel_block_size % 128:
            raise ValueError(
                f"channel_block_size={channel_block_size} must be a multiple of 128 on TPU"
            )
    if initial_state is not None:
        expected_state = (u.shape[0], u.shape[2], a.shape[1])
        if tuple(initial_state.shape) != expected_state:
            raise ValueError(
                f"initial_state has shape {initial_state.shape}; expected [B, D, N] = "
                f"{expected_state}"
            )
        initial_state = initial_state.astype(jnp.float32)
    config = SelectiveScanConfig(
        backend=backend,
        chunk_size=DEFAULT_CHUNK_SIZE[backend] if chunk_size is None else chunk_size,
        interpret=interpret,
        channel_block_size=channel_block_size,
        num_warps=num_warps,
    )
    return _apply_with_vjp(config, u, delta, a, b, c, initial_state)
