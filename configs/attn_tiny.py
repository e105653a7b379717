"""Config of the ``attn_tiny`` model: a small Transformer++ for CPU tests and demos."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("attn_tiny")
