"""Config of the ``seqboat_tiny`` model: a small SeqBoat LM (d 64,
4 layers, window 33, byte vocabulary) for CPU tests and demos; docs/mixers/seqboat.md."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("seqboat_tiny")
