"""Config of the ``attn_1b`` Transformer++ baseline (36 layers, d 1680, 24 heads)."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("attn_1b")
