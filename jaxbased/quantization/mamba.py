"""Static 8-bit Mamba (Quamba, docs/quantization.md): the quantized mixer, the language model
built from it, and the conversion of a float Mamba's parameters.

One layer, every tensor marked ``[q]`` rounded to int8 with one static per-tensor scale from
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
from jaxbased.layers.common import make_norm, normal_init, valid_mask
from jaxbased.layers.mamba import MambaCache, MambaConfig
from jaxbased.layers.mixer import MixerContext
from jaxbased.layers.mlp import GatedMLP
from jaxbased.model import Block, LanguageModel, ModelCache
from jaxbased.ops.selective_scan import selective_scan, selective_scan_step
from jaxbased.ops.short_conv import short_conv
from jaxbased.quantization.hadamard import hadamard_matrix, rotate, supports_hadamard
from jaxbased.quantization.int8 import (
    ARITHMETICS,
    dequantize,
    quantize,
    quantized_matmul,
)
from jaxbased.quantization.observers import weight_scale

#: Mixers this module quantizes.
SUPPORTED_MIXERS: tuple[str, ...] = ("mamba",)
#: The activations that get a static scale, in the order they occur in a layer.
ACTIVATION_POINTS: tuple[str, ...] = (
    "in_proj_input",
    "in_proj_output",
    "ssm_input",
    "x_proj_output",
    "dt_proj_output",
    "out_proj_input",
)
#: The int8 weights (each with a ``{name}_scale``): their shapes are those of the float Mamba.
QUANTIZED_WEIGHTS: tuple[str, ...] = (
    "in_proj_kernel",
    "conv_weight",
    "x_proj_kernel",
    "dt_proj_kernel",
    "out_proj_kernel",
)
#: The float32 parameters of a quantized layer.
FLOAT_PARAMETERS: tuple[str, ...] = ("conv_bias", "dt_bias", "A_log", "D")
#: The collection the ``float`` arithmetic records the observed activations in.
CALIBRATION_COLLECTION = "calibration"


def check_quantizable(config: ModelConfig, hadamard: bool = True) -> None:
    """``ValueError`` (one message, naming what is wrong and what is allowed) unless every layer
    of ``config`` is a Mamba mixer and, with ``hadamard``, its inner width has a Hadamard
    matrix."""
    others = sorted(set(config.layer_pattern) - set(SUPPORTED_MIXERS))
    if others:
        raise ValueError(
            f"quantization supports models whose every layer is one of {list(SUPPORTED_MIXERS)}; "
            f"this model's layer pattern also has {others}"
        )
    inner = config.mamba.inner_dim(config.d_model)
    if hadamard and not supports_hadamard(inner):
        raise ValueError(
            f"the Hadamard rotation needs an inner width of 2^k, 12·2^k, 20·2^k or 40·2^k; "
            f"this model's is {inner} (expand {config.mamba.expand} x d_model "
            f"{config.d_model}): quantize without the rotation (hadamard=False)"
        )


def _check_arithmetic(arithmetic: str) -> None:
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic={arithmetic!r} is not known; allowed: {ARITHMETICS}")


class QuantizedMamba(nn.Module):
    """A Mamba-1 layer with int8 weights and activations (the module doc): ``[B, T, d] ->
    [B, T, d]`` float32, with ``prefill``, ``decode_step`` and ``init_cache`` as a mixer.

    Parameters (``E`` inner, ``R`` time-step rank, ``N`` state, ``K`` conv taps): int8 (float32
    under ``arithmetic="float"``) ``in_proj_kernel [d, 2, E]``, ``conv_weight [K, E]``,
    ``x_proj_kernel [E, R + 2N]``, ``dt_proj_kernel [R, E]``, ``out_proj_kernel [E, d]``
    (with the rotation folded in when ``hadamard``), each with a float32 scalar
    ``{name}_scale``; float32 ``conv_bias [E]``, ``dt_bias [E]``, ``A_log [E, N]``,
    ``D [E]``; a float32 scalar ``{point}_scale`` per entry of :data:`ACTIVATION_POINTS`. The
    ``float`` arithmetic has no scales.
    """

    config: MambaConfig
    context: MixerContext
    arithmetic: str = "int8"
    hadamard: bool = True

    @property
    def quantized(self) -> bool:
        return self.arithmetic != "float"

    def setup(self) -> None:
        _check_arithmetic(self.arithmetic)
        config, d_model = self.config, self.context.d_model
        inner, rank = config.inner_dim(d_model), config.time_step_rank(d_model)
        state = config.state_dim
        shapes = {
            "in_proj_kernel": (d_model, 2, inner),
            "conv_weight": (config.conv_kernel_size, inner),
            "x_proj_kernel": (inner, rank + 2 * state),
            "dt_proj_kernel": (rank, inner),
            "out_proj_kernel": (inner, d_model),
        }
        kernel_dtype = jnp.int8 if self.quantized else jnp.float32
        self.weights = {
            name: self.param(name, lambda key, shape: jnp.zeros(shape, kernel_dtype), shape)
            for name, shape in shapes.items()
        }
        float_shapes = {
            "conv_bias": (inner,),
            "dt_bias": (inner,),
            "A_log": (inner, state),
            "D": (inner,),
        }
        self.floats = {
            name: self.param(name, lambda key, shape: jnp.zeros(shape, jnp.float32), shape)
            for name, shape in float_shapes.items()
        }
        scale_names = [f"{name}_scale" for name in (*QUANTIZED_WEIGHTS, *ACTIVATION_POINTS)]
        self.scales = {
            name: self.param(name, lambda key: jnp.ones((), jnp.float32))
            for name in (scale_names if self.quantized else ())
        }

    # The quantization points ---------------------------------------------------------------
    def _observe(self, point: str, values: Array) -> tuple[Array | None, Array]:
        """``(int8 codes, float32 values on the int8 grid)`` of an activation; under the
        ``float`` arithmetic ``(None, values)``, recorded for calibration."""
        values = values.astype(jnp.float32)
        if not self.quantized:
            self.sow(CALIBRATION_COLLECTION, point, values)
            return None, values
        scale = self.scales[f"{point}_scale"]
        codes = quantize(values, scale)
        return codes, dequantize(codes, scale)

    def _linear(self, point: str, codes: Array | None, values: Array, weight: str) -> Array:
        """``values · W`` (contracting the last axis of ``values`` with the first of ``W``)."""
        kernel = self.weights[weight]
        kernel = kernel.reshape(kernel.shape[0], -1)
        if not self.quantized:
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
        (``[B, K - 1, E]``: int8 codes, or float32 under ``float``; None: zeros); returns the
        float32 output and the new state."""
        weight = self.weights["conv_weight"]
        taps = weight.shape[0]
        if not self.quantized:
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

    # The layer -------------------------------------------------------------------------------
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
        """Zeros: conv inputs ``[B, K - 1, E]`` (int8 codes; float32 under ``float``) and the
        float32 state ``[B, E, N]``. Works on an unbound module."""
        del max_len
        config = self.config
        inner = config.inner_dim(self.context.d_model)
        conv_dtype = jnp.int8 if self.quantized else jnp.float32
        return MambaCache(
            jnp.zeros((batch_size, config.conv_kernel_size - 1, inner), conv_dtype),
            jnp.zeros((batch_size, inner, config.state_dim), jnp.float32),
        )


