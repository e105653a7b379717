"""Static 8-bit Mamba and Mamba-2 (Quamba, docs/quantization.md): the quantized mixers, the
language model built from them, and the conversion of a float model's parameters.

Mamba-2's quantized layer is :class:`QuantizedMamba2` (its docstring has its steps). One Mamba-1
layer, every tensor marked ``[q]`` rounded to int8 with one static per-tensor scale from
calibration (``q(v) = clip(round(v / s_v), -127, 127)``), weights ``W`` int8 with
``s_W = max|W| / 127``:

    xz = q(x) · q(W_in)                           x: the normed block input   [q] in_proj_input
    x, z = split(q(xz))                                                        [q] in_proj_output
    u = q(silu(conv(x; q(W_conv)) + conv_bias))                                [q] ssm_input
    dt_low, b, c = split(q(u · q(W_x)))                                        [q] x_proj_output
    delta = softplus(q(dt_low · q(W_dt)) + dt_bias)                            [q] dt_proj_output
    y = scan(u, delta, -exp(A_log), b, c) + D u            (float32 recurrence)
    y_H = q(y silu(z) · H / sqrt(E))                      (Hadamard rotation) [q] out_proj_input
    out = y_H · q(Hᵀ / sqrt(E) · W_out)                   (the rotation folded into out_proj)

``E`` is the inner width. Since ``(H / sqrt(E)) (Hᵀ / sqrt(E)) = I``, the rotation changes
nothing in float arithmetic; it spreads the outlier channels of ``y`` over all channels before
they are rounded. Embedding, head, norms, residual stream, biases, ``A_log`` and ``D`` stay
float32, and so does the scan's state. The decode cache keeps the conv inputs as int8 codes.

``arithmetic`` picks how the quantized tensors are multiplied (:mod:`jaxbased.quantization.int8`):
``int8`` (integer ``dot_general`` into int32, then one rescale), ``fake`` (the same codes in
float32: the check of ``int8``), or ``float`` (no quantization: float32 weights, activations
unrounded; with ``hadamard`` it is the float model with the rotation folded, and its forward
records the activations calibration observes, in the ``calibration`` collection).

``rounded_points`` (int8 and fake only) names the activation points that are rounded; the
others pass through unrounded and the matmul or conv after them runs in float32 with the
dequantized int8 weight. ``None`` (the default) rounds every point; a subset measures what
rounding each point costs (``benchmarks/quamba_ablation.py``'s sensitivity rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.layer_layout import convert_layout
from jaxbased.layers.common import make_norm, normal_init, rms_normalize, valid_mask
from jaxbased.layers.mamba import MambaCache, MambaConfig
from jaxbased.layers.mamba2 import Mamba2Cache, Mamba2Config
from jaxbased.layers.mixer import MixerContext
from jaxbased.layers.mlp import GatedMLP
from jaxbased.model import Block, LanguageModel, ModelCache
from jaxbased.ops.selective_scan import selective_scan, selective_scan_step
from jaxbased.ops.short_conv import short_conv
from jaxbased.ops.ssd import ssd, ssd_step
from jaxbased.quantization.hadamard import hadamard_matrix, rotate, supports_hadamard
from jaxbased.quantization.int8 import (
    ARITHMETICS,
    dequantize,
    quantize,
    quantized_matmul,
)
from jaxbased.quantization.observers import weight_scale


@dataclasses.dataclass(frozen=True)
class LayerScheme:
    """What the quantized form of one mixer holds.

    Attributes:
      activation_points: the activations with a static scale, in the order they occur.
      quantized_weights: the int8 weights (each with a ``{name}_scale``), shaped as the float
        mixer's.
      float_parameters: the parameters kept float32.
    """

    activation_points: tuple[str, ...]
    quantized_weights: tuple[str, ...]
    float_parameters: tuple[str, ...]


#: The quantized form of each mixer this module quantizes (docs/quantization.md).
SCHEMES: dict[str, LayerScheme] = {
    "mamba": LayerScheme(
        activation_points=(
            "in_proj_input",
            "in_proj_output",
            "ssm_input",
            "x_proj_output",
            "dt_proj_output",
            "out_proj_input",
        ),
        quantized_weights=(
            "in_proj_kernel",
            "conv_weight",
            "x_proj_kernel",
            "dt_proj_kernel",
            "out_proj_kernel",
        ),
        float_parameters=("conv_bias", "dt_bias", "A_log", "D"),
    ),
    "mamba2": LayerScheme(
        activation_points=(
            "in_proj_input",
            "in_proj_output",
            "ssm_input",
            "ssm_bc",
            "out_proj_input",
        ),
        quantized_weights=("in_proj_kernel", "conv_weight", "out_proj_kernel"),
        float_parameters=("conv_bias", "dt_bias", "A_log", "D", "norm_weight"),
    ),
}
#: Mixers this module quantizes.
SUPPORTED_MIXERS: tuple[str, ...] = tuple(SCHEMES)
#: Mamba-1's activation points, weights and float parameters (``SCHEMES["mamba"]``).
ACTIVATION_POINTS = SCHEMES["mamba"].activation_points
QUANTIZED_WEIGHTS = SCHEMES["mamba"].quantized_weights
FLOAT_PARAMETERS = SCHEMES["mamba"].float_parameters
#: The collection the ``float`` arithmetic records the observed activations in.
CALIBRATION_COLLECTION = "calibration"


def inner_width(config: ModelConfig, mixer: str) -> int:
    """The inner width ``E`` of ``mixer``'s layers in ``config`` (the rotation's width)."""
    return getattr(config, mixer).inner_dim(config.d_model)


def check_quantizable(config: ModelConfig, hadamard: bool = True) -> None:
    """``ValueError`` (one message, naming what is wrong and what is allowed) unless every layer
    of ``config`` is a Mamba or Mamba-2 mixer and, with ``hadamard``, their inner width has a
    Hadamard matrix."""
    others = sorted(set(config.layer_pattern) - set(SUPPORTED_MIXERS))
    if others:
        raise ValueError(
            f"quantization supports models whose every layer is one of {list(SUPPORTED_MIXERS)}; "
            f"this model's layer pattern also has {others}"
        )
    for mixer in sorted(set(config.layer_pattern)):
        inner = inner_width(config, mixer)
        if hadamard and not supports_hadamard(inner):
            raise ValueError(
                f"the Hadamard rotation needs an inner width of 2^k, 12·2^k, 20·2^k or 40·2^k; "
                f"this model's {mixer} layers have {inner} (expand "
                f"{getattr(config, mixer).expand} x d_model {config.d_model}): quantize without "
                "the rotation (hadamard=False)"
            )


def _check_arithmetic(arithmetic: str) -> None:
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic={arithmetic!r} is not known; allowed: {ARITHMETICS}")


def check_rounded_points(
    config: ModelConfig, arithmetic: str, rounded_points: tuple[str, ...] | None
) -> None:
    """``ValueError`` unless ``rounded_points`` is None or a tuple of activation points of
    ``config``'s mixers, under the ``int8`` or ``fake`` arithmetic."""
    if rounded_points is None:
        return
    if arithmetic == "float":
        raise ValueError(
            f"rounded_points={rounded_points!r} needs arithmetic 'int8' or 'fake' (the 'float' "
            "arithmetic rounds nothing)"
        )
    allowed = sorted({p for name in config.layer_pattern for p in SCHEMES[name].activation_points})
    unknown = sorted(set(rounded_points) - set(allowed))
    if not isinstance(rounded_points, tuple) or unknown:
        raise ValueError(
            f"rounded_points={rounded_points!r} must be a tuple of this model's activation "
            f"points {allowed}; unknown: {unknown}"
        )


