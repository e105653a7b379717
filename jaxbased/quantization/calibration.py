"""Calibration of the static activation scales, and the whole recipe: float Mamba parameters
-> calibrated int8 parameters (docs/quantization.md#calibration).

The calibration model is the ``float`` arithmetic of :class:`QuantizedLanguageModel` (the float
model, with the Hadamard rotation folded when asked, so that ``out_proj``'s input is observed
after the rotation). Each batch of calibration sequences runs through it once; every layer's
activation points (:data:`~jaxbased.quantization.mamba.SCHEMES`) are reduced inside the
compiled forward to the observers' statistics, which the observers then accumulate on the host.
Every point gets a min-max scale; the SSM input also gets the percentile-EMA one, and
:class:`QuantizationSettings` says which of its two scales the int8 model uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jaxtyping import Int

from jaxbased.config import ModelConfig
from jaxbased.quantization.int8 import ARITHMETICS
from jaxbased.quantization.mamba import (
    CALIBRATION_COLLECTION,
    SCHEMES,
    QuantizedLanguageModel,
    check_quantizable,
    fold_hadamard,
    quantize_parameters,
    unrolled_config,
)
from jaxbased.quantization.observers import MinMaxObserver, PercentileObserver

#: Observers the SSM input (``ssm_input``) may use.
SSM_INPUT_OBSERVERS: tuple[str, ...] = ("percentile", "min_max")


@dataclasses.dataclass(frozen=True)
class QuantizationSettings:
    """How a model is quantized and run.

    Attributes:
      arithmetic: ``int8`` (integer matmuls), ``fake`` (quantize-dequantize in float32) or
        ``float`` (no quantization; with ``hadamard`` the float model with the rotation folded).
      hadamard: rotate ``out_proj``'s input by ``H / sqrt(E)`` and fold ``Hᵀ / sqrt(E)`` into
        its weight.
      ssm_input_observer: ``percentile`` (the EMA of the per-batch ``percentile`` quantile of
        ``|u|``) or ``min_max`` for the SSM input's scale; every other activation is min-max.
      percentile, momentum: the percentile observer's quantile and EMA rate.
    """

    arithmetic: str = "int8"
    hadamard: bool = True
    ssm_input_observer: str = "percentile"
    percentile: float = 0.99999
    momentum: float = 0.01

    def __post_init__(self) -> None:
        if self.arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic={self.arithmetic!r} is not known; allowed: {ARITHMETICS}")
        if self.ssm_input_observer not in SSM_INPUT_OBSERVERS:
            raise ValueError(
                f"ssm_input_observer={self.ssm_input_observer!r} is not known; allowed: "
                f"{SSM_INPUT_OBSERVERS}"
            )
        PercentileObserver(self.percentile, self.momentum)  # checks both

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QuantizationSettings:
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown quantization settings {unknown}; allowed: {allowed}")
        return cls(**values)

    def model(self, config: ModelConfig) -> QuantizedLanguageModel:
        """The quantized model of ``config`` (unrolled) with these settings."""
        return QuantizedLanguageModel(
            unrolled_config(config), arithmetic=self.arithmetic, hadamard=self.hadamard
        )


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """Scales from calibration.

    Attributes:
      min_max: ``{"layers_{i}": {point: scale}}`` for every activation point.
      percentile: ``{"layers_{i}": scale}``, the SSM input's percentile-EMA scale.
      num_sequences, num_batches: what was observed.
    """

    min_max: dict[str, dict[str, float]]
    percentile: dict[str, float]
    num_sequences: int
    num_batches: int

    def activation_scales(self, ssm_input_observer: str = "percentile") -> dict[str, dict]:
        """``{"layers_{i}": {point: scale}}`` with the SSM input's scale from
        ``ssm_input_observer`` (``percentile`` or ``min_max``)."""
        if ssm_input_observer not in SSM_INPUT_OBSERVERS:
            raise ValueError(
                f"ssm_input_observer={ssm_input_observer!r}; allowed: {SSM_INPUT_OBSERVERS}"
            )
        scales = {layer: dict(points) for layer, points in self.min_max.items()}
        if ssm_input_observer == "percentile":
            for layer, scale in self.percentile.items():
                scales[layer]["ssm_input"] = scale
        return scales

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def calibration_windows(tokens: Any, num_sequences: int, seq_len: int) -> Int[np.ndarray, "N T"]:
    """The first ``num_sequences`` consecutive, non-overlapping windows of ``seq_len`` tokens
    of a 1-D token array (NumPy or a TensorStore view), as int32 ``[N, seq_len]``; fewer when
    the array is shorter. ``ValueError`` when it holds less than one window."""
    available = int(tokens.shape[0]) // seq_len
    if available < 1:
        raise ValueError(
            f"calibration needs at least seq_len={seq_len} tokens; the data has {tokens.shape[0]}"
        )
    count = min(num_sequences, available)
    window = tokens[: count * seq_len]
    if hasattr(window, "read"):  # a TensorStore view
        window = window.read().result()
    return np.asarray(window, np.int32).reshape(count, seq_len)


def calibrate(
    config: ModelConfig,
    float_params: Any,
    sequences: Int[np.ndarray, "N T"],
    *,
    hadamard: bool = True,
    percentile: float = 0.99999,
    momentum: float = 0.01,
    batch_size: int = 1,
) -> CalibrationResult:
    """Observe ``sequences [N, T]`` (token ids) through the ``float`` quantized model.

    ``float_params``: parameters of that model (:func:`fold_hadamard` with the same
    ``hadamard``). Batches of ``batch_size`` sequences (the last may be shorter); one observer
    update per batch and point. Raises ``ValueError`` for an empty or non-2-D ``sequences``.
    """
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or sequences.shape[0] == 0 or sequences.shape[1] == 0:
        raise ValueError(
            f"calibration sequences must be [count >= 1, length >= 1]; got {sequences.shape}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    check_quantizable(config, hadamard)
    model = QuantizedLanguageModel(unrolled_config(config), arithmetic="float", hadamard=hadamard)
    min_max, tail = MinMaxObserver(), PercentileObserver(percentile, momentum)

    @jax.jit
    def statistics(params: Any, tokens: jax.Array) -> dict[str, dict[str, jax.Array]]:
        _, recorded = model.apply({"params": params}, tokens, mutable=[CALIBRATION_COLLECTION])
        result = {}
        for layer, values in recorded[CALIBRATION_COLLECTION].items():
            points = values["mixer"]
            result[layer] = {point: min_max.statistic(points[point][0]) for point in points}
            result[layer]["ssm_input_percentile"] = tail.statistic(points["ssm_input"][0])
        return result

    points_of = {
        f"layers_{index}": SCHEMES[name].activation_points
        for index, name in enumerate(config.layer_pattern)
    }
    observers: dict[str, dict[str, MinMaxObserver]] = {}
    percentiles: dict[str, PercentileObserver] = {}
    batches = 0
    for start in range(0, sequences.shape[0], batch_size):
        found = jax.device_get(statistics(float_params, sequences[start : start + batch_size]))
        batches += 1
        for layer, points in found.items():
            layer_observers = observers.setdefault(
                layer, {point: MinMaxObserver() for point in points_of[layer]}
            )
            for point in points_of[layer]:
                layer_observers[point].observe(points[point])
            percentiles.setdefault(layer, PercentileObserver(percentile, momentum)).observe(
                points["ssm_input_percentile"]
            )
    order = sorted(observers, key=lambda name: int(name.split("_")[1]))
    return CalibrationResult(
        min_max={
            layer: {point: observers[layer][point].scale() for point in points_of[layer]}
            for layer in order
        },
        percentile={layer: percentiles[layer].scale() for layer in order},
        num_sequences=int(sequences.shape[0]),
        num_batches=batches,
    )


def quantize_model(
    config: ModelConfig,
    params: Any,
    sequences: Int[np.ndarray, "N T"],
    settings: QuantizationSettings = QuantizationSettings(),
    *,
    batch_size: int = 1,
) -> tuple[QuantizedLanguageModel, dict[str, Any], CalibrationResult]:
    """The whole recipe for ``LanguageModel(config)``'s ``params``: fold the rotation,
    calibrate on ``sequences [N, T]``, quantize the weights.

    Returns the model of ``settings`` (unrolled), its parameters (float ones for
    ``arithmetic="float"``) and the calibration. Raises ``ValueError`` for a model that is not
    made of Mamba / Mamba-2 layers only.
    """
    check_quantizable(config, settings.hadamard)
    folded = fold_hadamard(config, params, settings.hadamard)
    calibration = calibrate(
        config,
        folded,
        sequences,
        hadamard=settings.hadamard,
        percentile=settings.percentile,
        momentum=settings.momentum,
        batch_size=batch_size,
    )
    if settings.arithmetic == "float":
        return settings.model(config), folded, calibration
    scales = calibration.activation_scales(settings.ssm_input_observer)
    quantized = quantize_parameters(unrolled_config(config), folded, scales)
    return settings.model(config), quantized, calibration
