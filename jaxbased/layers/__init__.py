"""Flax Linen modules that own parameters and call ``jaxbased.ops`` (docs/architecture.md,
layer 3).

Every mixer maps ``[B, T, d] -> [B, T, d]``, owns a config section (a ``MixerConfig``) and a
registered cache type, and implements :class:`~jaxbased.layers.mixer.Mixer`: ``prefill(x,
max_len, lengths)``, ``decode_step(x_t, cache, position)``, ``init_cache(batch_size, max_len)``,
``flops(seq_len)`` and ``state_size(seq_len)``. ``registry.MIXERS`` lists them.
"""

from jaxbased.layers.attention import AttentionConfig, SlidingWindowAttention, SlidingWindowConfig
from jaxbased.layers.base_conv import BaseConv, BaseConvConfig, ConvCache
from jaxbased.layers.based import BasedConfig, BasedLinearAttention
from jaxbased.layers.common import LayerNorm, Projection, RMSNorm
from jaxbased.layers.decay_attention import DecayAttentionConfig, DecayLinearAttention
from jaxbased.layers.mamba import Mamba, MambaCache, MambaConfig, StateSpaceConfig
from jaxbased.layers.mamba2 import Mamba2, Mamba2Cache, Mamba2Config
from jaxbased.layers.mixer import EmptyCache, Mixer, MixerConfig, MixerContext
from jaxbased.layers.mlp import GatedMLP, MLPConfig
from jaxbased.layers.mlp_mixer import MLPMixer
from jaxbased.layers.registry import MIXER_NAMES, MIXERS, MixerSpec, build_mixer, mixer_spec

__all__ = [
    "MIXERS",
    "MIXER_NAMES",
    "AttentionConfig",
    "BaseConv",
    "BaseConvConfig",
    "BasedConfig",
    "BasedLinearAttention",
    "ConvCache",
    "DecayAttentionConfig",
    "DecayLinearAttention",
    "EmptyCache",
    "GatedMLP",
    "LayerNorm",
    "MLPConfig",
    "MLPMixer",
    "Mamba",
    "Mamba2",
    "Mamba2Cache",
    "Mamba2Config",
    "MambaCache",
    "MambaConfig",
    "Mixer",
    "MixerConfig",
    "MixerContext",
    "MixerSpec",
    "Projection",
    "RMSNorm",
    "SlidingWindowAttention",
    "SlidingWindowConfig",
    "StateSpaceConfig",
    "build_mixer",
    "mixer_spec",
]
