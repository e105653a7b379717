"""Config of the ``based_tiny`` model: a small BASED for CPU tests and demos."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("based_tiny")
