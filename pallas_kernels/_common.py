"""Helpers shared by the kernels: backend choice, interpret mode, block-size checks, matmuls.

Nothing here imports Flax or ``jaxbased`` (docs/architecture.md: kernels are the bottom layer).

Backends:

- ``"tpu"``: Pallas' Mosaic TPU lowering. The grid iterates over blocks; on-chip state lives in
  VMEM scratch buffers that persist across the sequential ("arbitrary") grid axis.
- ``"gpu"``: Pallas' Triton lowering (``jax.experimental.pallas.triton``). JAX 0.10 also has
  Mosaic GPU, but it targets Hopper/Blackwell warpgroup programming and does not lower on older
  GPUs nor from a CPU host without CUDA; the Triton lowering runs on every CUDA GPU JAX supports
  and lowers from a CPU host with ``jax.export`` (see the tests). Triton needs every block-level
  array to have power-of-two sides (matmul sides >= 16), so inputs are padded to those sizes.

Interpret mode: ``interpret=True`` runs either kernel through Pallas' HLO interpreter on any
platform (the only way to run a Pallas kernel on CPU); for the TPU kernels an
``jax.experimental.pallas.tpu.InterpretParams`` runs the TPU interpreter instead (which can detect
data races between grid points run on different cores).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS: tuple[str, ...] = ("tpu", "gpu")
GPU_PLATFORMS: frozenset[str] = frozenset({"gpu", "cuda", "rocm"})

#: Large negative score for masked keys: finite, so that ``max`` and ``exp`` never meet
#: ``inf - inf``.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= value``."""
    return -(-value // multiple) * multiple


def next_power_of_two(value: int, minimum: int = 1) -> int:
    """Smallest power of two that is ``>= max(value, minimum)``."""
    value = max(value, minimum)
    return 1 << (value - 1).bit_length()


def is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def resolve_backend(backend: str | None, interpret: Any) -> str:
    """The kernel family to use: ``backend`` if given, else the default JAX platform's.

    With ``backend=None`` on a machine without TPU or GPU the kernels can only run in interpret
    mode (then the TPU kernels are chosen). An explicit ``backend`` is trusted, so that a CPU
    host can lower (``jax.export``) for a TPU or a GPU.
    """
    if backend is None:
        platform = jax.default_backend()
        if platform in GPU_PLATFORMS:
            backend = "gpu"
        elif platform == "tpu" or interpret:
            backend = "tpu"
        else:
            raise ValueError(
                f"no TPU or GPU on platform {platform!r}: pass interpret=True to run the Pallas "
                "kernels in the interpreter, or backend='tpu'/'gpu' to lower for one"
            )
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; allowed: {', '.join(BACKENDS)}")
    return backend


def check_interpret(interpret: Any, backend: str) -> Any:
    """Validate ``interpret``: a bool, or (TPU kernels only) a ``pltpu.InterpretParams``."""
    if isinstance(interpret, bool):
        return interpret
    from jax.experimental.pallas import tpu as pltpu

    if isinstance(interpret, pltpu.InterpretParams):
        if backend != "tpu":
            raise ValueError("interpret=pltpu.InterpretParams(...) is only for backend='tpu'")
        return interpret
    raise ValueError(
        f"interpret={interpret!r} must be a bool or a jax.experimental.pallas.tpu.InterpretParams"
    )


def check_call(
    unsupported_reason: Callable[..., str | None],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    backend: str | None,
    interpret: Any,
    **options: Any,
) -> tuple[str, Any]:
    """Validate a kernel call and return ``(backend, interpret)`` resolved and checked.

    Raises ``ValueError`` if ``q`` and ``k`` differ in shape, or with the sentence that the op's
    ``unsupported_reason(q.shape, v.shape, backend=..., dtypes=..., **options)`` returns.
    """
    backend = resolve_backend(backend, interpret)
    interpret = check_interpret(interpret, backend)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape; got q={q.shape}, k={k.shape}")
    reason = unsupported_reason(
        q.shape, v.shape, backend=backend, dtypes=(q.dtype, k.dtype, v.dtype), **options
    )
    if reason is not None:
        raise ValueError(reason)
    return backend, interpret


def check_block(name: str, size: int, backend: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``size`` is a legal block side for ``backend``.

    TPU: a multiple of 8 (the sublane count of a vector register). GPU (Triton): a power of two
    and at least 16 (the smallest side of a Triton matmul).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name}={size!r} must be a positive integer")
    if backend == "tpu" and size % 8:
        raise ValueError(f"{name}={size} must be a multiple of 8 for the TPU kernel")
    if backend == "gpu" and (size < 16 or not is_power_of_two(size)):
        raise ValueError(f"{name}={size} must be a power of two >= 16 for the GPU (Triton) kernel")


def compute_dtype(*arrays: jax.Array, backend: str = "tpu") -> jnp.dtype:
    """Operand dtype of the kernel matmuls: bfloat16 if every input is bfloat16, float16 if
    every input is float16 on ``gpu`` (Triton multiplies float16 natively; the TPU kernels
    compute float16 inputs in float32), else float32."""
    if all(a.dtype == jnp.bfloat16 for a in arrays):
        return jnp.dtype(jnp.bfloat16)
    if backend == "gpu" and all(a.dtype == jnp.float16 for a in arrays):
        return jnp.dtype(jnp.float16)
    for a in arrays:
        if a.dtype == jnp.float64:
            raise ValueError(
                "the Pallas kernels compute in float32 (bfloat16 operands); got a float64 input "
                "— use the XLA implementation for float64"
            )
    return jnp.dtype(jnp.float32)


def matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    operand_dtype: jnp.dtype,
    *,
    transpose_lhs: bool = False,
    transpose_rhs: bool = False,
) -> jax.Array:
    """``op(lhs) @ op(rhs)`` with float32 accumulation, inside a kernel.

    Operands are cast to ``operand_dtype``: bfloat16 operands run at the matmul unit's native
    rate; float32 operands use ``Precision.HIGHEST`` (full float32 on the TPU MXU, IEEE instead
    of TF32 in Triton), so that the float32 kernels match the XLA reference to ~1e-6.
    """
    lhs_contract = 0 if transpose_lhs else 1
    rhs_contract = 1 if transpose_rhs else 0
    precision = lax.Precision.HIGHEST if operand_dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(
        lhs.astype(operand_dtype),
        rhs.astype(operand_dtype),
        (((lhs_contract,), (rhs_contract,)), ((), ())),
        precision=(precision, precision),
        preferred_element_type=jnp.float32,
    )


def column_to_row(column: jax.Array) -> jax.Array:
    """``[N, 1] -> [1, N]`` without a transpose op: keep the diagonal of the broadcast, sum rows.

    Mosaic handles lane <-> sublane moves of thin arrays poorly; a masked sublane reduction of an
    ``N x N`` tile is cheap and always lowers.
    """
    size = column.shape[0]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return jnp.sum(jnp.where(rows == cols, column, 0.0), axis=0, keepdims=True)


def row_to_column(row: jax.Array) -> jax.Array:
    """``[1, N] -> [N, 1]``, the inverse of :func:`column_to_row`."""
    size = row.shape[1]
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return jnp.sum(jnp.where(rows == cols, row, 0.0), axis=1, keepdims=True)


def tpu_lane_width(size: int) -> int:
    """Lane width a TPU kernel pads a minor dim to: 64 up to 64 (half a vreg row, which Mosaic
    handles natively), else a multiple of 128."""
    return round_up(size, 64) if size <= 64 else round_up(size, 128)


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad ``x`` along ``axis`` to ``size`` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)
