"""Mixer registry: the mixer module for each name a layer pattern may use."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

import flax.linen as nn

from jaxbased.config import MIXER_NAMES, ModelConfig
from jaxbased.layers.attention import SlidingWindowAttention
from jaxbased.layers.base_conv import BaseConv
from jaxbased.layers.based import BasedLinearAttention
from jaxbased.layers.decay_attention import DecayLinearAttention
from jaxbased.layers.mamba import Mamba
from jaxbased.layers.mamba2 import Mamba2
from jaxbased.layers.mlp_mixer import MLPMixer

MixerFactory = Callable[..., nn.Module]

MIXERS: MappingProxyType[str, MixerFactory] = MappingProxyType(
    {
        "base_conv": lambda config, **kwargs: BaseConv(config, **kwargs),
        "based": lambda config, **kwargs: BasedLinearAttention(config, **kwargs),
        "sliding_window": lambda config, **kwargs: SlidingWindowAttention(
            config, window=config.window, **kwargs
        ),
        "attention": lambda config, **kwargs: SlidingWindowAttention(config, window=None, **kwargs),
        "mamba": lambda config, **kwargs: Mamba(config, **kwargs),
        "mamba2": lambda config, **kwargs: Mamba2(config, **kwargs),
        "decay_attention": lambda config, **kwargs: DecayLinearAttention(config, **kwargs),
        "mlp": lambda config, **kwargs: MLPMixer(config, **kwargs),
    }
)
if set(MIXERS) != set(MIXER_NAMES):  # pragma: no cover - a developer error caught at import
    raise ImportError(f"MIXERS {sorted(MIXERS)} and config.MIXER_NAMES {MIXER_NAMES} differ")


def build_mixer(name: str, config: ModelConfig, **kwargs) -> nn.Module:
    """The mixer module registered under ``name`` (``kwargs`` go to the module, e.g. ``name``)."""
    if name not in MIXERS:
        raise ValueError(f"mixer {name!r} is not known; allowed: {sorted(MIXERS)}")
    return MIXERS[name](config, **kwargs)
