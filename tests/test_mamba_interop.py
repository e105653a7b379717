"""mamba_ssm checkpoints (the reference's mamba-360m layout, state-spaces' mamba2): config.json
and state dict import/export, checked against a NumPy forward on the PyTorch-layout tensors, and
their way through jaxbased-convert (import into a train.py workdir, fine-tuning, export)."""

import base64
import json
import pathlib
import shlex

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig
from jaxbased.interop import (
    CheckpointMismatchError,
    UnsupportedCheckpointError,
    checkpoint_family,
    export_family,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from jaxbased.interop.mamba_checkpoint import (
    export_mamba_state_dict,
    import_mamba_state_dict,
    mamba_config_from_reference,
    mamba_config_to_reference,
)
from tests.conftest import fine_tune_two_steps, relative_error

REPO = pathlib.Path(__file__).resolve().parents[1]

# The reference's mamba-360m: MambaConfig defaults plus train/configs/experiment/reference/
# mamba-360m.yaml (n_layer 46, rms_norm, pad_vocab_size_multiple 16).
MAMBA_360M_JSON = {
    "d_model": 1024,
    "n_layer": 46,
    "vocab_size": 50277,
    "ssm_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 16,
}
# state-spaces/mamba2-370m's config.json.
MAMBA2_370M_JSON = {
    "d_model": 1024,
    "d_intermediate": 0,
    "n_layer": 48,
    "vocab_size": 50277,
    "ssm_cfg": {"layer": "Mamba2"},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 16,
    "tie_embeddings": True,
}
TINY_JSON = {"d_model": 16, "n_layer": 2, "vocab_size": 37, "ssm_cfg": {"d_state": 4}}
# What the reference's MambaLMHeadModel.save_pretrained writes: its MambaConfig's __dict__, GPT-2
# fields included (n_embd, n_head, ...: unused by the model). Shaped like the mamba_tiny preset
# (d_model 64, 4 layers, d_state 8), with the 257 ids of the byte-level test tokenizer.
TINY_REFERENCE_JSON = {
    "d_model": 64,
    "n_layer": 4,
    "vocab_size": 257,
    "ssm_cfg": {"d_state": 8},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "reorder_and_upcast_attn": False,
    "scale_attn_by_inverse_layer_idx": False,
    "n_positions": 2048,
    "n_embd": 1024,
    "n_head": 16,
    "use_flash_attn": False,
    "fused_dropout_add_ln": False,
    "fused_mlp": False,
    "fused_bias_fc": False,
    "use_fast_path": True,
}


def test_reference_configs_give_the_presets():
    assert mamba_config_from_reference(MAMBA_360M_JSON) == ModelConfig.from_preset("mamba_360m")
    assert mamba_config_from_reference(MAMBA2_370M_JSON) == ModelConfig.from_preset("mamba2_360m")
    with pytest.raises(UnsupportedCheckpointError, match="attn_layer_idx"):
        mamba_config_from_reference({**MAMBA2_370M_JSON, "attn_layer_idx": [3]})
    with pytest.raises(UnsupportedCheckpointError, match="d_intermediate"):
        mamba_config_from_reference({**MAMBA2_370M_JSON, "d_intermediate": 4096})


def synthetic_mamba_state_dict(config: ModelConfig, rng) -> dict[str, np.ndarray]:
    """Random tensors in mamba_ssm's layout and shapes (PyTorch [out, in]) for a Mamba-1
    ``config``: written from the layout, not from our rules."""
    d, inner = config.d_model, config.mamba.inner_dim(config.d_model)
    rank, state, taps = config.mamba.time_step_rank(d), config.mamba.state_dim, 4
    assert config.mamba.conv_kernel_size == taps

    def normal(*shape, scale=0.3):
        return (scale * rng.normal(size=shape)).astype(np.float32)

    embedding = normal(config.padded_vocab_size, d)
    sd = {"backbone.embedding.weight": embedding}
    for i in range(config.num_layers):
        prefix = f"backbone.layers.{i}"
        sd[f"{prefix}.norm.weight"] = 1 + normal(d)
        sd[f"{prefix}.mixer.in_proj.weight"] = normal(2 * inner, d)
        sd[f"{prefix}.mixer.conv1d.weight"] = normal(inner, 1, taps)
        sd[f"{prefix}.mixer.conv1d.bias"] = normal(inner)
        sd[f"{prefix}.mixer.x_proj.weight"] = normal(rank + 2 * state, inner)
        sd[f"{prefix}.mixer.dt_proj.weight"] = normal(inner, rank)
        sd[f"{prefix}.mixer.dt_proj.bias"] = normal(inner) - 3
        a = np.arange(1, state + 1) + normal(inner, state) ** 2
        sd[f"{prefix}.mixer.A_log"] = np.log(a).astype(np.float32)
        sd[f"{prefix}.mixer.D"] = 1 + normal(inner)
        sd[f"{prefix}.mixer.out_proj.weight"] = normal(d, inner)
    sd["backbone.norm_f.weight"] = 1 + normal(d)
    sd["lm_head.weight"] = embedding.copy()
    return sd


def torch_layout_forward(sd, tokens, eps=1e-5):
    """float64 logits of mamba_ssm's MambaLMHeadModel read straight from the state dict."""

    def w(key):
        return np.asarray(sd[key], np.float64)

    def rms(x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    def silu(x):
        return x / (1 + np.exp(-x))

    hidden = w("backbone.embedding.weight")[tokens]
    seq = tokens.shape[1]
    num_layers = len([key for key in sd if key.endswith(".mixer.A_log")])
    for i in range(num_layers):
        p = f"backbone.layers.{i}.mixer"
        xz = rms(hidden, w(f"backbone.layers.{i}.norm.weight")) @ w(f"{p}.in_proj.weight").T
        inner = xz.shape[-1] // 2
        rank, state = w(f"{p}.dt_proj.weight").shape[1], w(f"{p}.A_log").shape[1]
        x, z = xz[..., :inner], xz[..., inner:]
        conv = w(f"{p}.conv1d.weight")[:, 0, :]  # [C, K], PyTorch cross-correlation, pad K-1
        taps = conv.shape[1]
        padded = np.concatenate([np.zeros_like(x[:, : taps - 1]), x], axis=1)
        x = silu(
            sum(conv[:, k] * padded[:, k : k + seq] for k in range(taps)) + w(f"{p}.conv1d.bias")
        )
        x_dbl = x @ w(f"{p}.x_proj.weight").T
        dt, b, c = x_dbl[..., :rank], x_dbl[..., rank : rank + state], x_dbl[..., rank + state :]
        delta = np.logaddexp(0, dt @ w(f"{p}.dt_proj.weight").T + w(f"{p}.dt_proj.bias"))
        a = -np.exp(w(f"{p}.A_log"))
        h = np.zeros((tokens.shape[0], inner, state))
        y = np.zeros_like(x)
        for t in range(seq):
            h = (
                np.exp(delta[:, t, :, None] * a) * h
                + (delta[:, t] * x[:, t])[..., None] * b[:, t, None]
            )
            y[:, t] = (h * c[:, t, None]).sum(-1)
        y = (y + w(f"{p}.D") * x) * silu(z)
        hidden = hidden + y @ w(f"{p}.out_proj.weight").T
    return rms(hidden, w("backbone.norm_f.weight")) @ w("lm_head.weight").T


def test_imported_mamba_gives_the_reference_forward_and_exports_back_exactly(rng):
    config = mamba_config_from_reference(TINY_JSON, mamba={"chunk_size": 4})
    sd = synthetic_mamba_state_dict(config, rng)
    params, ignored = import_mamba_state_dict(sd, config)
    assert ignored == ["lm_head.weight"]
    tokens = rng.integers(0, 37, size=(2, 9))
    got = jax.jit(LanguageModel(config).apply)({"params": params}, tokens)
    assert relative_error(got, torch_layout_forward(sd, tokens)) <= 1e-5
    exported = export_mamba_state_dict(params, config)
    assert exported.keys() == sd.keys()
    for key, value in sd.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_mismatched_state_dicts_name_every_problem(rng):
    config = mamba_config_from_reference(TINY_JSON)
    sd = synthetic_mamba_state_dict(config, rng)
    del sd["backbone.layers.1.mixer.D"]
    sd["backbone.layers.0.mixer.A_log"] = sd["backbone.layers.0.mixer.A_log"][:, :3]
    sd["backbone.layers.0.mixer.rotary.inv_freq"] = np.zeros(4, np.float32)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(CheckpointMismatchError) as error:
        import_mamba_state_dict(sd, config)
    message = str(error.value)
    assert "missing: backbone.layers.1.mixer.D (expected shape [32])" in message
    assert "backbone.layers.0.mixer.A_log: checkpoint [32, 3], expected [32, 4]" in message
    assert "unexpected: backbone.layers.0.mixer.rotary.inv_freq" in message
    assert "untied head" in message


def test_mamba2_state_dict_round_trip_keeps_the_reference_column_order(rng):
    config = mamba_config_from_reference(
        {**MAMBA2_370M_JSON, "d_model": 16, "n_layer": 1, "vocab_size": 40},
        mamba2={"state_dim": 4, "head_dim": 8},
    )
    model = LanguageModel(config)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 3), np.int32))["params"]
    params = jax.tree.map(
        lambda p: (np.asarray(p) + rng.normal(size=p.shape)).astype(np.float32),
        nn.meta.unbox(params),
    )
    sd = export_mamba_state_dict(params, config)
    in_proj = sd["backbone.layers.0.mixer.in_proj.weight"]  # rows z | x | B | C | dt
    assert in_proj.shape == (32 + 32 + 2 * 4 + 4, 16)
    np.testing.assert_array_equal(
        in_proj[-4:], params["layers_0"]["mixer"]["in_proj"]["kernel"][:, -4:].T
    )
    assert sd["backbone.layers.0.mixer.conv1d.weight"].shape == (40, 1, 4)
    assert sd["backbone.layers.0.mixer.norm.weight"].shape == (32,)
    back, _ = import_mamba_state_dict(sd, config)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_config_json_round_trip_and_export_layout():
    for preset in ("mamba_360m", "mamba_1b", "mamba2_360m", "mamba_tiny", "mamba2_tiny"):
        config = ModelConfig.from_preset(preset)
        values = mamba_config_to_reference(config)
        assert checkpoint_family(values) == "mamba" and export_family(config) == "mamba"
        expected = config.replace(mamba={"chunk_size": ModelConfig().mamba.chunk_size})
        assert mamba_config_from_reference(values) == expected, preset
    assert mamba_config_to_reference(ModelConfig.from_preset("mamba_360m")) == {
        **MAMBA_360M_JSON,
        "ssm_cfg": {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto"},
    }
    assert export_family(ModelConfig.from_preset("based_360m")) == "based"
    assert checkpoint_family({"n_embd": 8, "n_layer": 1, "vocab_size": 9}) == "based"
    with pytest.raises(UnsupportedCheckpointError, match=r"\['attention', 'mamba2', 'mlp'\]"):
        export_family(ModelConfig.from_preset("mamba2_hybrid_tiny"))
    with pytest.raises(UnsupportedCheckpointError, match="use_mlp=True"):
        export_family(ModelConfig.from_preset("mamba_tiny", use_mlp=True))
    mixed = ModelConfig.from_preset("mamba_tiny", layer_pattern=("mamba", "mamba2") * 2)
    with pytest.raises(UnsupportedCheckpointError, match="every layer 'mamba' or every"):
        save_checkpoint("unused", mixed, {})


@pytest.mark.parametrize(
    "values, found",
    [
        ({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2}, "'llama'"),
        ({"n_embd": 8, "vocab_size": 9}, "keys [n_embd, vocab_size]"),
        (  # transformers' MambaConfig (state-spaces/mamba-130m-hf)
            {"model_type": "mamba", "hidden_size": 8, "num_hidden_layers": 2, "state_size": 4},
            "mamba-130m-hf",
        ),
    ],
)
def test_a_config_json_of_neither_family_is_named(values, found, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="is neither a GPT2Config") as raised:
        load_checkpoint(tmp_path)
    assert found in str(raised.value) and str(tmp_path / "config.json") in str(raised.value)


def test_a_mamba_config_json_without_its_width_is_named():
    with pytest.raises(ValueError, match=r"lacks \['d_model'\]"):
        checkpoint_family({"n_layer": 2, "ssm_cfg": {}})


def test_mamba2_checkpoint_saves_and_loads_back_exactly(tmp_path):
    config = ModelConfig.from_preset("mamba2_tiny", vocab_size=50)
    shapes = jax.eval_shape(
        LanguageModel(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )["params"]
    rng = np.random.default_rng(5)
    params = jax.tree.map(
        lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), nn.meta.unbox(shapes)
    )
    weights = save_checkpoint(tmp_path, config, params, include_lm_head=False)
    assert weights.name == "model.safetensors"
    assert json.loads((tmp_path / "config.json").read_text())["ssm_cfg"]["layer"] == "Mamba2"
    imported = load_checkpoint(tmp_path)
    assert imported.family == "mamba" and imported.config == config
    jax.tree.map(np.testing.assert_array_equal, imported.params, params)


def tiny_tiktoken(path: pathlib.Path) -> pathlib.Path:
    """A GPT-2-format rank file of the 256 bytes (vocabulary 257 with <|endoftext|>)."""
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_convert(capsys, **flag_values) -> str:
    """``jaxbased-convert`` (its absl ``main``) with these flags; returns what it printed."""
    from absl import flags
    from absl.testing import flagsaver

    from jaxbased.cli import convert

    was_parsed = flags.FLAGS.is_parsed()
    if not was_parsed:
        flags.FLAGS.mark_as_parsed()
    try:
        with flagsaver.flagsaver(**flag_values):
            convert.main(["jaxbased-convert"])
    finally:
        if not was_parsed:
            flags.FLAGS.unparse_flags()
    return capsys.readouterr().out


def printed_train_config(command: str, data_path: pathlib.Path):
    """The config ``train.py`` builds from the printed fine-tune command (its config flags)."""
    from absl import flags
    from ml_collections import config_flags

    command = command.replace("<data tokenized with this tokenizer>", shlex.quote(str(data_path)))
    args = shlex.split(command.removeprefix("fine-tune: python train.py "))
    args = [
        arg.replace("=configs/", f"={REPO}/configs/")
        for arg in args
        if not arg.startswith("--workdir=")
    ]
    argv = ["train.py", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, flag_values=flag_values, lock_config=False, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


def test_convert_imports_a_lightning_mamba_checkpoint_that_fine_tunes_and_exports_back(
    tmp_path, rng, capsys
):
    torch = pytest.importorskip("torch")
    from jaxbased import generate
    from jaxbased.data.corpus import Document
    from jaxbased.data.token_store import write_token_dataset
    from jaxbased.data.tokenizers import TiktokenTokenizer
    from jaxbased.evaluation import load_model
    from jaxbased.training.checkpointing import load_for_inference

    # A checkpoint as the reference's Lightning trainer saves it: "model." keys, metric counters.
    folder = tmp_path / "mamba-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_REFERENCE_JSON))
    sd = synthetic_mamba_state_dict(mamba_config_from_reference(TINY_REFERENCE_JSON), rng)
    saved = {f"model.{key}": torch.from_numpy(value) for key, value in sd.items()}
    saved["train_metrics.num-tokens.count"] = torch.tensor(123)
    saved["val_metrics.num-tokens.count"] = torch.tensor(4)
    torch.save({"state_dict": saved}, folder / "pytorch_model.bin")
    tokenizer_file = tiny_tiktoken(tmp_path / "gpt2-bytes.tiktoken")

    workdir = tmp_path / "run"
    printed = run_convert(
        capsys,
        checkpoint=str(folder),
        workdir=str(workdir),
        tokenizer_file=str(tokenizer_file),
        implementation="xla",
    )
    (command,) = [line for line in printed.splitlines() if line.startswith("fine-tune:")]
    assert command.startswith("fine-tune: python train.py --config=configs/mamba_tiny.py ")

    # The workdir (what jaxbased-generate / -perplexity / lm-eval read) computes mamba_ssm's
    # forward of the PyTorch-layout tensors.
    config, params, tokenizer = load_for_inference(workdir)
    assert config == mamba_config_from_reference(TINY_REFERENCE_JSON, implementation="xla")
    assert tokenizer.spec() == {"kind": "gpt2", "file": "gpt2-bytes.tiktoken"}
    tokens = rng.integers(0, 257, size=(2, 11))
    logits = jax.jit(LanguageModel(config).apply)({"params": params}, tokens)
    assert relative_error(logits, torch_layout_forward(sd, tokens)) <= 1e-5
    evaluated, _, _ = load_model(checkpoint=folder, tokenizer_file=tokenizer_file)
    assert evaluated == config.replace(implementation="auto")
    result = generate(
        LanguageModel(config), params, [tokenizer.encode("abc")], max_new_tokens=3, temperature=0
    )
    assert result.num_generated[0] == 3

    # Export of the converted step 0 gives back the released tensors and an equivalent config.
    exported = tmp_path / "exported"
    printed = run_convert(
        capsys, workdir=str(workdir), export_to=str(exported), format="safetensors"
    )
    assert "(mamba layout)" in printed
    back = read_state_dict(exported / "model.safetensors")
    assert back.keys() == sd.keys()
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    written = json.loads((exported / "config.json").read_text())
    assert mamba_config_from_reference(written) == mamba_config_from_reference(TINY_REFERENCE_JSON)
    for name in ("d_model", "n_layer", "vocab_size", "rms_norm", "pad_vocab_size_multiple"):
        assert written[name] == TINY_REFERENCE_JSON[name], name
    assert (exported / "gpt2-bytes.tiktoken").is_file()

    # train.py, run with the printed command, resumes the converted step 0.
    data = write_token_dataset(
        [Document(f"doc{i}", f"hello world, this is text number {i}. " * 8) for i in range(8)],
        TiktokenTokenizer(tokenizer_file),
        tmp_path / "data",
        validation_fraction=0.2,
        progress=False,
    )
    run_config = printed_train_config(command, data)
    assert ModelConfig.from_dict(run_config.model) == config
    trained = fine_tune_two_steps(run_config, workdir)
    assert trained.initial_eval is None  # resumed from the converted checkpoint
    assert trained.final_step == 2
    _, tuned, _ = load_for_inference(workdir)
    assert not np.array_equal(tuned["embedding"], params["embedding"])
