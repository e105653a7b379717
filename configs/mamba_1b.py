"""Config of the ``mamba_1b`` Mamba baseline: 46 Mamba layers of d 2048 without MLP, as the
reference mamba-1b."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("mamba_1b")
