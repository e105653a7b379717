"""Mamba (Mamba-1) mixer (SPEC.md §2, Gu & Dao 2023): a selective state-space block.

    x, z = split(in_proj(u))                                 (d -> 2 * inner, no bias)
    x = silu(conv1d(x) + conv_bias)                          (depthwise, causal, K taps)
    dt_low, b, c = split(x_proj(x))                          (inner -> R + 2N, no bias)
    delta = softplus(dt_low · dt_proj + dt_bias)             (R -> inner)
    h_t = exp(delta_t a) h_{t-1} + delta_t x_t b_t,  y_t = h_t c_t + D x_t,  a = -exp(A_log)
    out = out_proj(y * silu(z))                              (inner -> d, no bias)

``h`` is a diagonal state of ``N`` entries per inner channel. Initialisation as the reference
(mamba_ssm's ``Mamba``): ``A_log = log(1..N)`` per channel (S4D-real), ``D = 1``, ``dt_proj``
weight uniform in ``±R^-0.5``, ``dt_bias`` the inverse softplus of a log-uniform time step in
``[ssm_dt_min, ssm_dt_max]`` (floored at ``ssm_dt_init_floor``), the conv as PyTorch's default;
``in_proj``/``x_proj`` are normal(``init_std``) and ``out_proj`` normal(``output_init_std``), as
every projection of this library.

Decode cache: :class:`MambaCache`, the last ``K - 1`` raw conv inputs and the float32 SSM state
``[B, inner, N]``; neither grows with the sequence.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.layers.common import Projection
from jaxbased.ops.selective_scan import selective_scan, selective_scan_step
from jaxbased.ops.short_conv import init_short_conv_state, short_conv, short_conv_step


class MambaCache(NamedTuple):
    """Decoding state of one Mamba layer.

    conv_state: ``[B, K - 1, inner]``, the last raw conv inputs (activation dtype).
    ssm_state: ``[B, inner, N]`` float32, the selective-scan state ``h``.
    """

    conv_state: Float[Array, "B K1 C"]
    ssm_state: Float[Array, "B C N"]


def conv_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """PyTorch's default for a depthwise ``Conv1d`` weight ``[K, C]`` (fan_in = K):
    ``U(-1/sqrt(K), 1/sqrt(K))``."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


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


def valid_mask(lengths: Int[Array, " B"] | None, seq: int) -> Array | None:
    """``[B, T]`` bool, True at the valid positions ``t < lengths[b]`` (None: all valid)."""
    if lengths is None:
        return None
    return jnp.arange(seq) < jnp.asarray(lengths, jnp.int32)[:, None]


class Mamba(nn.Module):
    """Mamba-1 mixer: ``[B, T, d] -> [B, T, d]``.

    Parameters (``inner = ssm_expand * d``, ``R = mamba_time_step_rank``, ``N =
    mamba_state_dim``; PyTorch's ``[out, in]`` weights transposed):
    ``in_proj`` kernel ``[d, 2, inner]`` (x half, then z), ``conv_weight [K, inner]``,
    ``conv_bias [inner]``, ``x_proj`` kernel ``[inner, R + 2N]`` (dt, B, C),
    ``dt_proj_kernel [R, inner]`` and ``dt_bias [inner]`` (the reference's ``dt_proj``),
    ``A_log [inner, N]``, ``D [inner]``, ``out_proj`` kernel ``[inner, d]``. The ``inner``
    channels carry the logical axis ``conv_channels`` (split over ``tensor``).
    """

    config: ModelConfig

    def setup(self) -> None:
        config = self.config
        inner, rank, state = (
            config.ssm_inner_dim,
            config.mamba_time_step_rank,
            config.mamba_state_dim,
        )
        dtype = config.compute_dtype
        self.in_proj = Projection(
            (config.d_model,),
            (2, inner),
            ("embed", None, "conv_channels"),
            config.init_std,
            dtype,
        )
        self.conv_weight = self.param(
            "conv_weight",
            nn.with_logical_partitioning(conv_init, ("conv_kernel", "conv_channels")),
            (config.ssm_conv_kernel_size, inner),
            jnp.float32,
        )
        self.conv_bias = self.param(
            "conv_bias",
            nn.with_logical_partitioning(
                conv_bias_init(config.ssm_conv_kernel_size), ("conv_channels",)
            ),
            (inner,),
            jnp.float32,
        )
        self.x_proj = Projection(
            (inner,), (rank + 2 * state,), ("conv_channels", "feature"), config.init_std, dtype
        )
        self.dt_proj_kernel = self.param(
            "dt_proj_kernel",
            nn.with_logical_partitioning(
                symmetric_uniform_init(rank**-0.5),
                ("feature", "conv_channels"),
            ),
            (rank, inner),
            jnp.float32,
        )
        self.dt_bias = self.param(
            "dt_bias",
            nn.with_logical_partitioning(
                time_step_bias_init(config.ssm_dt_min, config.ssm_dt_max, config.ssm_dt_init_floor),
                ("conv_channels",),
            ),
            (inner,),
            jnp.float32,
        )
        self.A_log = self.param(
            "A_log",
            nn.with_logical_partitioning(s4d_real_log_init, ("conv_channels", "feature")),
            (inner, state),
            jnp.float32,
        )
        self.D = self.param(
            "D",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_channels",)),
            (inner,),
            jnp.float32,
        )
        self.out_proj = Projection(
            (inner,), (config.d_model,), ("conv_channels", "embed"), config.output_init_std, dtype
        )

    def _inputs(self, x: Array) -> tuple[Array, Array]:
        u = self.in_proj(x)
        return u[..., 0, :], u[..., 1, :]

    def _selection(self, conv_out: Array) -> tuple[Array, Array, Array, Array]:
        """Conv output -> (scan input ``silu(conv + bias)``, delta in float32 or wider, b, c)."""
        config = self.config
        rank, state = config.mamba_time_step_rank, config.mamba_state_dim
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
            algorithm=config.mamba_scan_algorithm,
            chunk_size=config.mamba_chunk_size,
            return_state=return_state,
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

    def decode(
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
        config = self.config
        return MambaCache(
            init_short_conv_state(
                batch_size,
                config.ssm_conv_kernel_size,
                config.ssm_inner_dim,
                config.compute_dtype,
            ),
            jnp.zeros((batch_size, config.ssm_inner_dim, config.mamba_state_dim), jnp.float32),
        )
