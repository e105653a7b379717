"""Config of the ``mamba2_hybrid_tiny`` model: a small Mamba-2-Hybrid (Mamba-2, attention
and MLP layers) for CPU tests and demos."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("mamba2_hybrid_tiny")
