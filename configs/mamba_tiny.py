"""Config of the ``mamba_tiny`` model: a small Mamba for CPU tests and demos."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("mamba_tiny")
