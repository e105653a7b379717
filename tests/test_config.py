import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from jaxbased import PRESETS, ModelConfig, based_layer_pattern
from jaxbased.config_files import sibling_get_config
from jaxbased.layers import MIXERS, BasedConfig, MixerConfig


def test_released_layer_patterns():
    config = ModelConfig.from_preset("based_360m")
    linear = [i for i, name in enumerate(config.layer_pattern) if name == "based"]
    window = [i for i, name in enumerate(config.layer_pattern) if name == "sliding_window"]
    assert linear == [1, 6, 11, 16, 21] and window == [2, 7, 12, 17, 22]
    assert config.layer_pattern.count("base_conv") == 17
    big = ModelConfig.from_preset("based_1b")
    assert big.layer_pattern.count("base_conv") == 22 and big.num_layers == 36
    assert config.padded_vocab_size == 50264 and config.sliding_window.window == 129
    assert config.based.expanded_dim == 273 and config.based.value_dim(config.d_model) == 64
    assert ModelConfig.from_preset("attn_360m").mlp_hidden_dim == 2816
    attn_1b = ModelConfig.from_preset("attn_1b")
    assert attn_1b.attention.rotary_dim(attn_1b.d_model) == 35


def test_every_registered_mixer_has_a_section_of_its_config_type():
    config = ModelConfig()
    for name, spec in MIXERS.items():
        section = getattr(config, name)
        assert type(section) is spec.config_type and isinstance(section, MixerConfig)
        assert section == spec.config_type()
    section_names = [field.name for field in dataclasses.fields(ModelConfig)][-len(MIXERS) :]
    assert section_names == list(MIXERS)


def test_sliding_window_wins_over_linear_attention_when_listed_twice():
    assert based_layer_pattern(3, (0, 1), (1,)) == ("based", "sliding_window", "base_conv")
    with pytest.raises(ValueError, match=r"linear_attention_layers has layers \[5\]"):
        based_layer_pattern(3, (5,), ())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 100}, "based.heads=16 must divide d_model=100"),
        ({"sliding_window": {"heads": 7}}, "sliding_window.heads=7 must divide d_model=1024"),
        ({"layer_pattern": ("based", "mamba9") + ("base_conv",) * 25}, "unknown mixer names"),
        ({"sliding_window": {"window": 0}}, "sliding_window.window=0 must be an integer >= 1"),
        ({"based": {"feature_dim": 0}}, "based.feature_dim=0 must be an integer >= 1"),
        ({"num_layers": 26}, "layer_pattern has 27 entries but num_layers=26"),
        ({"based": {"feature_map": "cos"}}, "based.feature_map='cos' is not known"),
        ({"dtype": "float16"}, "dtype='float16'"),
        ({"base_conv": {"expand": 3}}, "base_conv.expand=3 must be even"),
        ({"sliding_window": {"rotary_fraction": 1.5}}, "sliding_window.rotary_fraction=1.5"),
        ({"d_model": 64.0}, "d_model=64.0 must be an integer"),
        ({"layer_pattern": "based"}, "layer_pattern='based' must be a sequence"),
        ({"norm": "batchnorm"}, "norm='batchnorm' is not known; allowed:"),
        ({"use_mlp": 0}, "use_mlp=0 must be True or False"),
        ({"mlp": {"inner_dim": 0}}, "mlp.inner_dim=0 must be an integer >= 1 or None"),
        ({"based": {"heads": 3, "bogus": 1}}, "based.unknown fields ['bogus']; allowed:"),
    ],
)
def test_invalid_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        ModelConfig.from_preset("based_360m", **overrides)


def test_a_section_checks_only_what_its_model_uses():
    # d_model 100 fits no 16-head attention, but a BaseConv-only model has no attention layer
    config = ModelConfig(d_model=100, num_layers=1, layer_pattern=("base_conv",))
    assert config.used_sections == ("base_conv", "mlp")
    with pytest.raises(ValueError, match=r"attention\.heads=16 must divide d_model=100"):
        config.replace(num_layers=2, layer_pattern=("base_conv", "attention"))


def test_old_flat_names_are_rejected_with_their_new_place():
    config = ModelConfig.from_preset("based_tiny")
    with pytest.raises(ValueError, match=r"chunk_size is no longer .* based\.chunk_size and "):
        config.replace(chunk_size=8)
    with pytest.raises(ValueError, match=r"window is no longer .* sliding_window\.window"):
        ModelConfig.from_preset("based_tiny", window=8)


def test_unknown_fields_and_presets_are_rejected():
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['heads'\]"):
        ModelConfig.from_dict({"heads": 3})
    with pytest.raises(ValueError, match="preset='based_7b'"):
        ModelConfig.from_preset("based_7b")
    with pytest.raises(TypeError, match="based must be a BasedConfig or a dict"):
        ModelConfig(based=3)


def test_config_is_frozen_and_replace_merges_and_validates():
    config = ModelConfig.from_preset("based_tiny")
    with pytest.raises(AttributeError):
        config.d_model = 3  # type: ignore[misc]
    changed = config.replace(sliding_window={"window": 8})
    assert changed.sliding_window.window == 8 and changed.sliding_window.heads == 4
    assert config.replace(based=BasedConfig(heads=2)).based == BasedConfig(heads=2)
    assert ModelConfig.from_dict(changed.to_dict()) == changed
    assert hash(changed) == hash(ModelConfig.from_dict(changed.to_dict()))
    with pytest.raises(ValueError, match=r"sliding_window\.window=-1"):
        config.replace(sliding_window={"window": -1})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_files_match_the_presets(preset):
    module = importlib.import_module(f"configs.{preset}")
    config = module.get_config()
    assert ModelConfig.from_dict(config.model) == ModelConfig.from_preset(preset)
    config.model.sliding_window.window = 64  # as --config.model.sliding_window.window=64 would
    assert ModelConfig.from_dict(config.model).sliding_window.window == 64


@pytest.mark.parametrize("name", ["mqar_cpu_all", "demo_mixers"])
def test_config_files_that_build_on_others_load_from_any_directory(name, tmp_path):
    # As a console script reads them: by path, from another working directory, with neither
    # the repository root nor `configs` importable.
    root = Path(__file__).resolve().parents[1]
    script = (
        "import importlib.util, sys\n"
        "sys.path = [p for p in sys.path if p not in ('', {root!r})]\n"
        "spec = importlib.util.spec_from_file_location('config', {path!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "config = module.get_config(*{args!r})\n"
        "print(type(config).__name__)\n"
    ).format(
        root=str(root),
        path=str(root / "configs" / f"{name}.py"),
        args=("cca",) if name == "demo_mixers" else (),
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ConfigDict"


def test_sibling_config_names_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere\.py"):
        sibling_get_config(str(tmp_path / "here.py"), "nowhere")
