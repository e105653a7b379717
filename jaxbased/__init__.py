"""jaxbased: BASED and related sub-quadratic language models in JAX/Flax.

import jaxbased
config = jaxbased.ModelConfig.from_preset("based_tiny")
model = jaxbased.LanguageModel(config)
"""

from jaxbased import ops
from jaxbased.config import (
    MIXER_NAMES,
    ModelConfig,
    based_layer_pattern,
    hybrid_layer_pattern,
)
from jaxbased.generation import GenerationResult, RecycledAttentionPolicy, generate
from jaxbased.model import LanguageModel, ModelCache, count_parameters
from jaxbased.presets import PRESETS

__version__ = "0.1.0"

__all__ = [
    "MIXER_NAMES",
    "PRESETS",
    "GenerationResult",
    "LanguageModel",
    "ModelCache",
    "ModelConfig",
    "RecycledAttentionPolicy",
    "based_layer_pattern",
    "count_parameters",
    "generate",
    "hybrid_layer_pattern",
    "ops",
]
