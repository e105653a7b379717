"""Config of the ``seqboat_enwik8`` model: SeqBoat's enwik8 LM shapes
(14 layers, d 616, z 128, h 1232, N 16, window 1025); docs/mixers/seqboat.md."""

import ml_collections

from jaxbased.training.configs import preset_config


def get_config() -> ml_collections.ConfigDict:
    return preset_config("seqboat_enwik8")
