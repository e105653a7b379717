"""Mamba-2 mixer (docs/mixers/mamba2.md, Dao & Gu 2024): the SSD block.

    z, xbc, dt = split(in_proj(u))          (d -> inner + (inner + 2 G N) + H, no bias)
    x, b, c = split(silu(conv1d(xbc) + conv_bias))      (depthwise, causal, K taps)
    dt = softplus(dt + dt_bias),  a = -exp(A_log)        (one scalar per head)
    h_t = exp(dt_t a) h_{t-1} + dt_t x_t ⊗ b_t,  y_t = h_t c_t + D x_t    (per head, SSD)
    out = out_proj(rmsnorm(y * silu(z)))                 (gated RMSNorm, norm after the gate)

``x`` has ``H = inner / P`` heads of ``P = head_dim`` channels; ``b`` and ``c`` have
``G = groups`` groups of ``N = state_dim``, head ``h`` reading group
``h // (H / G)``. The gated RMSNorm normalises each of the ``G`` groups of ``inner / G``
channels separately (mamba_ssm's ``RMSNormGated(group_size=inner / G)``), eps ``norm_eps``.

Initialisation as mamba_ssm's ``Mamba2``: ``A_log = log(U(a_init_min, a_init_max))`` per head,
``D = 1`` per head, ``dt_bias`` the inverse softplus of a log-uniform time step in
``[dt_min, dt_max]`` (floored), conv as PyTorch's default, norm weight 1; projections
normal(``init_std``), ``out_proj`` normal(``output_init_std``).

Decode cache: :class:`Mamba2Cache`, the last ``K - 1`` raw conv inputs (x, B, C) and the float32
SSD state ``[B, H, P, N]``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.layers.common import Projection, conv_init, logical_param, rms_normalize, valid_mask
from jaxbased.layers.mamba import StateSpaceConfig, conv_bias_init, time_step_bias_init
from jaxbased.layers.mixer import (
    MixerContext,
    StateSizeFromCache,
    require_divides,
    require_positive,
    require_positive_int,
)
from jaxbased.ops.short_conv import init_short_conv_state, short_conv, short_conv_step
from jaxbased.ops.ssd import ssd, ssd_step


@dataclasses.dataclass(frozen=True)
class Mamba2Config(StateSpaceConfig):
    """The ``mamba2`` (SSD) mixer: :class:`~jaxbased.layers.mamba.StateSpaceConfig`'s fields and

    Attributes:
      state_dim: state size ``N``.
      head_dim: head dim ``P``; heads ``H = inner / P``.
      groups: groups ``G`` of B and C (each shared by ``H / G`` heads).
      chunk_size: the SSD chunk.
      a_init_min, a_init_max: the range of ``-A`` at init.
    """

    state_dim: int = 128
    head_dim: int = 64
    groups: int = 1
    chunk_size: int = 256
    a_init_min: float = 1.0
    a_init_max: float = 16.0

    def check(self) -> None:
        super().check()
        require_positive_int(self, "state_dim", "head_dim", "groups", "chunk_size")
        require_positive(self, "a_init_min")
        if not self.a_init_max >= self.a_init_min:
            raise ValueError(
                f"a_init_max={self.a_init_max!r} must be >= a_init_min={self.a_init_min!r}"
            )

    def validate(self, context: MixerContext) -> None:
        inner = self.inner_dim(context.d_model)
        require_divides("head_dim", self.head_dim, "the inner width expand * d_model", inner)
        require_divides("groups", self.groups, "the number of heads", inner // self.head_dim)

    def heads(self, d_model: int) -> int:
        """SSD heads: ``inner / head_dim``."""
        return self.inner_dim(d_model) // self.head_dim

    def conv_channels(self, d_model: int) -> int:
        """Channels of the conv (x, B and C): ``inner + 2 * groups * state_dim``."""
        return self.inner_dim(d_model) + 2 * self.groups * self.state_dim


class Mamba2Cache(NamedTuple):
    """Decoding state of one Mamba-2 layer.

    conv_state: ``[B, K - 1, inner + 2 G N]``, the last raw conv inputs (activation dtype).
    ssm_state: ``[B, H, P, N]`` float32, the SSD state ``h``.
    """

    conv_state: Float[Array, "B K1 C"]
    ssm_state: Float[Array, "B H P N"]


def head_decay_log_init(low: float, high: float) -> nn.initializers.Initializer:
    """``A_log = log(A)`` with ``A ~ U(low, high)`` per head (``a = -A`` at run time)."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)

    return init