class QuantizedBlock(Block):
    """:class:`jaxbased.model.Block` whose mixer is a :class:`QuantizedMamba` (the norms and
    an MLP, if any, stay float)."""

    arithmetic: str = "int8"
    hadamard: bool = True

    def setup(self) -> None:
        config = self.config
        self.norm1 = make_norm(config.norm, config.d_model, config.norm_eps, config.compute_dtype)
        self.mixer = QuantizedMamba(
            config.mamba, config.layer_context(self.layer_index), self.arithmetic, self.hadamard
        )
        if config.use_mlp:
            self.norm2 = make_norm(
                config.norm, config.d_model, config.norm_eps, config.compute_dtype
            )
            self.mlp = GatedMLP(config.mlp, config.mixer_context)


class QuantizedLanguageModel(LanguageModel):
    """:class:`jaxbased.model.LanguageModel` of :class:`QuantizedMamba` layers (unrolled):
    the same methods (``__call__``, ``prefill``, ``decode_step``, ``init_cache``), so that
    :func:`jaxbased.generation.generate` runs it as it is.

    Raises ``ValueError`` at setup for a model that :func:`check_quantizable` refuses or that
    scans its layers (quantized parameters are stored unrolled).
    """

    arithmetic: str = "int8"
    hadamard: bool = True

    def setup(self) -> None:
        config = self.config
        check_quantizable(config, self.hadamard)
        _check_arithmetic(self.arithmetic)
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
                config, name, index, arithmetic=self.arithmetic, hadamard=self.hadamard
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
            QuantizedMamba(
                config.mamba,
                config.layer_context(index),
                self.arithmetic,
                self.hadamard,
                parent=None,
            ).init_cache(batch_size, max_len)
            for index in range(config.num_layers)
        )
        return ModelCache(layers=layers, positions=jnp.zeros((batch_size,), jnp.int32))


