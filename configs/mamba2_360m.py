"""Config of the ``mamba2_360m`` Mamba-2 model: 48 Mamba-2 layers of d 1024 (d_state 128,
head dim 64), no MLP."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("mamba2_360m")