class Mamba2(StateSizeFromCache, nn.Module):
    """Mamba-2 (SSD) mixer: ``[B, T, d] -> [B, T, d]``.

    Parameters (``inner = expand * d``, ``C = inner + 2 G N`` conv channels; PyTorch's
    ``[out, in]`` weights transposed): ``in_proj`` kernel ``[d, inner + C + H]`` (columns z, x,
    B, C, dt as the reference's ``in_proj``), ``conv_weight [K, C]``, ``conv_bias [C]``,
    ``dt_bias [H]``, ``A_log [H]``, ``D [H]``, ``norm`` weight ``[inner]``, ``out_proj``
    kernel ``[inner, d]``. ``in_proj`` and the conv mix z, x, B, C and dt columns, so they are
    split over ``fsdp`` only (``embed``); heads and ``out_proj`` split over ``tensor``.
    """

    config: Mamba2Config
    context: MixerContext

    def setup(self) -> None:
        config, context = self.config, self.context
        d_model = context.d_model
        inner, heads = config.inner_dim(d_model), config.heads(d_model)
        channels, kernel_size = config.conv_channels(d_model), config.conv_kernel_size
        dtype = context.compute_dtype
        self.in_proj = Projection(
            (d_model,), (inner + channels + heads,), ("embed", None), context.init_std, dtype
        )
        self.conv_weight = logical_param(
            self, "conv_weight", conv_init, ("conv_kernel", None), (kernel_size, channels)
        )
        self.conv_bias = logical_param(
            self, "conv_bias", conv_bias_init(kernel_size), (None,), (channels,)
        )
        self.dt_bias = logical_param(
            self,
            "dt_bias",
            time_step_bias_init(config.dt_min, config.dt_max, config.dt_init_floor),
            ("heads",),
            (heads,),
        )
        self.A_log = logical_param(
            self,
            "A_log",
            head_decay_log_init(config.a_init_min, config.a_init_max),
            ("heads",),
            (heads,),
        )
        self.D = logical_param(self, "D", nn.initializers.ones_init(), ("heads",), (heads,))
        self.norm_weight = logical_param(
            self, "norm_weight", nn.initializers.ones_init(), ("norm",), (inner,)
        )
        self.out_proj = Projection(
            (inner,), (d_model,), ("conv_channels", "embed"), context.output_init_std, dtype
        )

    def _split_projection(self, projected: Array) -> tuple[Array, Array, Array]:
        """``in_proj`` output -> (z, conv input x|B|C, dt)."""
        config, d_model = self.config, self.context.d_model
        inner, channels = config.inner_dim(d_model), config.conv_channels(d_model)
        return (
            projected[..., :inner],
            projected[..., inner : inner + channels],
            projected[..., inner + channels :],
        )

    def _heads(self, conv_out: Array, dt: Array) -> tuple[Array, Array, Array, Array]:
        """``silu(conv)`` and raw dt -> x ``[..., H, P]``, dt float32 ``[..., H]``, b, c
        ``[..., G, N]``."""
        config, d_model = self.config, self.context.d_model
        inner, groups, state = config.inner_dim(d_model), config.groups, config.state_dim
        activated = jax.nn.silu(conv_out + self.conv_bias.astype(conv_out.dtype))
        lead = activated.shape[:-1]
        x = activated[..., :inner].reshape(*lead, config.heads(d_model), config.head_dim)
        b = activated[..., inner : inner + groups * state].reshape(*lead, groups, state)
        c = activated[..., inner + groups * state :].reshape(*lead, groups, state)
        dt = jax.nn.softplus(dt.astype(jnp.promote_types(dt.dtype, jnp.float32)) + self.dt_bias)
        return x, dt, b, c

    def _output(self, y: Array, x: Array, gate: Array) -> Array:
        """``y, x [..., H, P]`` -> ``out_proj(rmsnorm_groups((y + D x) * silu(z)))``."""
        config = self.config
        y = y + self.D[:, None].astype(y.dtype) * x
        gated = y.reshape(*y.shape[:-2], config.inner_dim(self.context.d_model)) * jax.nn.silu(gate)
        groups = gated.reshape(*gated.shape[:-1], config.groups, -1)
        normed = rms_normalize(groups, self.context.norm_eps).reshape(gated.shape)
        normed = normed * self.norm_weight
        return self.out_proj(normed.astype(gated.dtype))

    def _a(self) -> Array:
        return -jnp.exp(self.A_log)

    def _forward(self, u: Array, lengths: Array | None, return_state: bool):
        config = self.config
        gate, conv_input, dt = self._split_projection(self.in_proj(u))
        conv_weight = self.conv_weight.astype(conv_input.dtype)
        if return_state:
            conv_out, conv_state = short_conv(
                conv_input, conv_weight, return_state=True, lengths=lengths
            )
        else:
            conv_out, conv_state = short_conv(conv_input, conv_weight), None
        x, dt, b, c = self._heads(conv_out, dt)
        mask = valid_mask(lengths, u.shape[1])
        if mask is not None:  # dt = 0 leaves the state untouched: padding never enters it
            dt = jnp.where(mask[..., None], dt, 0.0)
        result = ssd(
            x,
            dt,
            self._a(),
            b,
            c,
            chunk_size=config.chunk_size,
            return_state=return_state,
            implementation=self.context.implementation,
        )
        y, ssm_state = result if return_state else (result, None)
        return self._output(y.astype(x.dtype), x, gate), conv_state, ssm_state

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self._forward(x, None, return_state=False)[0]

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], Mamba2Cache]:
        """Forward over a prompt; also returns the cache after it.

        ``lengths [B]``: valid tokens per row of right-padded prompts. Padding gets ``dt = 0``
        (state carried through unchanged) and the conv cache holds each row's last ``K - 1``
        valid inputs, so the cache is that of the valid tokens alone.
        """
        del max_len  # the cache does not grow with the length
        out, conv_state, ssm_state = self._forward(x, lengths, return_state=True)
        return out, Mamba2Cache(conv_state, ssm_state)

    def decode_step(
        self, x: Float[Array, "B D"], cache: Mamba2Cache, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], Mamba2Cache]:
        """One token per row; ``position`` is unused (no positional information)."""
        del position
        gate, conv_input, dt = self._split_projection(self.in_proj(x))
        conv_out, conv_state = short_conv_step(
            conv_input, cache.conv_state, self.conv_weight.astype(conv_input.dtype)
        )
        x_heads, dt, b, c = self._heads(conv_out, dt)
        y, ssm_state = ssd_step(x_heads, dt, self._a(), b, c, cache.ssm_state)
        out = self._output(y.astype(x_heads.dtype), x_heads, gate)
        return out, Mamba2Cache(conv_state, ssm_state)

    def init_cache(self, batch_size: int, max_len: int) -> Mamba2Cache:
        del max_len
        config, context = self.config, self.context
        d_model = context.d_model
        return Mamba2Cache(
            init_short_conv_state(
                batch_size,
                config.conv_kernel_size,
                config.conv_channels(d_model),
                context.compute_dtype,
            ),
            jnp.zeros(
                (batch_size, config.heads(d_model), config.head_dim, config.state_dim),
                jnp.float32,
            ),
        )

    def flops(self, seq_len: int) -> float:
        """Projections and conv, plus SSD as the chunked scan: intra-chunk ``C·B`` dots and
        weighted sums, the state read and update per head."""
        config, d = self.config, self.context.d_model
        inner, heads, channels = config.inner_dim(d), config.heads(d), config.conv_channels(d)
        state, head_dim = config.state_dim, config.head_dim
        chunk = min(config.chunk_size, seq_len)
        projections = 2 * d * (inner + channels + heads) + 2 * inner * d
        per_head = 2 * chunk * state + 2 * chunk * head_dim + 4 * state * head_dim
        return projections + 2 * config.conv_kernel_size * channels + heads * per_head
