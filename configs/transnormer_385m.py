"""Config of the ``transnormer_385m`` model: TransNormerLLM-385M's shapes
(d 1024, 24 layers, 8 heads, SGLU 2816, vocabulary 64000); docs/mixers/transnormer.md."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("transnormer_385m")
