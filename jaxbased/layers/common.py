"""Building blocks shared by the layers: a projection with logical axis names, RMSNorm,
LayerNorm, the RMS normalisation they and the mixers' inner norms share, the padding mask."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

LogicalAxes = tuple[str | None, ...]

#: Normalisation layers: ``rmsnorm`` (no bias, the released models) or ``layernorm`` (with bias,
#: the Zoology MQAR models).
NORMS: tuple[str, ...] = ("rmsnorm", "layernorm")


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


def _norm_param(
    module: nn.Module, name: str, init: nn.initializers.Initializer, dim: int
) -> Float[Array, " D"]:
    """A float32 ``[dim]`` norm parameter with the logical axis ``norm``."""
    return module.param(name, nn.with_logical_partitioning(init, ("norm",)), (dim,), jnp.float32)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis in float32 or wider; no bias."""

    dim: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        weight = _norm_param(self, "weight", nn.initializers.ones_init(), self.dim)
        return (rms_normalize(x, self.eps) * weight).astype(self.dtype)


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis in float32 or wider."""

    dim: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        weight = _norm_param(self, "weight", nn.initializers.ones_init(), self.dim)
        bias = _norm_param(self, "bias", nn.initializers.zeros_init(), self.dim)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        normed = rms_normalize(xf - jnp.mean(xf, axis=-1, keepdims=True), self.eps)
        return (normed * weight + bias).astype(self.dtype)


def make_norm(kind: str, dim: int, eps: float, dtype: jnp.dtype) -> nn.Module:
    """The norm named ``kind`` (one of ``NORMS``, see ``ModelConfig.norm``)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, dtype)
    if kind == "layernorm":
        return LayerNorm(dim, eps, dtype)
    raise ValueError(f"norm={kind!r} is not known; allowed: ('rmsnorm', 'layernorm')")
