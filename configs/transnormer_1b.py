"""Config of the ``transnormer_1b`` model: TransNormerLLM-1B's shapes
(d 2048, 16 layers, 16 heads, SGLU 5632, vocabulary 64000); docs/mixers/transnormer.md."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("transnormer_1b")
