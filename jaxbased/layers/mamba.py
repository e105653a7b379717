"""Mamba (Mamba-1) mixer (docs/mixers/mamba.md, Gu & Dao 2023): a selective state-space block.

    x, z = split(in_proj(u))                                 (d -> 2 * inner, no bias)
    x = silu(conv1d(x) + conv_bias)                          (depthwise, causal, K taps)
    dt_low, b, c = split(x_proj(x))                          (inner -> R + 2N, no bias)
    delta = softplus(dt_low · dt_proj + dt_bias)             (R -> inner)
    h_t = exp(delta_t a) h_{t-1} + delta_t x_t b_t,  y_t = h_t c_t + D x_t,  a = -exp(A_log)
    out = out_proj(y * silu(z))                              (inner -> d, no bias)

``h`` is a diagonal state of ``N`` entries per inner channel. Initialisation as the reference
(mamba_ssm's ``Mamba``): ``A_log = log(1..N)`` per channel (S4D-real), ``D = 1``, ``dt_proj``
weight uniform in ``±R^-0.5``, ``dt_bias`` the inverse softplus of a log-uniform time step in
``[dt_min, dt_max]`` (floored at ``dt_init_floor``), the conv as PyTorch's default;
``in_proj``/``x_proj`` are normal(``init_std``) and ``out_proj`` normal(``output_init_std``), as
every projection of this library.

Decode cache: :class:`MambaCache`, the last ``K - 1`` raw conv inputs and the float32 SSM state
``[B, inner, N]``; neither grows with the sequence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.layers.common import Projection, conv_init, logical_param, valid_mask
from jaxbased.layers.mixer import (
    MixerConfig,
    MixerContext,
    StateSizeFromCache,
    require_choice,
    require_positive,
    require_positive_int,
)
from jaxbased.ops.selective_scan import ALGORITHMS as SELECTIVE_SCAN_ALGORITHMS
from jaxbased.ops.selective_scan import selective_scan, selective_scan_step
from jaxbased.ops.short_conv import init_short_conv_state, short_conv, short_conv_step


@dataclasses.dataclass(frozen=True)
class StateSpaceConfig(MixerConfig):
    """Fields that Mamba and Mamba-2 share.

    Attributes:
      expand: inner width ``expand * d_model``.
      conv_kernel_size: taps of the depthwise causal conv (with bias).
      dt_min, dt_max, dt_init_floor: the time-step init, ``softplus(dt_bias)`` log-uniform in
        ``[dt_min, dt_max]``, at least the floor.
    """

    expand: int = 2
    conv_kernel_size: int = 4
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4

    def check(self) -> None:
        require_positive_int(self, "expand", "conv_kernel_size")
        require_positive(self, "dt_min", "dt_init_floor")
        if not self.dt_max >= self.dt_min:
            raise ValueError(f"dt_max={self.dt_max!r} must be >= dt_min={self.dt_min!r}")

    def inner_dim(self, d_model: int) -> int:
        """Inner width: ``expand * d_model``."""
        return self.expand * d_model


@dataclasses.dataclass(frozen=True)
class MambaConfig(StateSpaceConfig):
    """The ``mamba`` (Mamba-1) mixer: :class:`StateSpaceConfig`'s fields and

    Attributes:
      state_dim: state size ``N`` per inner channel.
      dt_rank: rank ``R`` of the time-step projection (None: ``ceil(d_model / 16)``).
      scan_algorithm: the selective-scan algorithm (``chunked``, ``associative``,
        ``sequential``).
      chunk_size: chunk of the chunked scan.
    """

    state_dim: int = 16
    dt_rank: int | None = None
    scan_algorithm: str = "chunked"
    chunk_size: int = 64

    def check(self) -> None:
        super().check()
        require_positive_int(self, "state_dim", "chunk_size")
        require_positive_int(self, "dt_rank", optional=True)
        require_choice(self, "scan_algorithm", SELECTIVE_SCAN_ALGORITHMS)

    def time_step_rank(self, d_model: int) -> int:
        """Rank of the time-step projection: ``dt_rank`` or ``ceil(d_model / 16)``."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(d_model / 16)


