"""Mamba-2 mixer (SPEC.md §2, Dao & Gu 2024): the SSD block.

    z, xbc, dt = split(in_proj(u))          (d -> inner + (inner + 2 G N) + H, no bias)
    x, b, c = split(silu(conv1d(xbc) + conv_bias))      (depthwise, causal, K taps)
    dt = softplus(dt + dt_bias),  a = -exp(A_log)        (one scalar per head)
    h_t = exp(dt_t a) h_{t-1} + dt_t x_t ⊗ b_t,  y_t = h_t c_t + D x_t    (per head, SSD)
    out = out_proj(rmsnorm(y * silu(z)))                 (gated RMSNorm, norm after the gate)

``x`` has ``H = inner / P`` heads of ``P = mamba2_head_dim`` channels; ``b`` and ``c`` have
``G = mamba2_groups`` groups of ``N = mamba2_state_dim``, head ``h`` reading group
``h // (H / G)``. The gated RMSNorm normalises each of the ``G`` groups of ``inner / G``
channels separately (mamba_ssm's ``RMSNormGated(group_size=inner / G)``), eps ``norm_eps``.

Initialisation as mamba_ssm's ``Mamba2``: ``A_log = log(U(a_init_min, a_init_max))`` per head,
``D = 1`` per head, ``dt_bias`` the inverse softplus of a log-uniform time step in
``[ssm_dt_min, ssm_dt_max]`` (floored), conv as PyTorch's default, norm weight 1; projections
normal(``init_std``), ``out_proj`` normal(``output_init_std``).

Decode cache: :class:`Mamba2Cache`, the last ``K - 1`` raw conv inputs (x, B, C) and the float32
SSD state ``[B, H, P, N]``.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.layers.common import Projection
from jaxbased.layers.mamba import conv_bias_init, conv_init, time_step_bias_init, valid_mask
from jaxbased.ops.short_conv import init_short_conv_state, short_conv, short_conv_step
from jaxbased.ops.ssd import ssd, ssd_step


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


class Mamba2(nn.Module):
    """Mamba-2 (SSD) mixer: ``[B, T, d] -> [B, T, d]``.

    Parameters (``inner = ssm_expand * d``, ``C = inner + 2 G N`` conv channels; PyTorch's
    ``[out, in]`` weights transposed): ``in_proj`` kernel ``[d, inner + C + H]`` (columns z, x,
    B, C, dt as the reference's ``in_proj``), ``conv_weight [K, C]``, ``conv_bias [C]``,
    ``dt_bias [H]``, ``A_log [H]``, ``D [H]``, ``norm`` weight ``[inner]``, ``out_proj``
    kernel ``[inner, d]``. ``in_proj`` and the conv mix z, x, B, C and dt columns, so they are
    split over ``fsdp`` only (``embed``); heads and ``out_proj`` split over ``tensor``.
    """

    config: ModelConfig

    def setup(self) -> None:
        config = self.config
        inner, heads = config.ssm_inner_dim, config.mamba2_heads
        channels, kernel_size = config.mamba2_conv_channels, config.ssm_conv_kernel_size
        dtype = config.compute_dtype
        self.in_proj = Projection(
            (config.d_model,),
            (inner + channels + heads,),
            ("embed", None),
            config.init_std,
            dtype,
        )
        self.conv_weight = self.param(
            "conv_weight",
            nn.with_logical_partitioning(conv_init, ("conv_kernel", None)),
            (kernel_size, channels),
            jnp.float32,
        )
        self.conv_bias = self.param(
            "conv_bias",
            nn.with_logical_partitioning(conv_bias_init(kernel_size), (None,)),
            (channels,),
            jnp.float32,
        )
        self.dt_bias = self.param(
            "dt_bias",
            nn.with_logical_partitioning(
                time_step_bias_init(config.ssm_dt_min, config.ssm_dt_max, config.ssm_dt_init_floor),
                ("heads",),
            ),
            (heads,),
            jnp.float32,
        )
        self.A_log = self.param(
            "A_log",
            nn.with_logical_partitioning(
                head_decay_log_init(config.mamba2_a_init_min, config.mamba2_a_init_max),
                ("heads",),
            ),
            (heads,),
            jnp.float32,
        )
        self.D = self.param(
            "D",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("heads",)),
            (heads,),
            jnp.float32,
        )
        self.norm_weight = self.param(
            "norm_weight",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (inner,),
            jnp.float32,
        )
        self.out_proj = Projection(
            (inner,), (config.d_model,), ("conv_channels", "embed"), config.output_init_std, dtype
        )

    def _split_projection(self, projected: Array) -> tuple[Array, Array, Array]:
        """``in_proj`` output -> (z, conv input x|B|C, dt)."""
        config = self.config
        inner, channels = config.ssm_inner_dim, config.mamba2_conv_channels
        return (
            projected[..., :inner],
            projected[..., inner : inner + channels],
            projected[..., inner + channels :],
        )

    def _heads(self, conv_out: Array, dt: Array) -> tuple[Array, Array, Array, Array]:
        """``silu(conv)`` and raw dt -> x ``[..., H, P]``, dt float32 ``[..., H]``, b, c
        ``[..., G, N]``."""
        config = self.config
        inner, groups, state = config.ssm_inner_dim, config.mamba2_groups, config.mamba2_state_dim
        activated = jax.nn.silu(conv_out + self.conv_bias.astype(conv_out.dtype))
        lead = activated.shape[:-1]
        x = activated[..., :inner].reshape(*lead, config.mamba2_heads, config.mamba2_head_dim)
        b = activated[..., inner : inner + groups * state].reshape(*lead, groups, state)
        c = activated[..., inner + groups * state :].reshape(*lead, groups, state)
        dt = jax.nn.softplus(dt.astype(jnp.promote_types(dt.dtype, jnp.float32)) + self.dt_bias)
        return x, dt, b, c

    def _output(self, y: Array, x: Array, gate: Array) -> Array:
        """``y, x [..., H, P]`` -> ``out_proj(rmsnorm_groups((y + D x) * silu(z)))``."""
        config = self.config
        y = y + self.D[:, None].astype(y.dtype) * x
        gated = y.reshape(*y.shape[:-2], config.ssm_inner_dim) * jax.nn.silu(gate)
        wide = gated.astype(jnp.promote_types(gated.dtype, jnp.float32))
        groups = wide.reshape(*wide.shape[:-1], config.mamba2_groups, -1)
        normed = groups * jax.lax.rsqrt(
            jnp.mean(groups * groups, axis=-1, keepdims=True) + config.norm_eps
        )
        normed = normed.reshape(wide.shape) * self.norm_weight
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
            x, dt, self._a(), b, c, chunk_size=config.mamba2_chunk_size, return_state=return_state
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

    def decode(
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
        config = self.config
        return Mamba2Cache(
            init_short_conv_state(
                batch_size,
                config.ssm_conv_kernel_size,
                config.mamba2_conv_channels,
                config.compute_dtype,
            ),
            jnp.zeros(
                (batch_size, config.mamba2_heads, config.mamba2_head_dim, config.mamba2_state_dim),
                jnp.float32,
            ),
        )
