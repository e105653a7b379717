"""Config of the ``attn_360m`` Transformer++ baseline (24 layers, d 1024, 16 heads)."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("attn_360m")