class MambaCache(NamedTuple):
    """Decoding state of one Mamba layer.

    conv_state: ``[B, K - 1, inner]``, the last raw conv inputs (activation dtype).
    ssm_state: ``[B, inner, N]`` float32, the selective-scan state ``h``.
    """

    conv_state: Float[Array, "B K1 C"]
    ssm_state: Float[Array, "B C N"]


def conv_bias_init(kernel_size: int) -> nn.initializers.Initializer:
    """PyTorch's default for a depthwise ``Conv1d`` bias: ``U(-1/sqrt(K), 1/sqrt(K))``."""
    bound = 1.0 / math.sqrt(kernel_size)

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def time_step_bias_init(dt_min: float, dt_max: float, floor: float) -> nn.initializers.Initializer:
    """``dt_bias`` such that ``softplus(dt_bias)`` is log-uniform in ``[dt_min, dt_max]``
    (at least ``floor``): ``dt + log(-expm1(-dt))``, the inverse of softplus."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        uniform = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(uniform * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def symmetric_uniform_init(bound: float) -> nn.initializers.Initializer:
    """``U(-bound, bound)`` (Mamba's ``dt_proj`` weight: ``bound = R^-0.5``)."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def s4d_real_log_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """S4D-real ``A_log [C, N]``: ``log(1), ..., log(N)`` in every channel (``key`` unused)."""
    del key
    channels, state = shape
    return jnp.broadcast_to(jnp.log(jnp.arange(1, state + 1, dtype=dtype)), (channels, state))


class Mamba(StateSizeFromCache, nn.Module):
    """Mamba-1 mixer: ``[B, T, d] -> [B, T, d]``.

    Parameters (``inner = expand * d``, ``R = time_step_rank``, ``N = state_dim``; PyTorch's
    ``[out, in]`` weights transposed):
    ``in_proj`` kernel ``[d, 2, inner]`` (x half, then z), ``conv_weight [K, inner]``,
    ``conv_bias [inner]``, ``x_proj`` kernel ``[inner, R + 2N]`` (dt, B, C),
    ``dt_proj_kernel [R, inner]`` and ``dt_bias [inner]`` (the reference's ``dt_proj``),
    ``A_log [inner, N]``, ``D [inner]``, ``out_proj`` kernel ``[inner, d]``. The ``inner``
    channels carry the logical axis ``conv_channels`` (split over ``tensor``).
    """

    config: MambaConfig
    context: MixerContext

    def setup(self) -> None:
        config, context = self.config, self.context
        d_model = context.d_model
        inner, rank, state = (
            config.inner_dim(d_model),
            config.time_step_rank(d_model),
            config.state_dim,
        )
        dtype = context.compute_dtype
        self.in_proj = Projection(
            (d_model,), (2, inner), ("embed", None, "conv_channels"), context.init_std, dtype
        )
        self.conv_weight = logical_param(
            self,
            "conv_weight",
            conv_init,
            ("conv_kernel", "conv_channels"),
            (config.conv_kernel_size, inner),
        )
        self.conv_bias = logical_param(
            self, "conv_bias", conv_bias_init(config.conv_kernel_size), ("conv_channels",), (inner,)
        )
        self.x_proj = Projection(
            (inner,), (rank + 2 * state,), ("conv_channels", "feature"), context.init_std, dtype
        )
        self.dt_proj_kernel = logical_param(
            self,
            "dt_proj_kernel",
            symmetric_uniform_init(rank**-0.5),
            ("feature", "conv_channels"),
            (rank, inner),
        )
        self.dt_bias = logical_param(
            self,
            "dt_bias",
            time_step_bias_init(config.dt_min, config.dt_max, config.dt_init_floor),
            ("conv_channels",),
            (inner,),
        )
        self.A_log = logical_param(
            self, "A_log", s4d_real_log_init, ("conv_channels", "feature"), (inner, state)
        )
        self.D = logical_param(self, "D", nn.initializers.ones_init(), ("conv_channels",), (inner,))
        self.out_proj = Projection(
            (inner,), (d_model,), ("conv_channels", "embed"), context.output_init_std, dtype
        )

    def _inputs(self, x: Array) -> tuple[Array, Array]:
        u = self.in_proj(x)
        return u[..., 0, :], u[..., 1, :]

    def _selection(self, conv_out: Array) -> tuple[Array, Array, Array, Array]:
        """Conv output -> (scan input ``silu(conv + bias)``, delta in float32 or wider, b, c)."""
        config = self.config
        rank, state = config.time_step_rank(self.context.d_model), config.state_dim
        scan_input = jax.nn.silu(conv_out + self.conv_bias.astype(conv_out.dtype))
        projected = self.x_proj(scan_input)
        dt_low = projected[..., :rank].astype(jnp.promote_types(projected.dtype, jnp.float32))
        b = projected[..., rank : rank + state]
        c = projected[..., rank + state :]
        delta = jax.nn.softplus(dt_low @ self.dt_proj_kernel + self.dt_bias)
        return scan_input, delta, b, c

    def _output(self, y: Array, scan_input: Array, gate: Array) -> Array:
        y = y + self.D.astype(y.dtype) * scan_input
        return self.out_proj(y * jax.nn.silu(gate))

    def _a(self) -> Array:
        return -jnp.exp(self.A_log)

    def _forward(self, x: Array, lengths: Array | None, return_state: bool):
        config = self.config
        conv_input, gate = self._inputs(x)
        conv_weight = self.conv_weight.astype(conv_input.dtype)
        if return_state:
            conv_out, conv_state = short_conv(
                conv_input, conv_weight, return_state=True, lengths=lengths
            )
        else:
            conv_out, conv_state = short_conv(conv_input, conv_weight), None
        scan_input, delta, b, c = self._selection(conv_out)
        mask = valid_mask(lengths, x.shape[1])
        if mask is not None:  # delta = 0 leaves the state untouched: padding never enters it
            delta = jnp.where(mask[..., None], delta, 0.0)
        result = selective_scan(
            scan_input,
            delta,
            self._a(),
            b,
            c,
            algorithm=config.scan_algorithm,
            chunk_size=config.chunk_size,
            return_state=return_state,
            implementation=self.context.implementation,
        )
        y, ssm_state = result if return_state else (result, None)
        out = self._output(y.astype(scan_input.dtype), scan_input, gate)
        return out, conv_state, ssm_state

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self._forward(x, None, return_state=False)[0]

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], MambaCache]:
        """Forward over a prompt; also returns the cache after it.

        ``lengths [B]``: valid tokens per row of right-padded prompts. Padding gets ``delta = 0``
        (the state is carried through unchanged) and the conv cache holds each row's last
        ``K - 1`` valid inputs, so the cache is that of the valid tokens alone.
        """
        del max_len  # the cache does not grow with the length
        out, conv_state, ssm_state = self._forward(x, lengths, return_state=True)
        return out, MambaCache(conv_state, ssm_state)

    def decode_step(
        self, x: Float[Array, "B D"], cache: MambaCache, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], MambaCache]:
        """One token per row; ``position`` is unused (no positional information)."""
        del position
        conv_input, gate = self._inputs(x)
        conv_out, conv_state = short_conv_step(
            conv_input, cache.conv_state, self.conv_weight.astype(conv_input.dtype)
        )
        scan_input, delta, b, c = self._selection(conv_out)
        y, ssm_state = selective_scan_step(scan_input, delta, self._a(), b, c, cache.ssm_state)
        return self._output(y.astype(scan_input.dtype), scan_input, gate), MambaCache(
            conv_state, ssm_state
        )

    def init_cache(self, batch_size: int, max_len: int) -> MambaCache:
        del max_len
        config, context = self.config, self.context
        inner = config.inner_dim(context.d_model)
        return MambaCache(
            init_short_conv_state(
                batch_size, config.conv_kernel_size, inner, context.compute_dtype
            ),
            jnp.zeros((batch_size, inner, config.state_dim), jnp.float32),
        )

    def flops(self, seq_len: int) -> float:
        """Projections and conv, plus the selective scan's state update and read: one
        multiply-add each per state entry (``4 * inner * N``)."""
        del seq_len
        config, d = self.config, self.context.d_model
        inner, rank, state = config.inner_dim(d), config.time_step_rank(d), config.state_dim
        projections = 2 * d * 2 * inner + 2 * inner * (rank + 2 * state) + 2 * rank * inner
        projections += 2 * inner * d
        return projections + 2 * config.conv_kernel_size * inner + 4 * inner * state