class _QuantizedStateSpace(nn.Module):
    """What the quantized Mamba and Mamba-2 layers share: their parameters (int8 weights with
    scales, float32 rest, one scale per activation point; float32 weights and no scales under
    ``arithmetic="float"``), the quantization points, the quantized matmul and conv."""

    #: The key of :data:`SCHEMES` a subclass quantizes.
    mixer_name = ""

    @property
    def quantized(self) -> bool:
        return self.arithmetic != "float"

    def rounds(self, point: str) -> bool:
        """Whether activation ``point`` is rounded to int8 (never under ``float``)."""
        return self.quantized and (self.rounded_points is None or point in self.rounded_points)

    @property
    def scheme(self) -> LayerScheme:
        return SCHEMES[self.mixer_name]

    def _parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        # Abstract: QuantizedMamba and QuantizedMamba2 each give their parameter shapes; the
        # base class is never built on its own.
        raise NotImplementedError

    def setup(self) -> None:
        _check_arithmetic(self.arithmetic)
        shapes, scheme = self._parameter_shapes(), self.scheme
        kernel_dtype = jnp.int8 if self.quantized else jnp.float32
        self.weights = {
            name: self.param(name, lambda key, shape: jnp.zeros(shape, kernel_dtype), shapes[name])
            for name in scheme.quantized_weights
        }
        self.floats = {
            name: self.param(name, lambda key, shape: jnp.zeros(shape, jnp.float32), shapes[name])
            for name in scheme.float_parameters
        }
        names = (*scheme.quantized_weights, *scheme.activation_points)
        self.scales = {
            f"{name}_scale": self.param(f"{name}_scale", lambda key: jnp.ones((), jnp.float32))
            for name in (names if self.quantized else ())
        }

    # The quantization points ---------------------------------------------------------------
    def _observe(self, point: str, values: Array) -> tuple[Array | None, Array]:
        """``(int8 codes, float32 values on the int8 grid)`` of an activation; under the
        ``float`` arithmetic ``(None, values)``, recorded for calibration."""
        values = values.astype(jnp.float32)
        if not self.quantized:
            self.sow(CALIBRATION_COLLECTION, point, values)
            return None, values
        if not self.rounds(point):
            return None, values
        scale = self.scales[f"{point}_scale"]
        codes = quantize(values, scale)
        return codes, dequantize(codes, scale)

    def _linear(self, point: str, codes: Array | None, values: Array, weight: str) -> Array:
        """``values · W`` (contracting the last axis of ``values`` with the first of ``W``);
        float32 with the dequantized ``W`` when the input was not rounded (``codes`` None)."""
        kernel = self.weights[weight]
        kernel = kernel.reshape(kernel.shape[0], -1)
        if self.quantized and codes is None:
            kernel = dequantize(kernel, self.scales[f"{weight}_scale"])
        if codes is None:
            out = jnp.matmul(values, kernel, precision=jax.lax.Precision.HIGHEST)
        else:
            out = quantized_matmul(
                codes,
                self.scales[f"{point}_scale"],
                kernel,
                self.scales[f"{weight}_scale"],
                self.arithmetic,
            )
        return out.reshape(*values.shape[:-1], *self.weights[weight].shape[1:])

    def _conv(
        self,
        codes: Array | None,
        values: Array,
        conv_state: Array | None,
        lengths: Array | None,
    ) -> tuple[Array, Array]:
        """Causal depthwise conv of the conv inputs ``[B, T, E]`` after ``conv_state``
        (``[B, K - 1, E]``: int8 codes, or float32 when the inputs are not rounded; None:
        zeros); returns the float32 output and the new state."""
        weight = self.weights["conv_weight"]
        taps = weight.shape[0]
        if codes is None:  # float inputs (float arithmetic, or the conv input not rounded)
            if self.quantized:
                weight = dequantize(weight, self.scales["conv_weight_scale"])
            out, state = short_conv(
                values, weight, initial_state=conv_state, return_state=True, lengths=lengths
            )
            return out, state
        batch, seq, channels = codes.shape
        if conv_state is None:
            conv_state = jnp.zeros((batch, taps - 1, channels), jnp.int8)
        padded = jnp.concatenate([conv_state, codes], axis=1)
        if self.arithmetic == "int8":  # int8 products summed exactly in int32
            wide, kernel = padded.astype(jnp.int32), weight.astype(jnp.int32)
            accumulated = sum(kernel[j] * wide[:, j : j + seq] for j in range(taps))
            scale = self.scales["in_proj_output_scale"] * self.scales["conv_weight_scale"]
            out = accumulated.astype(jnp.float32) * scale
        else:
            wide = dequantize(padded, self.scales["in_proj_output_scale"])
            kernel = dequantize(weight, self.scales["conv_weight_scale"])
            out = sum(kernel[j] * wide[:, j : j + seq] for j in range(taps))
        if lengths is None:
            state = padded[:, seq:]
        else:  # row b's last K-1 valid inputs sit at padded[b, len .. len+K-2]
            index = jnp.asarray(lengths, jnp.int32)[:, None] + jnp.arange(taps - 1)
            state = jnp.take_along_axis(padded, index[:, :, None], axis=1)
        return out, state


