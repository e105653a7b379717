"""BaseConv: gated short convolution (SPEC.md §2).

``u1, u2 = split(in_proj(x))``; ``out = out_proj(silu(conv(u1)) * u2)`` with a depthwise causal
conv of ``conv_kernel_size`` taps over time. Decode cache: the last ``K - 1`` raw ``u1`` inputs,
``[B, K - 1, C]`` in the activation dtype.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.layers.common import Projection
from jaxbased.ops.short_conv import init_short_conv_state, short_conv, short_conv_step


def _conv_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    # PyTorch's default for a depthwise Conv1d (fan_in = kernel_size): U(-1/sqrt(K), 1/sqrt(K)).
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class BaseConv(nn.Module):
    """Gated short convolution mixer: ``[B, T, d] -> [B, T, d]``.

    Parameters: ``in_proj`` kernel ``[d, 2, C]`` and bias ``[2, C]`` (``u1`` then ``u2``),
    ``conv_weight [K, C]`` (the reference's ``[C, 1, K]`` transposed), ``out_proj`` kernel
    ``[C, d]`` and bias ``[d]``; ``C = conv_expand * d / 2``.
    """

    config: ModelConfig

    def setup(self) -> None:
        config = self.config
        channels = config.conv_channels
        self.in_proj = Projection(
            (config.d_model,),
            (2, channels),
            ("embed", None, "conv_channels"),
            config.init_std,
            config.compute_dtype,
            use_bias=True,
            bias_axes=(None, "conv_channels"),
        )
        self.conv_weight = self.param(
            "conv_weight",
            nn.with_logical_partitioning(_conv_init, ("conv_kernel", "conv_channels")),
            (config.conv_kernel_size, channels),
            jnp.float32,
        )
        self.out_proj = Projection(
            (channels,),
            (config.d_model,),
            ("conv_channels", "embed"),
            config.output_init_std,
            config.compute_dtype,
            use_bias=True,
            bias_axes=("embed",),
        )

    def _gate(self, convolved: Array, gate: Array) -> Array:
        return self.out_proj(jax.nn.silu(convolved) * gate)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        u = self.in_proj(x)
        convolved = short_conv(u[..., 0, :], self.conv_weight.astype(u.dtype))
        return self._gate(convolved, u[..., 1, :])

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], Float[Array, "B K1 C"]]:
        """Forward over a prompt; also returns the conv cache after it.

        ``lengths [B]``: valid tokens per row of right-padded prompts; each row's cache is then
        its last ``K - 1`` valid inputs.
        """
        del max_len  # the conv cache does not depend on it
        u = self.in_proj(x)
        convolved, state = short_conv(
            u[..., 0, :], self.conv_weight.astype(u.dtype), return_state=True, lengths=lengths
        )
        return self._gate(convolved, u[..., 1, :]), state

    def decode(
        self, x: Float[Array, "B D"], cache: Float[Array, "B K1 C"], position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], Float[Array, "B K1 C"]]:
        """One token per row; ``position`` is unused (the conv has no positions)."""
        del position
        u = self.in_proj(x)
        convolved, cache = short_conv_step(u[:, 0, :], cache, self.conv_weight.astype(u.dtype))
        return self._gate(convolved, u[:, 1, :]), cache

    def init_cache(self, batch_size: int, max_len: int) -> Float[Array, "B K1 C"]:
        del max_len
        config = self.config
        return init_short_conv_state(
            batch_size, config.conv_kernel_size, config.conv_channels, config.compute_dtype
        )
