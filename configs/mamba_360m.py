"""Config of the ``mamba_360m`` Mamba baseline: 46 Mamba layers of d 1024 without MLP,
as the reference mamba-360m."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("mamba_360m")
