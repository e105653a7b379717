"""Flash-style causal windowed softmax attention: Pallas kernels + custom_vjp.

    o_i = sum_{i - window < j <= i} softmax_j(scale * q_i . k_j) v_j      (window=None: j <= i)

Online softmax in float32 over key blocks; key blocks entirely outside a query block's window
are neither loaded nor computed (see ``_blocks.py``), so the cost is ``O(T * window)`` for a
window and ``O(T**2 / 2)`` for full causal attention. Rotary embeddings are applied by the
caller before the kernel.

- ``tpu.py``: Mosaic TPU kernels; ``gpu.py``: Triton kernels; ``_blocks.py``: shared math.

:func:`window_attention` has a ``jax.custom_vjp``: the backward pass runs a ``dq`` kernel and a
``dk, dv`` kernel that recompute the probabilities from the stored log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels._common import (
    check_block,
    check_call,
    compute_dtype,
    next_power_of_two,
    round_up,
)
from pallas_kernels.window_attention import gpu, tpu
from pallas_kernels.window_attention._blocks import BlockPlan, make_plan

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "WindowAttentionConfig",
    "unsupported_reason",
    "window_attention",
]

#: Default query/key block: 128 rows on TPU (one MXU pass), 64 on GPU.
DEFAULT_BLOCK_SIZE: dict[str, int] = {"tpu": 128, "gpu": 64}

_BACKENDS = {"tpu": tpu, "gpu": gpu}


@dataclasses.dataclass(frozen=True)
class WindowAttentionConfig:
    """Static parameters of one kernel call (hashable: a ``custom_vjp`` static argument).

    Attributes:
      backend: ``tpu`` or ``gpu``; seq_len: ``T``; window: keys per query (None: all);
      block_size: query/key block; scale: score scale; head_dim: ``D`` of ``q, k``;
      operand_dtype: matmul operand dtype; interpret: interpreter switch;
      num_warps: GPU only (None: 4 for head dims <= 64, else 8).
    """

    backend: str
    seq_len: int
    window: int | None
    block_size: int
    scale: float
    head_dim: int
    operand_dtype: Any
    interpret: Any
    num_warps: int | None = None

    @functools.cached_property
    def plan(self) -> BlockPlan:
        return make_plan(self.seq_len, self.block_size, self.window)


def default_block_size(seq_len: int, backend: str) -> int:
    """The backend's default block, shrunk for short sequences."""
    if backend == "tpu":
        return min(DEFAULT_BLOCK_SIZE["tpu"], round_up(seq_len, 8))
    return min(DEFAULT_BLOCK_SIZE["gpu"], next_power_of_two(seq_len, 16))


def unsupported_reason(
    q_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    *,
    window: int | None,
    block_size: int | None,
    backend: str,
    dtypes: tuple[Any, ...] = (),
) -> str | None:
    """Why the kernel cannot run these arguments (a sentence), or None when it can."""
    if len(q_shape) != 4 or len(v_shape) != 4 or tuple(q_shape[:3]) != tuple(v_shape[:3]):
        return f"q, k must be [B, T, H, D] and v [B, T, H, Dv]; got q={q_shape}, v={v_shape}"
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        return f"window={window!r} must be a positive integer or None"
    if window is not None and window < 1:
        return f"window={window!r} must be a positive integer or None"
    if any(jnp.dtype(dtype) == jnp.float64 for dtype in dtypes):
        return "float64 inputs: the kernels compute in float32"
    if block_size is not None:
        try:
            check_block("block_size", block_size, backend)
        except ValueError as error:
            return str(error)
    return None


def _apply(config: WindowAttentionConfig, q, k, v):
    return _BACKENDS[config.backend].forward(config, q, k, v)[0]


def _apply_forward(config: WindowAttentionConfig, q, k, v):
    return _BACKENDS[config.backend].forward(config, q, k, v)


def _apply_backward(config: WindowAttentionConfig, residuals, do):
    return _BACKENDS[config.backend].backward(config, residuals, do)


_apply_with_vjp = jax.custom_vjp(_apply, nondiff_argnums=(0,))
_apply_with_vjp.defvjp(_apply_forward, _apply_backward)


def window_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    *,
    window: int | None,
    scale: float | None = None,
    block_size: int | None = None,
    backend: str | None = None,
    interpret: Any = False,
    num_warps: int | None = None,
) -> Float[Array, "B T H Dv"]:
    """Causal softmax attention of each query over its last ``window`` keys, by Pallas kernels.

    Args:
      q: ``[B, T, H, D]`` (rotary already applied); any ``T``.
      k: ``[B, T, H, D]`` (rotary already applied).
      v: ``[B, T, H, Dv]``.
      window: keys seen per query, itself included; None for full causal attention.
      scale: score scale (default ``D ** -0.5``).
      block_size: query/key block; TPU: a multiple of 8, GPU: a power of two >= 16 (None:
        128 on TPU, 64 on GPU, smaller for short sequences).
      backend: ``tpu``, ``gpu`` or None (the default JAX platform's; CPU: ``tpu``).
      interpret: run in Pallas' interpreter (required on CPU); ``pltpu.InterpretParams`` for
        the TPU interpreter.
      num_warps: GPU tuning.

    Returns ``[B, T, H, Dv]`` in ``v.dtype``. Scores, softmax and accumulation are float32;
    matmul operands are bfloat16 when all inputs are (float16 on GPU likewise), else float32.
    """
    backend, interpret = check_call(
        unsupported_reason, q, k, v, backend, interpret, window=window, block_size=block_size
    )
    seq_len, head_dim = q.shape[1], q.shape[-1]
    operand_dtype = compute_dtype(q, k, v, backend=backend)
    config = WindowAttentionConfig(
        backend=backend,
        seq_len=seq_len,
        window=window,
        block_size=default_block_size(seq_len, backend) if block_size is None else block_size,
        scale=float(head_dim**-0.5 if scale is None else scale),
        head_dim=head_dim,
        operand_dtype=operand_dtype,
        interpret=interpret,
        num_warps=num_warps,
    )
    out = _apply_with_vjp(
        config, q.astype(operand_dtype), k.astype(operand_dtype), v.astype(operand_dtype)
    )
    return out.astype(v.dtype)