class QuantizedMamba(_QuantizedStateSpace):
    """A Mamba-1 layer with int8 weights and activations (the module doc): ``[B, T, d] ->
    [B, T, d]`` float32, with ``prefill``, ``decode_step`` and ``init_cache`` as a mixer.

    Parameters (``E`` inner, ``R`` time-step rank, ``N`` state, ``K`` conv taps): int8 (float32
    under ``arithmetic="float"``) ``in_proj_kernel [d, 2, E]``, ``conv_weight [K, E]``,
    ``x_proj_kernel [E, R + 2N]``, ``dt_proj_kernel [R, E]``, ``out_proj_kernel [E, d]``
    (with the rotation folded in when ``hadamard``), each with a float32 scalar
    ``{name}_scale``; float32 ``conv_bias [E]``, ``dt_bias [E]``, ``A_log [E, N]``,
    ``D [E]``; a float32 scalar ``{point}_scale`` per activation point of
    ``SCHEMES["mamba"]``. The ``float`` arithmetic has no scales.
    """

    config: MambaConfig
    context: MixerContext
    arithmetic: str = "int8"
    hadamard: bool = True
    rounded_points: tuple[str, ...] | None = None
    mixer_name = "mamba"

    def _parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        config, d_model = self.config, self.context.d_model
        inner, rank = config.inner_dim(d_model), config.time_step_rank(d_model)
        state = config.state_dim
        return {
            "in_proj_kernel": (d_model, 2, inner),
            "conv_weight": (config.conv_kernel_size, inner),
            "x_proj_kernel": (inner, rank + 2 * state),
            "dt_proj_kernel": (rank, inner),
            "out_proj_kernel": (inner, d_model),
            "conv_bias": (inner,),
            "dt_bias": (inner,),
            "A_log": (inner, state),
            "D": (inner,),
        }

    def _run(
        self,
        x: Array,
        cache: MambaCache | None,
        lengths: Array | None,
        single_step: bool,
    ) -> tuple[Array, MambaCache]:
        """``x [B, T, d]`` (``T = 1`` for ``single_step``) -> (output ``[B, T, d]``, cache)."""
        config = self.config
        rank, state_dim = config.time_step_rank(self.context.d_model), config.state_dim
        codes, values = self._observe("in_proj_input", x)
        xz = self._linear("in_proj_input", codes, values, "in_proj_kernel")
        xz_codes, xz_values = self._observe("in_proj_output", xz)
        conv_codes = None if xz_codes is None else xz_codes[..., 0, :]
        gate = xz_values[..., 1, :]
        conv_out, conv_state = self._conv(
            conv_codes,
            xz_values[..., 0, :],
            None if cache is None else cache.conv_state,
            lengths,
        )
        u_codes, u = self._observe("ssm_input", jax.nn.silu(conv_out + self.floats["conv_bias"]))
        projected = self._linear("ssm_input", u_codes, u, "x_proj_kernel")
        projected_codes, projected = self._observe("x_proj_output", projected)
        dt_codes = None if projected_codes is None else projected_codes[..., :rank]
        dt = self._linear("x_proj_output", dt_codes, projected[..., :rank], "dt_proj_kernel")
        _, dt = self._observe("dt_proj_output", dt)
        delta = jax.nn.softplus(dt + self.floats["dt_bias"])
        b = projected[..., rank : rank + state_dim]
        c = projected[..., rank + state_dim :]
        a = -jnp.exp(self.floats["A_log"])
        if single_step:
            y, ssm_state = selective_scan_step(
                u[:, 0], delta[:, 0], a, b[:, 0], c[:, 0], cache.ssm_state
            )
            y = y[:, None]
        else:
            mask = valid_mask(lengths, x.shape[1])
            if mask is not None:  # delta = 0 leaves the state untouched: padding never enters
                delta = jnp.where(mask[..., None], delta, 0.0)
            y, ssm_state = selective_scan(
                u,
                delta,
                a,
                b,
                c,
                algorithm=config.scan_algorithm,
                chunk_size=config.chunk_size,
                return_state=True,
                implementation=self.context.implementation,
            )
        y = (y + self.floats["D"] * u) * jax.nn.silu(gate)
        if self.hadamard:
            y = rotate(y)
        y_codes, y = self._observe("out_proj_input", y)
        out = self._linear("out_proj_input", y_codes, y, "out_proj_kernel")
        return out, MambaCache(conv_state, ssm_state)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self._run(x, None, None, single_step=False)[0]

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], MambaCache]:
        """Forward over a prompt and the cache after it (padding never enters the cache)."""
        del max_len
        return self._run(x, None, lengths, single_step=False)

    def decode_step(
        self, x: Float[Array, "B D"], cache: MambaCache, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], MambaCache]:
        """One token per row (``position`` unused)."""
        del position
        out, cache = self._run(x[:, None], cache, None, single_step=True)
        return out[:, 0], cache

    def init_cache(self, batch_size: int, max_len: int) -> MambaCache:
        """Zeros: conv inputs ``[B, K - 1, E]`` (int8 codes; float32 when not rounded) and the
        float32 state ``[B, E, N]``. Works on an unbound module."""
        del max_len
        config = self.config
        inner = config.inner_dim(self.context.d_model)
        conv_dtype = jnp.int8 if self.rounds("in_proj_output") else jnp.float32
        return MambaCache(
            jnp.zeros((batch_size, config.conv_kernel_size - 1, inner), conv_dtype),
            jnp.zeros((batch_size, inner, config.state_dim), jnp.float32),
        )


