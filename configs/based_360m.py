"""Config of the ``based_360m`` model (SPEC.md §1: 27 layers, d 1024; hazyresearch/based-360m)."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("based_360m")