# Parameters ---------------------------------------------------------------------------------
def unrolled_config(config: ModelConfig) -> ModelConfig:
    """``config`` with ``scan_layers=False`` (the layout quantized models use)."""
    return config.replace(scan_layers=False) if config.scan_layers else config


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
    inner = config.mamba.inner_dim(config.d_model)
    rotation = hadamard_matrix(inner).astype(np.float64) / np.sqrt(inner) if hadamard else None
    folded: dict[str, Any] = {}
    for key, value in params.items():
        if not key.startswith("layers_"):
            folded[key] = value
            continue
        block = {name: part for name, part in value.items() if name != "mixer"}
        mixer = value["mixer"]
        out_proj = np.asarray(mixer["out_proj"]["kernel"], np.float64)
        if rotation is not None:
            out_proj = rotation.T @ out_proj
        block["mixer"] = {
            "in_proj_kernel": np.asarray(mixer["in_proj"]["kernel"], np.float32),
            "conv_weight": np.asarray(mixer["conv_weight"], np.float32),
            "x_proj_kernel": np.asarray(mixer["x_proj"]["kernel"], np.float32),
            "dt_proj_kernel": np.asarray(mixer["dt_proj_kernel"], np.float32),
            "out_proj_kernel": out_proj.astype(np.float32),
            **{name: np.asarray(mixer[name], np.float32) for name in FLOAT_PARAMETERS},
        }
        folded[key] = block
    return folded


def quantize_parameters(
    float_params: dict[str, Any], activation_scales: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """The int8 parameters of ``QuantizedLanguageModel(arithmetic="int8" or "fake")`` from the
    ``float`` arithmetic's parameters (:func:`fold_hadamard`) and the activation scales of
    calibration (``{"layers_{i}": {point: scale}}``, one per :data:`ACTIVATION_POINTS`).

    Each weight of :data:`QUANTIZED_WEIGHTS` becomes ``quantize(W, max|W| / 127)`` with its
    scale beside it; everything else is kept.
    """
    quantized: dict[str, Any] = {}
    for key, value in float_params.items():
        if not key.startswith("layers_"):
            quantized[key] = value
            continue
        mixer = dict(value["mixer"])
        for name in QUANTIZED_WEIGHTS:
            scale = weight_scale(mixer[name])
            mixer[name] = np.asarray(quantize(mixer[name], scale))
            mixer[f"{name}_scale"] = np.float32(scale)
        layer_scales = activation_scales[key]
        missing = [point for point in ACTIVATION_POINTS if point not in layer_scales]
        if missing:
            raise ValueError(f"{key}: no calibrated scale for {missing}")
        for point in ACTIVATION_POINTS:
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
