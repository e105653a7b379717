"""Config of the ``transnormer_tiny`` model: a small TransNormerLLM (d 64,
4 layers, byte vocabulary) for CPU tests and demos; docs/mixers/transnormer.md."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("transnormer_tiny")
