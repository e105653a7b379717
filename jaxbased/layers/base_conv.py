"""BaseConv: gated short convolution (docs/mixers/base_conv.md).

``u1, u2 = split(in_proj(x))``; ``out = out_proj(silu(conv(u1)) * u2)`` with a depthwise causal
conv of ``kernel_size`` taps over time. Decode cache: :class:`ConvCache`, the last ``K - 1`` raw
``u1`` inputs, ``[B, K - 1, C]`` in the activation dtype.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
from jaxtyping import Array, Float, Int

from jaxbased.layers.common import Projection, conv_init, logical_param
from jaxbased.layers.mixer import (
    MixerConfig,
    MixerContext,
    StateSizeFromCache,
    require_positive_int,
)
from jaxbased.ops.short_conv import init_short_conv_state, short_conv, short_conv_step


@dataclasses.dataclass(frozen=True)
class BaseConvConfig(MixerConfig):
    """The ``base_conv`` mixer.

    Attributes:
      kernel_size: taps ``K`` of the depthwise causal conv.
      expand: ``in_proj`` maps ``d -> expand * d``, split into two halves of
        ``C = expand * d / 2`` channels (even).
    """

    kernel_size: int = 3
    expand: int = 4

    def check(self) -> None:
        require_positive_int(self, "kernel_size", "expand")
        if self.expand % 2:
            raise ValueError(f"expand={self.expand} must be even (split into two halves)")

    def channels(self, d_model: int) -> int:
        """Channels of the conv (and of each ``in_proj`` half): ``expand * d / 2``."""
        return self.expand * d_model // 2


@flax.struct.dataclass
class ConvCache:
    """Decoding state of a BaseConv layer: ``inputs [B, K - 1, C]``, the last raw conv inputs
    (activation dtype)."""

    inputs: Float[Array, "B K1 C"]


class BaseConv(StateSizeFromCache, nn.Module):
    """Gated short convolution mixer: ``[B, T, d] -> [B, T, d]``.

    Parameters: ``in_proj`` kernel ``[d, 2, C]`` and bias ``[2, C]`` (``u1`` then ``u2``),
    ``conv_weight [K, C]`` (the reference's ``[C, 1, K]`` transposed), ``out_proj`` kernel
    ``[C, d]`` and bias ``[d]``; ``C = expand * d / 2``.
    """

    config: BaseConvConfig
    context: MixerContext

    def setup(self) -> None:
        config, context = self.config, self.context
        channels = config.channels(context.d_model)
        self.in_proj = Projection(
            (context.d_model,),
            (2, channels),
            ("embed", None, "conv_channels"),
            context.init_std,
            context.compute_dtype,
            use_bias=True,
            bias_axes=(None, "conv_channels"),
        )
        self.conv_weight = logical_param(
            self,
            "conv_weight",
            conv_init,
            ("conv_kernel", "conv_channels"),
            (config.kernel_size, channels),
        )
        self.out_proj = Projection(
            (channels,),
            (context.d_model,),
            ("conv_channels", "embed"),
            context.output_init_std,
            context.compute_dtype,
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
    ) -> tuple[Float[Array, "B T D"], ConvCache]:
        """Forward over a prompt; also returns the conv cache after it.

        ``lengths [B]``: valid tokens per row of right-padded prompts; each row's cache is then
        its last ``K - 1`` valid inputs.
        """
        del max_len  # the conv cache does not depend on it
        u = self.in_proj(x)
        convolved, state = short_conv(
            u[..., 0, :], self.conv_weight.astype(u.dtype), return_state=True, lengths=lengths
        )
        return self._gate(convolved, u[..., 1, :]), ConvCache(state)

    def decode_step(
        self, x: Float[Array, "B D"], cache: ConvCache, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], ConvCache]:
        """One token per row; ``position`` is unused (the conv has no positions)."""
        del position
        u = self.in_proj(x)
        convolved, inputs = short_conv_step(
            u[:, 0, :], cache.inputs, self.conv_weight.astype(u.dtype)
        )
        return self._gate(convolved, u[:, 1, :]), ConvCache(inputs)

    def init_cache(self, batch_size: int, max_len: int) -> ConvCache:
        del max_len
        config, context = self.config, self.context
        return ConvCache(
            init_short_conv_state(
                batch_size,
                config.kernel_size,
                config.channels(context.d_model),
                context.compute_dtype,
            )
        )

    def flops(self, seq_len: int) -> float:
        """``in_proj``, the conv and ``out_proj`` per token (independent of ``seq_len``)."""
        del seq_len
        d, channels = self.context.d_model, self.config.channels(self.context.d_model)
        return 2 * d * 2 * channels + 2 * self.config.kernel_size * channels + 2 * channels * d
