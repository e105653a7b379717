"""Observers of activations during calibration, and the symmetric int8 scales they give
(docs/quantization.md#calibration).

Every quantized tensor has one static float32 scale ``s`` (per tensor, symmetric, no zero point):
``q = clip(round(x / s), -127, 127)`` as int8, ``x ≈ q · s``. An observer sees the tensor on
each calibration batch and keeps one running number ``m`` from which ``s = m / 127``:

- :class:`MinMaxObserver`: ``m = max over batches of max |x|`` (nothing is clipped on the
  calibration data);
- :class:`PercentileObserver`: per batch the ``percentile`` quantile of ``|x|`` (0.99999 by
  default), accumulated as an exponential moving average ``m <- m + momentum · (q - m)``
  (momentum 0.01; the first batch sets ``m``). It clips the rare outliers of the SSM input,
  whose min-max scale would waste most int8 levels.

Each observer splits into ``statistic(values)`` (a jit-able ``jnp`` reduction of one batch's
tensor to a scalar) and ``observe(statistic)`` (the host-side running update), so that a
compiled calibration forward returns scalars only; ``update(values)`` does both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

#: The largest int8 code used: symmetric quantization leaves -128 out.
INT8_MAX = 127
#: The smallest scale an observer gives (an all-zero tensor would give 0).
MIN_SCALE = 1e-8


def scale_from_absmax(absmax: float | Float[Array, ""], bits: int = 8) -> Float[Array, ""]:
    """The symmetric scale ``max(absmax, tiny) / (2^(bits-1) - 1)`` (float32)."""
    levels = 2 ** (bits - 1) - 1
    return jnp.maximum(jnp.asarray(absmax, jnp.float32) / levels, MIN_SCALE)


class Observer(Protocol):
    """What calibration asks of an observer."""

    def statistic(self, values: Float[Array, "*shape"]) -> Float[Array, ""]: ...

    def observe(self, statistic: float) -> None: ...

    def scale(self) -> float: ...


@dataclasses.dataclass
class MinMaxObserver:
    """Symmetric min-max: the running maximum of ``|x|`` over every batch seen."""

    absmax: float | None = None

    def statistic(self, values: Float[Array, "*shape"]) -> Float[Array, ""]:
        """``max |values|`` (float32)."""
        return jnp.max(jnp.abs(jnp.asarray(values, jnp.float32)))

    def observe(self, statistic: float) -> None:
        value = float(statistic)
        self.absmax = value if self.absmax is None else max(self.absmax, value)

    def update(self, values: Float[Array, "*shape"]) -> None:
        self.observe(self.statistic(values))

    def scale(self) -> float:
        """``absmax / 127``; ValueError before any batch was observed."""
        if self.absmax is None:
            raise ValueError("the observer has seen no calibration batch")
        return float(scale_from_absmax(self.absmax))


@dataclasses.dataclass
class PercentileObserver:
    """The ``percentile`` quantile of ``|x|`` per batch, as an EMA over batches.

    Attributes:
      percentile: the quantile in ``(0, 1]`` (linear interpolation between order statistics,
        as ``numpy.quantile``'s default).
      momentum: EMA rate in ``(0, 1]``: ``m <- m + momentum · (q - m)``; the first batch sets
        ``m = q``.
    """

    percentile: float = 0.99999
    momentum: float = 0.01
    running: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.percentile <= 1:
            raise ValueError(f"percentile={self.percentile!r} must be in (0, 1]")
        if not 0 < self.momentum <= 1:
            raise ValueError(f"momentum={self.momentum!r} must be in (0, 1]")

    def statistic(self, values: Float[Array, "*shape"]) -> Float[Array, ""]:
        """The ``percentile`` quantile of ``|values|`` over all entries (float32)."""
        flat = jnp.sort(jnp.abs(jnp.asarray(values, jnp.float32)).reshape(-1))
        # The interpolation position in double precision on the host (the size is static):
        # float32 would misplace it by ~1e-4 of a rank at 0.99999, a large error in the tail.
        position = self.percentile * (flat.shape[0] - 1)
        lower = min(math.floor(position), flat.shape[0] - 1)
        upper = min(lower + 1, flat.shape[0] - 1)
        fraction = position - lower
        return flat[lower] + jnp.float32(fraction) * (flat[upper] - flat[lower])

    def observe(self, statistic: float) -> None:
        value = float(statistic)
        if self.running is None:
            self.running = value
        else:
            self.running += self.momentum * (value - self.running)

    def update(self, values: Float[Array, "*shape"]) -> None:
        self.observe(self.statistic(values))

    def scale(self) -> float:
        """``running / 127``; ValueError before any batch was observed."""
        if self.running is None:
            raise ValueError("the observer has seen no calibration batch")
        return float(scale_from_absmax(self.running))


def weight_scale(weight: Float[Array, "*shape"] | np.ndarray) -> float:
    """The per-tensor symmetric scale of a weight: ``max |w| / 127``."""
    return float(scale_from_absmax(np.max(np.abs(np.asarray(weight, np.float32)))))
