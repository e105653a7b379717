import importlib

import pytest

from jaxbased import PRESETS, ModelConfig, based_layer_pattern


def test_released_layer_patterns():
    config = ModelConfig.from_preset("based_360m")
    linear = [i for i, name in enumerate(config.layer_pattern) if name == "based"]
    window = [i for i, name in enumerate(config.layer_pattern) if name == "sliding_window"]
    assert linear == [1, 6, 11, 16, 21] and window == [2, 7, 12, 17, 22]
    assert config.layer_pattern.count("base_conv") == 17
    big = ModelConfig.from_preset("based_1b")
    assert big.layer_pattern.count("base_conv") == 22 and big.num_layers == 36
    assert config.padded_vocab_size == 50264 and config.window == 129
    assert config.expanded_feature_dim == 273 and config.linear_attention_value_dim == 64
    assert ModelConfig.from_preset("attn_360m").mlp_hidden_dim == 2816
    assert ModelConfig.from_preset("attn_1b").rotary_dim == 35


def test_sliding_window_wins_over_linear_attention_when_listed_twice():
    assert based_layer_pattern(3, (0, 1), (1,)) == ("based", "sliding_window", "base_conv")
    with pytest.raises(ValueError, match=r"linear_attention_layers has layers \[5\]"):
        based_layer_pattern(3, (5,), ())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 100}, "d_model=100 must be divisible by linear_attention_heads=16"),
        ({"attention_heads": 7}, "d_model=1024 must be divisible by attention_heads=7"),
        ({"layer_pattern": ("based", "mamba9") + ("base_conv",) * 25}, "unknown mixer names"),
        ({"window": 0}, "window=0 must be an integer >= 1"),
        ({"feature_dim": 0}, "feature_dim=0 must be an integer >= 1"),
        ({"num_layers": 26}, "layer_pattern has 27 entries but num_layers=26"),
        ({"feature_map": "cos"}, "feature_map='cos'"),
        ({"dtype": "float16"}, "dtype='float16'"),
        ({"conv_expand": 3}, "conv_expand=3 must be even"),
        ({"rotary_fraction": 1.5}, "rotary_fraction=1.5"),
        ({"d_model": 64.0}, "d_model=64.0 must be an integer"),
        ({"layer_pattern": "based"}, "layer_pattern='based' must be a sequence"),
        ({"norm": "batchnorm"}, "norm='batchnorm' is not known; allowed:"),
        ({"use_mlp": 0}, "use_mlp=0 must be True or False"),
    ],
)
def test_invalid_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        ModelConfig.from_preset("based_360m", **overrides)


def test_unknown_fields_and_presets_are_rejected():
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['heads'\]"):
        ModelConfig.from_dict({"heads": 3})
    with pytest.raises(ValueError, match="preset='based_7b'"):
        ModelConfig.from_preset("based_7b")


def test_config_is_frozen_and_replace_validates():
    config = ModelConfig.from_preset("based_tiny")
    with pytest.raises(AttributeError):
        config.d_model = 3  # type: ignore[misc]
    assert config.replace(window=8).window == 8
    with pytest.raises(ValueError, match="window=-1"):
        config.replace(window=-1)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_files_match_the_presets(preset):
    module = importlib.import_module(f"configs.{preset}")
    config = module.get_config()
    assert ModelConfig.from_dict(config.model) == ModelConfig.from_preset(preset)
    config.model.window = 64  # as --config.model.window=64 would
    assert ModelConfig.from_dict(config.model).window == 64
