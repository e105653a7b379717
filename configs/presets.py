"""Shared helper of the config files: an ml_collections config from a model preset.

Each ``configs/<preset>.py`` is read with absl ``config_flags``; any field can be overridden on the
command line, e.g. ``--config=configs/based_360m.py --config.model.d_model=512``.
"""

from __future__ import annotations

import ml_collections

from jaxbased.config import ModelConfig


def preset_config(preset: str) -> ml_collections.ConfigDict:
    """``ConfigDict(model=<every ModelConfig field of the preset>, preset=<name>)``."""
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.model = ml_collections.ConfigDict(ModelConfig.from_preset(preset).to_dict())
    return config
