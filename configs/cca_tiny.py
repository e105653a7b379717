"""Config of the ``cca_tiny`` model: ``attn_tiny`` with CCA-Attention layers (groups of 8,
local window 32) for CPU tests and demos; an ``attn_tiny`` workdir's parameters load into it."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("cca_tiny")