class QuantizedMamba2(_QuantizedStateSpace):
    """A Mamba-2 (SSD) layer with int8 weights and activations: ``[B, T, d] -> [B, T, d]``.

    With ``C = E + 2 G N`` conv channels and ``H`` heads:

        p = q(q(x) · q(W_in))                   [q] in_proj_input, in_proj_output (one scale)
        z, xbc, dt = split(p)
        s = silu(conv(xbc; q(W_conv)) + conv_bias)
        u, (b, c) = q(s[:E]), q(s[E:])           [q] ssm_input, ssm_bc
        y = ssd(u, softplus(dt + dt_bias), -exp(A_log), b, c) + D u        (float32)
        y_H = q(rmsnorm_groups(y silu(z)) · w_norm · H / sqrt(E))          [q] out_proj_input
        out = y_H · q(Hᵀ / sqrt(E) · W_out)

    Parameters: int8 ``in_proj_kernel [d, E + C + H]``, ``conv_weight [K, C]``,
    ``out_proj_kernel [E, d]`` with their scales; float32 ``conv_bias [C]``, ``dt_bias [H]``,
    ``A_log [H]``, ``D [H]``, ``norm_weight [E]``; one scale per activation point of
    ``SCHEMES["mamba2"]``. The decode cache keeps the conv inputs as int8 codes.
    """

    config: Mamba2Config
    context: MixerContext
    arithmetic: str = "int8"
    hadamard: bool = True
    rounded_points: tuple[str, ...] | None = None
    mixer_name = "mamba2"

    def _parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        config, d_model = self.config, self.context.d_model
        inner, heads = config.inner_dim(d_model), config.heads(d_model)
        channels = config.conv_channels(d_model)
        return {
            "in_proj_kernel": (d_model, inner + channels + heads),
            "conv_weight": (config.conv_kernel_size, channels),
            "out_proj_kernel": (inner, d_model),
            "conv_bias": (channels,),
            "dt_bias": (heads,),
            "A_log": (heads,),
            "D": (heads,),
            "norm_weight": (inner,),
        }

    def _run(
        self,
        x: Array,
        cache: Mamba2Cache | None,
        lengths: Array | None,
        single_step: bool,
    ) -> tuple[Array, Mamba2Cache]:
        """``x [B, T, d]`` (``T = 1`` for ``single_step``) -> (output ``[B, T, d]``, cache)."""
        config, d_model = self.config, self.context.d_model
        inner, channels = config.inner_dim(d_model), config.conv_channels(d_model)
        heads, groups, state = config.heads(d_model), config.groups, config.state_dim
        codes, values = self._observe("in_proj_input", x)
        projected = self._linear("in_proj_input", codes, values, "in_proj_kernel")
        projected_codes, projected = self._observe("in_proj_output", projected)
        gate = projected[..., :inner]
        dt = projected[..., inner + channels :]
        conv_out, conv_state = self._conv(
            None if projected_codes is None else projected_codes[..., inner : inner + channels],
            projected[..., inner : inner + channels],
            None if cache is None else cache.conv_state,
            lengths,
        )
        activated = jax.nn.silu(conv_out + self.floats["conv_bias"])
        _, u = self._observe("ssm_input", activated[..., :inner])
        _, bc = self._observe("ssm_bc", activated[..., inner:])
        lead = u.shape[:-1]
        u = u.reshape(*lead, heads, config.head_dim)
        b = bc[..., : groups * state].reshape(*lead, groups, state)
        c = bc[..., groups * state :].reshape(*lead, groups, state)
        dt = jax.nn.softplus(dt + self.floats["dt_bias"])
        a = -jnp.exp(self.floats["A_log"])
        if single_step:
            y, ssm_state = ssd_step(u[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], cache.ssm_state)
            y = y[:, None]
        else:
            mask = valid_mask(lengths, x.shape[1])
            if mask is not None:  # dt = 0 leaves the state untouched: padding never enters
                dt = jnp.where(mask[..., None], dt, 0.0)
            y, ssm_state = ssd(
                u,
                dt,
                a,
                b,
                c,
                chunk_size=config.chunk_size,
                return_state=True,
                implementation=self.context.implementation,
            )
        y = y + self.floats["D"][:, None] * u
        gated = y.reshape(*lead, inner) * jax.nn.silu(gate)
        grouped = gated.reshape(*lead, groups, inner // groups)
        normed = rms_normalize(grouped, self.context.norm_eps).reshape(gated.shape)
        normed = normed * self.floats["norm_weight"]
        if self.hadamard:
            normed = rotate(normed)
        y_codes, normed = self._observe("out_proj_input", normed)
        out = self._linear("out_proj_input", y_codes, normed, "out_proj_kernel")
        return out, Mamba2Cache(conv_state, ssm_state)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self._run(x, None, None, single_step=False)[0]

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], Mamba2Cache]:
        """Forward over a prompt and the cache after it (padding never enters the cache)."""
        del max_len
        return self._run(x, None, lengths, single_step=False)

    def decode_step(
        self, x: Float[Array, "B D"], cache: Mamba2Cache, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], Mamba2Cache]:
        """One token per row (``position`` unused)."""
        del position
        out, cache = self._run(x[:, None], cache, None, single_step=True)
        return out[:, 0], cache

    def init_cache(self, batch_size: int, max_len: int) -> Mamba2Cache:
        """Zeros: conv inputs ``[B, K - 1, C]`` (int8 codes; float32 when not rounded) and the
        float32 state ``[B, H, P, N]``. Works on an unbound module."""
        del max_len
        config, d_model = self.config, self.context.d_model
        conv_dtype = jnp.int8 if self.rounds("in_proj_output") else jnp.float32
        return Mamba2Cache(
            jnp.zeros(
                (batch_size, config.conv_kernel_size - 1, config.conv_channels(d_model)),
                conv_dtype,
            ),
            jnp.zeros(
                (batch_size, config.heads(d_model), config.head_dim, config.state_dim),
                jnp.float32,
            ),
        )


