"""Chunked causal linear attention with the feature map fused: Pallas kernels + custom_vjp.

    y_i = (sum_{j<=i} K(q_i, k_j) v_j + phi(q_i) S0) / (sum_{j<=i} K(q_i, k_j) + phi(q_i) z0 + eps)
    K(q, k) = phi(q) . phi(k)

for every feature map of ``jaxbased.ops.feature_maps``: the Taylor maps, where
``K = 1 + s + s**2 / 2`` with ``s = q . k / sqrt(F)``, and the elementwise maps ``elu``
(``elu(x) + 1``), ``relu`` and ``identity`` (``D' = F``; SSD and decay attention use
``identity``).

Optionally with a decay ``a_t = exp(log_decay_t) <= 1`` per step and head (SSD, decay
attention): ``S_t = a_t S_{t-1} + phi(k_t) v_t^T``, ``z_t = a_t z_{t-1} + phi(k_t)``,
``y_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)`` (or ``y_t = phi(q_t) S_t`` with
``normalize=False``). Inside a chunk the kernel weighs ``K_ij`` by ``exp(g_i - g_j)`` with the
chunk-local cumulative log decays ``g``; the state is decayed by ``exp(g_last)`` per chunk.

Inside a chunk of ``C`` tokens the kernel computes ``K`` (Taylor: from raw ``F``-dim dots;
elementwise: ``phi(q) phi(k)^T``); across chunks it carries the float32 state
``S = sum phi(k) ⊗ v`` ``[D', Dv]`` and ``z = sum phi(k)`` ``[D']`` on chip. The features
``phi(q), phi(k)`` are built per chunk in VMEM/registers and never written to device memory.
Both Taylor maps run the symmetric expansion (``D' = 153`` for F = 16; the full ``taylor``
map's 273 features repeat every off-diagonal pair): the outputs are the same, and ``taylor``
states are converted exactly at the call boundary (``_symmetric.py``).

- ``tpu.py``: Mosaic TPU kernels (grid over batch, heads, chunks; state in VMEM scratch).
- ``gpu.py``: Triton kernels (grid over batch, heads, value blocks; loop over chunks).
- ``_layout.py``: each feature map's feature order and padded state rows.
- ``_features.py``: the feature maps on chip (expansion, pull-back, intra-chunk kernel).
- ``_call.py``: one kernel call's static parameters, input order, residuals and decay parts.
- ``_chunk.py``: the per-chunk scan math both share (state read and update, backward steps).
- ``_symmetric.py``: ``taylor`` <-> ``taylor_symmetric`` state layouts.

Feature-map names and sizes come from :mod:`pallas_kernels.feature_map_layout`, shared with
``jaxbased.ops.feature_maps``.

:func:`linear_attention` has a ``jax.custom_vjp`` whose backward runs two more kernels per
backend (``dq`` forward over the chunks; ``dk, dv`` and the initial state's cotangent backward
over them). ``interpret=True`` runs the kernels in Pallas' interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels._common import check_block, check_call, compute_dtype
from pallas_kernels.feature_map_layout import (
    ELEMENTWISE_FEATURE_MAPS,
    TAYLOR_FEATURE_MAPS,
    expanded_dim,
)
from pallas_kernels.linear_attention import gpu, tpu
from pallas_kernels.linear_attention._layout import FeatureLayout, make_layout
from pallas_kernels.linear_attention._symmetric import (
    antisymmetric_part,
    full_from_symmetric,
    symmetric_from_full,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ELEMENTWISE_FEATURE_MAPS",
    "KERNEL_FEATURE_MAPS",
    "TAYLOR_FEATURE_MAPS",
    "LinearAttentionConfig",
    "expanded_dim",
    "linear_attention",
    "unsupported_reason",
]

#: Default tokens per chunk: 64 on TPU (ThunderKittens' chunk), 16 on GPU (fla's fused_chunk).
DEFAULT_CHUNK_SIZE: dict[str, int] = {"tpu": 64, "gpu": 16}
#: Largest chunk of the GPU kernels: their [C, C] and [C, F] tiles live in registers and shared
#: memory (at C = 64 the compile report already shows spills; BENCHMARKS.md).
MAX_GPU_CHUNK_SIZE = 64
#: Every feature map the kernels run: the Taylor maps (fused expansion) and the elementwise ones.
KERNEL_FEATURE_MAPS: tuple[str, ...] = (*TAYLOR_FEATURE_MAPS, *ELEMENTWISE_FEATURE_MAPS)


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
    """Static parameters of one kernel call (hashable: used as a ``custom_vjp`` static arg).

    Attributes:
      backend: ``tpu`` or ``gpu``.
      feature_map: one of :data:`KERNEL_FEATURE_MAPS` (both Taylor maps run the symmetric
        expansion).
      feature_dim: ``F``.
      chunk_size: tokens per chunk ``C``.
      eps: added to the denominator.
      normalize: divide by the normalizer (False: ``y = phi(q) S``, as SSD).
      operand_dtype: matmul operand dtype (bfloat16, float16 on GPU, or float32).
      interpret: False, True, or a ``pltpu.InterpretParams`` (TPU kernels).
      value_block_size: GPU only, value columns per program (None: 32).
      num_warps: GPU only, Triton warps per program (None: 4 for C <= 32, else 8).
    """

    backend: str
    feature_map: str
    feature_dim: int
    chunk_size: int
    eps: float
    operand_dtype: Any
    interpret: Any
    normalize: bool = True
    value_block_size: int | None = None
    num_warps: int | None = None

    @functools.cached_property
    def layout(self) -> FeatureLayout:
        return make_layout(self.feature_map, self.feature_dim, self.backend)


_BACKENDS = {"tpu": tpu, "gpu": gpu}


def unsupported_reason(
    q_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    *,
    feature_map: str,
    chunk_size: int | None,
    backend: str,
    dtypes: tuple[Any, ...] = (),
) -> str | None:
    """Why the kernel cannot run these arguments (a sentence), or None when it can.

    Dispatchers use this to fall back to XLA; :func:`linear_attention` raises it as a
    ``ValueError``.
    """
    if (
        len(q_shape) != 4
        or len(v_shape) != 4
        or tuple(v_shape[:2]) != tuple(q_shape[:2])
        or v_shape[2] % q_shape[2]
    ):
        return (
            f"q, k must be [B, T, G, F] and v [B, T, H, Dv] with G dividing H; got q={q_shape}, "
            f"v={v_shape}"
        )
    if feature_map not in KERNEL_FEATURE_MAPS:
        return (
            f"feature_map={feature_map!r} has no kernel; allowed: {', '.join(KERNEL_FEATURE_MAPS)}"
        )
    if any(jnp.dtype(dtype) == jnp.float64 for dtype in dtypes):
        return "float64 inputs: the kernels compute in float32"
    chunk = DEFAULT_CHUNK_SIZE[backend] if chunk_size is None else chunk_size
    try:
        check_block("chunk_size", chunk, backend)
    except ValueError as error:
        return str(error)
    if backend == "gpu" and chunk > MAX_GPU_CHUNK_SIZE:
        return (
            f"chunk_size={chunk} is over the GPU kernel's {MAX_GPU_CHUNK_SIZE} (its [C, C] tiles "
            "are held in registers and shared memory)"
        )
    return None


def _apply(config: LinearAttentionConfig, q, k, v, initial_state, log_decay):
    y, final_state, _ = _BACKENDS[config.backend].forward(config, q, k, v, initial_state, log_decay)
    return y, final_state


def _apply_forward(config: LinearAttentionConfig, q, k, v, initial_state, log_decay):
    y, final_state, residuals = _BACKENDS[config.backend].forward(
        config, q, k, v, initial_state, log_decay
    )
    return (y, final_state), residuals


def _apply_backward(config: LinearAttentionConfig, residuals, cotangents):
    dy, d_final_state = cotangents
    dq, dk, dv, d_initial, d_log_decay = _BACKENDS[config.backend].backward(
        config, residuals, dy, d_final_state
    )
    has_initial_state = residuals.initial_state is not None
    return dq, dk, dv, (d_initial if has_initial_state else None), d_log_decay


_apply_with_vjp = jax.custom_vjp(_apply, nondiff_argnums=(0,))
_apply_with_vjp.defvjp(_apply_forward, _apply_backward)


def linear_attention(
    q: Float[Array, "B T G F"],
    k: Float[Array, "B T G F"],
    v: Float[Array, "B T H Dv"],
    initial_state: tuple[Float[Array, "B H D Dv"], Float[Array, "B H D"]] | None = None,
    *,
    log_decay: Float[Array, "B T H"] | None = None,
    normalize: bool = True,
    feature_map: str = "taylor",
    chunk_size: int | None = None,
    eps: float = 1e-12,
    backend: str | None = None,
    interpret: Any = False,
    value_block_size: int | None = None,
    num_warps: int | None = None,
) -> tuple[Float[Array, "B T H Dv"], tuple[Float[Array, "B H D Dv"], Float[Array, "B H D"]]]:
    """Causal linear attention by a fused chunked Pallas kernel (differentiable).

    Args:
      q: ``[B, T, G, F]`` queries before the feature map (any ``T``; the tail chunk is
        masked), one per group of heads: ``G`` divides ``H`` and head ``h`` reads group
        ``h // (H / G)`` (``G = H``: one per head). The kernels read each group's queries and
        keys for its heads, never copies per head; ``dq, dk`` are summed over the group's heads.
      k: ``[B, T, G, F]`` keys, like ``q``.
      v: ``[B, T, H, Dv]`` values (any ``Dv``; padded internally to 128 lanes on TPU, to a power
        of two on GPU).
      initial_state: None or ``(kv_state [B, H, D', Dv], k_state [B, H, D'])`` to continue from,
        in the layout of ``jaxbased.ops.feature_maps`` (``D' = expanded_dim(feature_map, F)``).
      log_decay: None (no decay) or ``[B, T, H]``: ``log a_t <= 0`` per step and head (a fixed
        per-head decay is broadcast by the caller); computed in float32, differentiable.
      normalize: divide by ``phi(q) . z + eps`` (True, BASED) or not (``y = phi(q) S``).
      feature_map: ``taylor`` (``D' = 1 + F + F**2``) or ``taylor_symmetric``
        (``1 + F + F (F + 1) / 2``), same outputs and different state layouts; or ``elu``,
        ``relu``, ``identity`` (``D' = F``).
      chunk_size: tokens per chunk; TPU: a multiple of 8, GPU: a power of two from 16 to 64
        (None: 64 on TPU, 16 on GPU).
      eps: added to the denominator (1e-12 as in the XLA reference).
      backend: ``tpu``, ``gpu`` or None (the default JAX platform's; CPU: ``tpu``).
      interpret: run in Pallas' interpreter (required on CPU); for ``tpu`` a
        ``pltpu.InterpretParams`` selects the TPU interpreter.
      value_block_size: GPU tuning (see :class:`LinearAttentionConfig`).
      num_warps: GPU tuning (see :class:`LinearAttentionConfig`).

    Returns:
      ``y [B, T, H, Dv]`` in ``v.dtype`` and the final state ``(kv_state, k_state)`` float32.
      Matmul operands are bfloat16 when all of ``q, k, v`` are (float16 likewise on GPU), else
      float32; accumulation, state and normalizer are float32.
    """
    backend, interpret = check_call(
        unsupported_reason,
        q,
        k,
        v,
        backend,
        interpret,
        feature_map=feature_map,
        chunk_size=chunk_size,
    )
    if not eps >= 0:
        raise ValueError(f"eps={eps!r} must be >= 0")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize={normalize!r} must be a bool")
    if log_decay is not None:
        if tuple(log_decay.shape) != tuple(v.shape[:3]):
            raise ValueError(
                f"log_decay has shape {tuple(log_decay.shape)}; expected [B, T, H] = "
                f"{tuple(v.shape[:3])}"
            )
        if jnp.dtype(log_decay.dtype) == jnp.float64:
            raise ValueError("log_decay is float64: the kernels compute in float32")
        log_decay = jnp.asarray(log_decay, jnp.float32)
    if value_block_size is not None:
        check_block("value_block_size", value_block_size, "gpu")
    operand_dtype = compute_dtype(q, k, v, backend=backend)
    batch, _, heads, value_dim = v.shape
    feature_dim = q.shape[-1]
    if initial_state is not None:
        kv_state, k_state = initial_state
        expanded = expanded_dim(feature_map, feature_dim)
        expected = (batch, heads, expanded, value_dim)
        if tuple(kv_state.shape) != expected or tuple(k_state.shape) != expected[:3]:
            raise ValueError(
                f"initial_state has kv_state {kv_state.shape} and k_state {k_state.shape}; "
                f"expected {expected} and {expected[:3]}"
            )
        initial_state = (kv_state.astype(jnp.float32), k_state.astype(jnp.float32))
    config = LinearAttentionConfig(
        backend=backend,
        feature_map="taylor_symmetric" if feature_map in TAYLOR_FEATURE_MAPS else feature_map,
        feature_dim=feature_dim,
        chunk_size=DEFAULT_CHUNK_SIZE[backend] if chunk_size is None else chunk_size,
        eps=float(eps),
        operand_dtype=operand_dtype,
        interpret=interpret,
        normalize=normalize,
        value_block_size=value_block_size,
        num_warps=num_warps,
    )
    full_layout = feature_map == "taylor"
    kernel_initial_state = initial_state
    if full_layout and initial_state is not None:
        kernel_initial_state = tuple(
            symmetric_from_full(part, feature_dim, axis=2) for part in initial_state
        )
    y, final_state = _apply_with_vjp(
        config,
        q.astype(operand_dtype),
        k.astype(operand_dtype),
        v.astype(operand_dtype),
        kernel_initial_state,
        log_decay,
    )
    if full_layout:
        final_state = _full_final_state(final_state, initial_state, log_decay, feature_dim)
    return y.astype(v.dtype), final_state


def _full_final_state(final_state, initial_state, log_decay, feature_dim: int):
    """The kernel's symmetric final state in the full ``taylor`` layout, plus the initial
    state's antisymmetric part (unread by any query) decayed by ``prod_t a_t``."""
    kv_state, k_state = (full_from_symmetric(part, feature_dim, axis=2) for part in final_state)
    if initial_state is None:
        return kv_state, k_state
    kept = 1.0 if log_decay is None else jnp.exp(jnp.sum(log_decay, axis=1))  # [B, H]
    kept = jnp.asarray(kept, jnp.float32)
    initial_kv, initial_k = initial_state
    kv_state = kv_state + kept[..., None, None] * antisymmetric_part(initial_kv, feature_dim, 2)
    k_state = k_state + kept[..., None] * antisymmetric_part(initial_k, feature_dim, 2)
    return kv_state, k_state
