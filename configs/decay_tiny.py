"""Config of the ``decay_tiny`` model: a small decay-linear-attention (RetNet-style) LM for
CPU tests and demos."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("decay_tiny")
