"""Building blocks shared by the layers: a projection with logical axis names, RMSNorm,
LayerNorm, the weightless simple RMSNorm, the RMS normalisation they and the mixers' inner norms
share, the padding mask."""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxbased.layers.mixer import MixerContext

LogicalAxes = tuple[str | None, ...]

#: Normalisation layers: ``rmsnorm`` (no bias, the released models), ``layernorm`` (with bias,
#: the Zoology MQAR models) or ``srmsnorm`` (TransNormerLLM's weightless simple RMSNorm).
NORMS: tuple[str, ...] = ("rmsnorm", "layernorm", "srmsnorm")


def normal_init(std: float, axes: LogicalAxes) -> nn.initializers.Initializer:
    """``normal(0, std)`` float32 parameters carrying logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


class Projection(nn.Module):
    """``y = x · kernel (+ bias)``, contracting the trailing ``len(in_shape)`` axes of ``x``.

    The kernel has shape ``in_shape + out_shape`` (float32, logical axes ``kernel_axes``), so a
    PyTorch ``Linear`` weight ``[out, in]`` maps onto it by a transpose and a reshape. Compute is in
    ``dtype`` (the activation dtype); the output has that dtype.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_axes: LogicalAxes
    std: float
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = False
    bias_axes: LogicalAxes = ()

    @nn.compact
    def __call__(self, x: Float[Array, "... In"]) -> Float[Array, "... Out"]:
        kernel = self.param(
            "kernel",
            normal_init(self.std, self.kernel_axes),
            self.in_shape + self.out_shape,
            jnp.float32,
        )
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in :] != self.in_shape:
            raise ValueError(f"input trailing shape {x.shape[x.ndim - n_in :]} != {self.in_shape}")
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), self.bias_axes),
                self.out_shape,
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        return y


def head_projection(context: MixerContext, heads: int, width: int, last_axis: str) -> Projection:
    """``[..., d] -> [..., heads, width]`` without bias, logical axes ``(embed, heads,
    last_axis)``, init ``normal(context.init_std)``, computing in the activation dtype."""
    return Projection(
        (context.d_model,),
        (heads, width),
        ("embed", "heads", last_axis),
        context.init_std,
        context.compute_dtype,
    )


def head_output_projection(context: MixerContext, heads: int, width: int) -> Projection:
    """``[..., heads, width] -> [..., d]`` without bias, init ``normal(output_init_std)``: the
    output projection of a multi-head mixer."""
    return Projection(
        (heads, width),
        (context.d_model,),
        ("heads", "head_dim", "embed"),
        context.output_init_std,
        context.compute_dtype,
    )


def conv_init(key: Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> Array:
    """PyTorch's default for a depthwise ``Conv1d`` weight ``[K, C]`` (fan_in = K):
    ``U(-1/sqrt(K), 1/sqrt(K))``."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def rms_normalize(x: Float[Array, "... D"], eps: float) -> Float[Array, "... D"]:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in float32 or wider (the result keeps
    that wide dtype; callers scale it and cast back)."""
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return wide * jax.lax.rsqrt(jnp.mean(wide * wide, axis=-1, keepdims=True) + eps)


def valid_mask(lengths: Int[Array, " B"] | None, seq: int) -> Bool[Array, "B T"] | None:
    """``[B, T]`` bool, True at the valid positions ``t < lengths[b]`` of right-padded rows
    (None when ``lengths`` is None: every position is valid)."""
    if lengths is None:
        return None
    return jnp.arange(seq) < jnp.asarray(lengths, jnp.int32)[:, None]


def logical_param(
    module: nn.Module,
    name: str,
    init: nn.initializers.Initializer,
    axes: LogicalAxes,
    shape: tuple[int, ...],
) -> Array:
    """A float32 parameter ``name`` of ``module`` with logical axis names ``axes`` (one per
    dimension of ``shape``), initialised by ``init``; call it from ``setup`` or a compact
    ``__call__``."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class _Norm(nn.Module):
    """Normalisation over the last axis in float32 or wider, scaled by a learned ``weight``;
    subclasses set ``centered`` (subtract the mean first and add a learned ``bias``)."""

    dim: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    centered: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        weight = logical_param(self, "weight", nn.initializers.ones_init(), ("norm",), (self.dim,))
        wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.centered:
            wide = wide - jnp.mean(wide, axis=-1, keepdims=True)
        normed = rms_normalize(wide, self.eps) * weight
        if self.centered:
            bias = logical_param(self, "bias", nn.initializers.zeros_init(), ("norm",), (self.dim,))
            normed = normed + bias
        return normed.astype(self.dtype)


class RMSNorm(_Norm):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis in float32 or wider; no bias."""


class LayerNorm(_Norm):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis in float32 or wider."""

    centered: ClassVar[bool] = True


def simple_rms_normalize(x: Float[Array, "... D"], eps: float) -> Float[Array, "... D"]:
    """TransNormerLLM's SRMSNorm, ``x / (||x||_2 / sqrt(D) + eps)`` over the last axis (the
    epsilon outside the root), in float32 or wider; no parameters."""
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    root_mean_square = jnp.sqrt(jnp.mean(wide * wide, axis=-1, keepdims=True))
    return wide / (root_mean_square + eps)


class SimpleRMSNorm(nn.Module):
    """:func:`simple_rms_normalize`, cast to ``dtype``: a norm without parameters."""

    dim: int
    eps: float = 1e-8
    dtype: jnp.dtype = jnp.float32

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"input width {x.shape[-1]} != norm dim {self.dim}")
        return simple_rms_normalize(x, self.eps).astype(self.dtype)


def make_norm(kind: str, dim: int, eps: float, dtype: jnp.dtype) -> nn.Module:
    """The norm named ``kind`` (one of ``NORMS``, see ``ModelConfig.norm``)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, dtype)
    if kind == "layernorm":
        return LayerNorm(dim, eps, dtype)
    if kind == "srmsnorm":
        return SimpleRMSNorm(dim, eps, dtype)
    raise ValueError(f"norm={kind!r} is not known; allowed: {NORMS}")
