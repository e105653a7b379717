"""Config of the ``based_360m`` model (docs/model.md: 27 layers, d 1024; based-360m)."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("based_360m")
