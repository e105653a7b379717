"""The mixer registry: the only list of mixers.

Each :class:`MixerSpec` names a mixer as layer patterns spell it, its Linen module, its config
class (``ModelConfig`` gets one section of that class, under the same name) and its cache type.
The model, ``ModelConfig``, the FLOP counter, the memory planner and the MQAR state sizes and
plots all read this table; adding a mixer is one module and one line here
(docs/adding_a_mixer.md).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import flax.linen as nn

from jaxbased.layers.attention import AttentionConfig, SlidingWindowAttention, SlidingWindowConfig
from jaxbased.layers.base_conv import BaseConv, BaseConvConfig, ConvCache
from jaxbased.layers.based import BasedConfig, BasedLinearAttention
from jaxbased.layers.cca_attention import CCAAttention, CCAAttentionConfig, CCACache
from jaxbased.layers.decay_attention import DecayAttentionConfig, DecayLinearAttention
from jaxbased.layers.mamba import Mamba, MambaCache, MambaConfig
from jaxbased.layers.mamba2 import Mamba2, Mamba2Cache, Mamba2Config
from jaxbased.layers.mixer import EmptyCache, Mixer, MixerConfig, MixerContext
from jaxbased.layers.mlp import MLPConfig
from jaxbased.layers.mlp_mixer import MLPMixer
from jaxbased.layers.seqboat import SeqBoat, SeqBoatCache, SeqBoatConfig
from jaxbased.layers.transnormer import TransNormerAttention, TransNormerConfig
from jaxbased.ops.linear_attention import LinearAttentionState
from jaxbased.ops.window_attention import KVCache


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """One registered mixer.

    Attributes:
      name: the name in layer patterns, and of its ``ModelConfig`` section.
      module: the Linen module, built as ``module(config=section, context=context)``.
      config_type: the :class:`~jaxbased.layers.mixer.MixerConfig` subclass of its section.
      cache_type: the pytree type its ``prefill``/``decode_step``/``init_cache`` return.
      label: a short human name (figures, tables).
    """

    name: str
    module: type[nn.Module]
    config_type: type[MixerConfig]
    cache_type: type
    label: str


MIXERS: MappingProxyType[str, MixerSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            MixerSpec("base_conv", BaseConv, BaseConvConfig, ConvCache, "BaseConv"),
            MixerSpec("based", BasedLinearAttention, BasedConfig, LinearAttentionState, "BASED"),
            MixerSpec(
                "sliding_window", SlidingWindowAttention, SlidingWindowConfig, KVCache, "window"
            ),
            MixerSpec("attention", SlidingWindowAttention, AttentionConfig, KVCache, "attention"),
            MixerSpec("mamba", Mamba, MambaConfig, MambaCache, "Mamba"),
            MixerSpec("mamba2", Mamba2, Mamba2Config, Mamba2Cache, "Mamba-2"),
            MixerSpec(
                "decay_attention",
                DecayLinearAttention,
                DecayAttentionConfig,
                LinearAttentionState,
                "decay attention",
            ),
            MixerSpec("mlp", MLPMixer, MLPConfig, EmptyCache, "MLP"),
            MixerSpec("cca_attention", CCAAttention, CCAAttentionConfig, CCACache, "CCA"),
            MixerSpec(
                "transnormer",
                TransNormerAttention,
                TransNormerConfig,
                LinearAttentionState,
                "TransNormerLLM",
            ),
            MixerSpec("seqboat", SeqBoat, SeqBoatConfig, SeqBoatCache, "SeqBoat"),
        )
    }
)

#: Mixer names a layer pattern may use, in registry order.
MIXER_NAMES: tuple[str, ...] = tuple(MIXERS)


def mixer_spec(name: str) -> MixerSpec:
    """The registered spec of ``name``; ``ValueError`` naming the allowed names otherwise."""
    if name not in MIXERS:
        raise ValueError(f"mixer {name!r} is not known; allowed: {MIXER_NAMES}")
    return MIXERS[name]


def build_mixer(name: str, config: MixerConfig, context: MixerContext, **kwargs: Any) -> Mixer:
    """The module of mixer ``name`` for its config section and the model context (``kwargs`` go
    to the module, e.g. ``name`` or ``parent=None`` for an unbound module)."""
    spec = mixer_spec(name)
    if not isinstance(config, spec.config_type):
        raise TypeError(
            f"mixer {name!r} takes a {spec.config_type.__name__}; got {type(config).__name__}"
        )
    return spec.module(config=config, context=context, **kwargs)