#: The quantized module of each supported mixer.
QUANTIZED_MIXERS: dict[str, type[_QuantizedStateSpace]] = {
    "mamba": QuantizedMamba,
    "mamba2": QuantizedMamba2,
}


def quantized_mixer(
    config: ModelConfig, index: int, arithmetic: str, hadamard: bool, **kwargs: Any
) -> _QuantizedStateSpace:
    """The quantized module of layer ``index`` of ``config`` (``kwargs``: e.g. ``parent``,
    ``rounded_points``)."""
    name = config.layer_pattern[index]
    return QUANTIZED_MIXERS[name](
        getattr(config, name), config.layer_context(index), arithmetic, hadamard, **kwargs
    )


def mixer_rounded_points(
    config: ModelConfig, index: int, rounded_points: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """The points of ``rounded_points`` that layer ``index``'s mixer has (None stays None)."""
    if rounded_points is None:
        return None
    points = SCHEMES[config.layer_pattern[index]].activation_points
    return tuple(point for point in rounded_points if point in points)


class QuantizedBlock(Block):
    """:class:`jaxbased.model.Block` whose mixer is a :class:`QuantizedMamba` or
    :class:`QuantizedMamba2` (the norms and an MLP, if any, stay float)."""

    arithmetic: str = "int8"
    hadamard: bool = True
    rounded_points: tuple[str, ...] | None = None

    def setup(self) -> None:
        config = self.config
        self.norm1 = make_norm(config.norm, config.d_model, config.norm_eps, config.compute_dtype)
        self.mixer = quantized_mixer(
            config,
            self.layer_index,
            self.arithmetic,
            self.hadamard,
            rounded_points=mixer_rounded_points(config, self.layer_index, self.rounded_points),
        )
        if config.use_mlp:
            self.norm2 = make_norm(
                config.norm, config.d_model, config.norm_eps, config.compute_dtype
            )
            self.mlp = GatedMLP(config.mlp, config.mixer_context)


class QuantizedLanguageModel(LanguageModel):
    """:class:`jaxbased.model.LanguageModel` of quantized Mamba / Mamba-2 layers (unrolled):
    the same methods (``__call__``, ``prefill``, ``decode_step``, ``init_cache``), so that
    :func:`jaxbased.generation.generate` runs it as it is.

    ``rounded_points``: the activation points rounded to int8 (None: all; the module doc).
    Raises ``ValueError`` at setup for a model that :func:`check_quantizable` refuses, that
    scans its layers (quantized parameters are stored unrolled), or for ``rounded_points``
    that :func:`check_rounded_points` refuses.
    """

    arithmetic: str = "int8"
    hadamard: bool = True
    rounded_points: tuple[str, ...] | None = None

    def setup(self) -> None:
        config = self.config
        check_quantizable(config, self.hadamard)
        _check_arithmetic(self.arithmetic)
        check_rounded_points(config, self.arithmetic, self.rounded_points)
        if config.scan_layers:
            raise ValueError("a quantized model runs its layers unrolled: scan_layers=False")
        self.embedding = self.param(
            "embedding",
            normal_init(config.init_std, ("vocab", "embed")),
            (config.padded_vocab_size, config.d_model),
            jnp.float32,
        )
        self.layers = {
            str(index): QuantizedBlock(
                config,
                name,
                index,
                arithmetic=self.arithmetic,
                hadamard=self.hadamard,
                rounded_points=self.rounded_points,
            )
            for index, name in enumerate(config.layer_pattern)
        }
        residual_dtype = jnp.promote_types(config.compute_dtype, jnp.float32)
        self.final_norm = make_norm(config.norm, config.d_model, config.norm_eps, residual_dtype)

    def init_cache(self, batch_size: int, max_len: int) -> ModelCache:
        """An empty cache (position 0); works on an unbound module."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        config = self.config
        layers = tuple(
            quantized_mixer(
                config,
                index,
                self.arithmetic,
                self.hadamard,
                parent=None,
                rounded_points=mixer_rounded_points(config, index, self.rounded_points),
            ).init_cache(batch_size, max_len)
            for index in range(config.num_layers)
        )
        return ModelCache(layers=layers, positions=jnp.zeros((batch_size,), jnp.int32))


# Parameters ---------------------------------------------------------------------------------
def unrolled_config(config: ModelConfig) -> ModelConfig:
    """``config`` with ``scan_layers=False`` (the layout quantized models use)."""
    return config.replace(scan_layers=False) if config.scan_layers else config


def _float_weights(mixer_name: str, mixer: dict[str, Any]) -> dict[str, np.ndarray]:
    """A float mixer's weights under the quantized layer's names (float64)."""
    names = {"in_proj_kernel": ("in_proj", "kernel"), "conv_weight": ("conv_weight",)}
    if mixer_name == "mamba":
        names |= {"x_proj_kernel": ("x_proj", "kernel"), "dt_proj_kernel": ("dt_proj_kernel",)}
    names["out_proj_kernel"] = ("out_proj", "kernel")
    weights = {}
    for name, path in names.items():
        node = mixer
        for part in path:
            node = node[part]
        weights[name] = np.asarray(node, np.float64)
    return weights


def fold_hadamard(config: ModelConfig, params: Any, hadamard: bool = True) -> dict[str, Any]:
    """The float parameters of ``LanguageModel(config)`` as those of
    ``QuantizedLanguageModel(unrolled_config(config), arithmetic="float", hadamard=...)``:
    each mixer's projections renamed (``in_proj/kernel`` -> ``in_proj_kernel``, ...) and, with
    ``hadamard``, ``out_proj_kernel = (H / sqrt(E))ᵀ · W_out`` (computed in float64). Everything
    else is copied. Raises ``ValueError`` for a model :func:`check_quantizable` refuses.
    """
    check_quantizable(config, hadamard)
    unrolled = unrolled_config(config)
    params = convert_layout(nn.meta.unbox(params), unrolled)
    params = jax.tree.map(np.asarray, params)
    folded: dict[str, Any] = {}
    for key, value in params.items():
        if not key.startswith("layers_"):
            folded[key] = value
            continue
        mixer_name = config.layer_pattern[int(key.split("_")[1])]
        block = {name: part for name, part in value.items() if name != "mixer"}
        mixer = value["mixer"]
        weights = _float_weights(mixer_name, mixer)
        if hadamard:
            inner = inner_width(config, mixer_name)
            rotation = hadamard_matrix(inner).astype(np.float64) / np.sqrt(inner)
            weights["out_proj_kernel"] = rotation.T @ weights["out_proj_kernel"]
        block["mixer"] = {
            **{name: weight.astype(np.float32) for name, weight in weights.items()},
            **{
                name: np.asarray(mixer[name], np.float32)
                for name in SCHEMES[mixer_name].float_parameters
            },
        }
        folded[key] = block
    return folded


def quantize_parameters(
    config: ModelConfig,
    float_params: dict[str, Any],
    activation_scales: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """The int8 parameters of ``QuantizedLanguageModel(config, arithmetic="int8" or "fake")``
    from the ``float`` arithmetic's parameters (:func:`fold_hadamard`) and the activation
    scales of calibration (``{"layers_{i}": {point: scale}}``, one per activation point of the
    layer's :data:`SCHEMES` entry).

    Each quantized weight becomes ``quantize(W, max|W| / 127)`` with its scale beside it;
    everything else is kept.
    """
    quantized: dict[str, Any] = {}
    for key, value in float_params.items():
        if not key.startswith("layers_"):
            quantized[key] = value
            continue
        scheme = SCHEMES[config.layer_pattern[int(key.split("_")[1])]]
        mixer = dict(value["mixer"])
        for name in scheme.quantized_weights:
            scale = weight_scale(mixer[name])
            mixer[name] = np.asarray(quantize(mixer[name], scale))
            mixer[f"{name}_scale"] = np.float32(scale)
        layer_scales = activation_scales[key]
        missing = [point for point in scheme.activation_points if point not in layer_scales]
        if missing:
            raise ValueError(f"{key}: no calibrated scale for {missing}")
        for point in scheme.activation_points:
            mixer[f"{point}_scale"] = np.float32(layer_scales[point])
        quantized[key] = {**value, "mixer": mixer}
    return quantized


@dataclasses.dataclass(frozen=True)
class ParameterBytes:
    """Bytes of a parameter tree by dtype: ``total`` and ``{dtype name: bytes}``."""

    total: int
    by_dtype: dict[str, int]


def parameter_bytes(params: Any) -> ParameterBytes:
    """The bytes ``params`` take, by dtype."""
    by_dtype: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(nn.meta.unbox(params)):
        array = np.asarray(leaf)
        by_dtype[array.dtype.name] = by_dtype.get(array.dtype.name, 0) + array.nbytes
    return ParameterBytes(sum(by_dtype.values()), dict(sorted(by_dtype.items())))
