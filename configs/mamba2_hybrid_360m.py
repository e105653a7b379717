"""Config of the ``mamba2_hybrid_360m`` Mamba-2-Hybrid: 48 layers of d 1024, 20 Mamba-2,
4 attention and 24 MLP layers."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("mamba2_hybrid_360m")
