"""Flax Linen modules that own parameters and call ``jaxbased.ops`` (DESIGN.md layer 3).

Every mixer maps ``[B, T, d] -> [B, T, d]`` and provides ``prefill(x, max_len)``,
``decode(x_t, cache, position)`` and ``init_cache(batch_size, max_len)``.
"""

from jaxbased.layers.attention import SlidingWindowAttention
from jaxbased.layers.base_conv import BaseConv
from jaxbased.layers.based import BasedLinearAttention
from jaxbased.layers.common import Projection, RMSNorm
from jaxbased.layers.decay_attention import DecayLinearAttention
from jaxbased.layers.mamba import Mamba, MambaCache
from jaxbased.layers.mamba2 import Mamba2, Mamba2Cache
from jaxbased.layers.mlp import GatedMLP
from jaxbased.layers.mlp_mixer import MLPMixer
from jaxbased.layers.registry import MIXERS, build_mixer

__all__ = [
    "MIXERS",
    "BaseConv",
    "BasedLinearAttention",
    "DecayLinearAttention",
    "GatedMLP",
    "MLPMixer",
    "Mamba",
    "Mamba2",
    "Mamba2Cache",
    "MambaCache",
    "Projection",
    "RMSNorm",
    "SlidingWindowAttention",
    "build_mixer",
]
