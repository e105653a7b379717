"""Config of the ``based_1b`` model (docs/model.md: 36 layers, d 1792; hazyresearch/based-1b)."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("based_1b")
