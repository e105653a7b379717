"""Building blocks shared by the layers: a projection with logical axis names, RMSNorm,
LayerNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

LogicalAxes = tuple[str | None, ...]


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


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis in float32 or wider; no bias."""

    dim: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        weight = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (self.dim,),
            jnp.float32,
        )
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (normed * weight).astype(self.dtype)


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis in float32 or wider."""

    dim: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        weight = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (self.dim,),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            (self.dim,),
            jnp.float32,
        )
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        centered = xf - jnp.mean(xf, axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(
            jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps
        )
        return (normed * weight + bias).astype(self.dtype)


def make_norm(kind: str, dim: int, eps: float, dtype: jnp.dtype) -> nn.Module:
    """The norm named ``kind`` (``rmsnorm`` or ``layernorm``, see ``ModelConfig.norm``)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, dtype)
    if kind == "layernorm":
        return LayerNorm(dim, eps, dtype)
    raise ValueError(f"norm={kind!r} is not known; allowed: ('rmsnorm', 'layernorm')")
