"""Import/export of the released PyTorch checkpoints against an independent PyTorch forward."""

import base64
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxbased import LanguageModel, ModelConfig  # noqa: E402
from jaxbased.interop import (  # noqa: E402
    CheckpointMismatchError,
    UnsupportedCheckpointError,
    clean_state_dict,
    config_from_reference,
    config_to_reference,
    export_state_dict,
    import_state_dict,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from tests.conftest import fine_tune_two_steps  # noqa: E402
from tests.torch_reference import ReferenceLM, randomize  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONV = "based.models.mixers.convolution.BaseConv"
LINEAR = "based.models.mixers.linear_attention.LinearAttention"
TAYLOR = "based.models.mixers.linear_attention.TaylorExp"
SLIDING = "based.models.mixers.slide_attention.SlidingAttention"


def based_config_json(
    d_model: int,
    layers: int,
    linear: list[int],
    sliding: list[int],
    *,
    window_size: int = 256,
    n_inner: int | None = None,
    vocab_size: int = 50257,
    feature_dim: int = 16,
    heads: int = 16,
    parallel_implementation: str | None = "fla_parallel",
) -> dict:
    """A config.json as the released BASED checkpoints write it (reference training YAMLs)."""
    return {
        "_target_": "based.models.gpt.GPT2MixerConfig",
        "vocab_size": vocab_size,
        "pad_vocab_size_multiple": 8,
        "n_embd": d_model,
        "n_layer": layers,
        "n_head": heads,
        "n_inner": 2 * d_model if n_inner is None else n_inner,
        "n_positions": 0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "special_initializer": True,
        "activation_function": "swiglu",
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_mlp": False,
        "fused_bias_fc": True,
        "fused_dropout_add_ln": True,
        "use_flash_attn": True,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "qkv_proj_bias": False,
        "out_proj_bias": False,
        "rotary_emb_fraction": 1,
        "reorder_and_upcast_attn": False,
        "scale_attn_by_inverse_layer_idx": False,
        "alt_mixer_layers": linear,
        "alt_mixer_2_layers": sliding,
        "mixer": {
            "_target_": CONV,
            "l_max": 2048,
            "use_bias": True,
            "expand_proj": 4,
            "kernel_sizes": 3,
        },
        "alt_mixer": {
            "_target_": LINEAR,
            "l_max": 2048,
            "feature_map": {"_target_": TAYLOR, "input_dim": feature_dim},
            "feature_dim": feature_dim,
            "num_heads": heads,
            **(
                {"parallel_implementation": parallel_implementation}
                if parallel_implementation
                else {}
            ),
        },
        "alt_mixer_2": {
            "_target_": SLIDING,
            "window_size": window_size,
            "num_heads": heads,
            "causal": True,
        },
    }


def attn_config_json(d_model: int, layers: int, heads: int, vocab_size: int = 50257) -> dict:
    """A config.json of the released Transformer++ checkpoints (attn-360m, attn-1b)."""
    return {
        "_target_": "transformers.GPT2Config",
        "vocab_size": vocab_size,
        "pad_vocab_size_multiple": 16,
        "n_embd": d_model,
        "n_layer": layers,
        "n_head": heads,
        "n_inner": None,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "swiglu",
        "rms_norm": True,
        "residual_in_fp32": True,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "qkv_proj_bias": False,
        "out_proj_bias": False,
        "rotary_emb_fraction": 0.5,
        "scale_attn_by_inverse_layer_idx": False,
        "ff_mult": 4,
    }


#: Tiny models: windows of 5 keys (window_size 8) under 40-token prompts; an odd rotary dim (7).
TINY_BASED = based_config_json(
    64, 4, [1], [2], window_size=8, n_inner=128, vocab_size=257, feature_dim=8, heads=4
)
TINY_ATTN = attn_config_json(60, 2, 4, vocab_size=100)


def write_released_checkpoint(folder: pathlib.Path, config_json: dict, seed: int, fmt: str):
    """A random reference model saved as the released files; returns the model."""
    folder.mkdir(parents=True, exist_ok=True)
    reference = ReferenceLM(config_json)
    randomize(reference, seed)
    (folder / "config.json").write_text(json.dumps(config_json))
    state = reference.state_dict()
    if fmt == "bin":  # a Lightning state dict: model. prefix, metric counters, decay buffer
        saved = {f"model.{key}": value for key, value in state.items()}
        saved["train_metrics.num-tokens.count"] = torch.tensor(123)
        saved["model.transformer.decay.decay"] = torch.zeros(config_json["n_head"])
        torch.save(saved, folder / "pytorch_model.bin")
    else:  # safetensors without the tied head
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}
        save_file(tensors, str(folder / "model.safetensors"))
    return reference


def random_params(config: ModelConfig, seed: int) -> dict:
    """Random float32 parameters of ``config``'s shapes (no compiled init)."""
    shapes = jax.eval_shape(
        LanguageModel(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32),
        nn.meta.unbox(shapes),
    )


def tiny_tiktoken(path: pathlib.Path) -> pathlib.Path:
    """A GPT-2-format rank file of the 256 bytes (vocabulary 257 with <|endoftext|>)."""
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def based_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("based")
    reference = write_released_checkpoint(folder, TINY_BASED, seed=0, fmt="bin")
    return folder, reference


@pytest.fixture(scope="module")
def attn_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attn")
    reference = write_released_checkpoint(folder, TINY_ATTN, seed=1, fmt="safetensors")
    return folder, reference


def reference_logits(reference, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.from_numpy(tokens)).numpy()


@pytest.mark.parametrize("kind", ["based", "attn"])
def test_imported_model_matches_the_pytorch_forward(kind, based_checkpoint, attn_checkpoint, rng):
    folder, reference = based_checkpoint if kind == "based" else attn_checkpoint
    # several chunks of linear attention
    imported = load_checkpoint(folder, based={"chunk_size": 16})
    config = imported.config
    assert imported.family == "based"
    if kind == "based":
        assert config.layer_pattern == ("base_conv", "based", "sliding_window", "base_conv")
        # window_size 8 -> 8 // 2 earlier keys + the query itself
        assert config.sliding_window.window == 5
        assert imported.weights_file.name == "pytorch_model.bin"
        assert imported.dropped_keys == ("train_metrics.num-tokens.count",)
        assert set(imported.ignored_keys) == {"lm_head.weight", "transformer.decay.decay"}
    else:
        assert config.layer_pattern == ("attention", "attention")
        assert config.attention.rotary_dim(config.d_model) == 7
        assert config.padded_vocab_size == 112
        assert imported.weights_file.name == "model.safetensors"
    tokens = rng.integers(0, config.vocab_size, size=(2, 40))  # 40 tokens >> window of 5
    expected = reference_logits(reference, tokens)
    logits = LanguageModel(config).apply({"params": imported.params}, jnp.asarray(tokens))
    assert logits.shape == expected.shape == (2, 40, config.padded_vocab_size)
    assert float(np.max(np.abs(np.asarray(logits) - expected))) <= 1e-4


def test_released_config_files_give_the_presets():
    # docs/checkpoints.md: based-360m / based-1b with window_size 256 -> 129 keys; attn baselines.
    # based-360m's linear attention ran fla's kernel, whose normalizer adds 1e-6 (based-1b's
    # config names none: the quadratic default, 1e-12).
    assert config_from_reference(
        based_config_json(1024, 27, [1, 6, 11, 16, 21], [2, 7, 12, 17, 22])
    ) == ModelConfig.from_preset("based_360m")
    based_1b = based_config_json(
        1792,
        36,
        [1, 6, 11, 16, 21, 27, 33],
        [2, 7, 12, 17, 22, 28, 34],
        parallel_implementation=None,
    )
    based_1b.update(fixed_decay=True, decay_const=-3, decay_denom=False)
    assert config_from_reference(based_1b) == ModelConfig.from_preset("based_1b")
    # jaxbased-convert tells how to fine-tune the imported based-360m with train.py.
    from jaxbased.cli.convert import closest_preset

    imported = ModelConfig.from_preset("based_360m", sliding_window={"window": 65})
    assert closest_preset(imported) == (
        "based_360m",
        ["--config.model.sliding_window.window=65"],
    )
    assert config_from_reference(attn_config_json(1024, 24, 16)) == ModelConfig.from_preset(
        "attn_360m"
    )
    assert config_from_reference(attn_config_json(1680, 36, 24)) == ModelConfig.from_preset(
        "attn_1b"
    )


def test_config_json_round_trip():
    for preset in ("based_360m", "based_1b", "attn_360m", "attn_1b"):
        config = ModelConfig.from_preset(preset)
        assert config_from_reference(config_to_reference(config)) == config


def test_unsupported_options_are_all_named():
    values = dict(TINY_BASED, activation_function="gelu_new", rms_norm=False, n_head_kv=1)
    with pytest.raises(UnsupportedCheckpointError) as raised:
        config_from_reference(values)
    message = str(raised.value)
    assert "activation_function='gelu_new'" in message and "rms_norm=False" in message
    assert "n_head_kv=1" in message


def test_a_state_dict_with_a_missing_an_extra_and_a_misshaped_key_names_all_three(
    based_checkpoint,
):
    folder, _ = based_checkpoint
    config = config_from_reference(TINY_BASED)
    state, _ = clean_state_dict(read_state_dict(folder / "pytorch_model.bin"))
    del state["transformer.layers.3.mlp.fc2.weight"]
    state["transformer.layers.0.mixer.extra.weight"] = np.zeros((3,), np.float32)
    state["transformer.layers.1.mixer.proj_q.weight"] = np.zeros((30, 64), np.float32)
    with pytest.raises(CheckpointMismatchError) as raised:
        import_state_dict(state, config)
    error = raised.value
    assert error.missing == ["transformer.layers.3.mlp.fc2.weight"]
    assert error.unexpected == ["transformer.layers.0.mixer.extra.weight"]
    assert error.mismatched == [("transformer.layers.1.mixer.proj_q.weight", (30, 64), (32, 64))]
    message = str(error)
    assert "3 problems" in message
    assert "missing: transformer.layers.3.mlp.fc2.weight (expected shape [64, 256])" in message
    assert "unexpected: transformer.layers.0.mixer.extra.weight (shape [3])" in message
    assert "transformer.layers.1.mixer.proj_q.weight: checkpoint [30, 64], expected [32, 64]" in (
        message
    )


def test_an_untied_head_is_rejected(based_checkpoint):
    folder, _ = based_checkpoint
    state, _ = clean_state_dict(read_state_dict(folder / "pytorch_model.bin"))
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(CheckpointMismatchError, match="untied head"):
        import_state_dict(state, config_from_reference(TINY_BASED))


def test_state_dict_import_then_export_gives_back_the_released_tensors(based_checkpoint):
    folder, _ = based_checkpoint
    state, _ = clean_state_dict(read_state_dict(folder / "pytorch_model.bin"))
    config = config_from_reference(TINY_BASED)
    params, _ = import_state_dict(state, config)
    exported = export_state_dict(params, config)
    del state["transformer.decay.decay"]  # an unused buffer, not exported
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        assert exported[key].dtype == np.float32
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_export_then_import_is_exact(fmt, tmp_path):
    config = ModelConfig.from_preset(
        "based_tiny", mlp={"multiple_of": 256}, based={"chunk_size": 16}, vocab_size=100
    )
    params = random_params(config, seed=3)
    save_checkpoint(tmp_path, config, params, format=fmt)
    imported = load_checkpoint(tmp_path, based={"chunk_size": 16})
    assert imported.config == config
    flat_ours = jax.tree_util.tree_leaves_with_path(params)
    flat_back = dict(jax.tree_util.tree_leaves_with_path(imported.params))
    assert len(flat_ours) == len(flat_back)
    for path, value in flat_ours:
        np.testing.assert_array_equal(flat_back[path], value, err_msg=jax.tree_util.keystr(path))


def test_bfloat16_safetensors_are_read_exactly(tmp_path):
    from safetensors.torch import save_file

    values = torch.randn(5, 3).to(torch.bfloat16)
    save_file({"w": values, "n": torch.arange(4)}, str(tmp_path / "x.safetensors"))
    read = read_state_dict(tmp_path / "x.safetensors")
    assert read["w"].dtype == np.float32
    np.testing.assert_array_equal(read["w"], values.float().numpy())
    np.testing.assert_array_equal(read["n"], np.arange(4))


def test_safetensors_import_needs_no_torch(attn_checkpoint):
    folder, _ = attn_checkpoint
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from jaxbased.interop import load_checkpoint\n"
        f"imported = load_checkpoint({str(folder)!r})\n"
        "print(imported.config.layer_pattern)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "('attention', 'attention')" in done.stdout


def test_convert_cli_writes_a_workdir_that_generates_and_fine_tunes(based_checkpoint, tmp_path):
    from jaxbased import generate
    from jaxbased.data.corpus import Document
    from jaxbased.data.token_store import write_token_dataset
    from jaxbased.data.tokenizers import TiktokenTokenizer
    from jaxbased.training.checkpointing import load_for_inference

    folder, _ = based_checkpoint
    tokenizer_file = tiny_tiktoken(tmp_path / "gpt2-bytes.tiktoken")
    workdir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxbased.cli.convert",
            f"--checkpoint={folder}",
            f"--workdir={workdir}",
            f"--tokenizer_file={tokenizer_file}",
            "--implementation=xla",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "fine-tune:" in done.stdout
    assert (workdir / "tokenizer" / "gpt2-bytes.tiktoken").is_file()

    # jaxbased-generate reads workdirs with load_for_inference.
    config, params, tokenizer = load_for_inference(workdir)
    imported = load_checkpoint(folder, implementation="xla")
    assert config == imported.config
    for (path, ours), (_, theirs) in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree_util.tree_leaves_with_path(imported.params),
        strict=True,
    ):
        np.testing.assert_array_equal(ours, theirs, err_msg=jax.tree_util.keystr(path))
    assert tokenizer.spec() == {"kind": "gpt2", "file": "gpt2-bytes.tiktoken"}
    result = generate(
        LanguageModel(config), params, [tokenizer.encode("abc")], max_new_tokens=3, temperature=0
    )
    assert result.num_generated[0] == 3

    # train.py resumes from the converted step 0 and fine-tunes.
    from jaxbased.training.configs import preset_config

    data = write_token_dataset(
        [Document(f"doc{i}", f"hello world, this is text number {i}. " * 8) for i in range(8)],
        TiktokenTokenizer(tokenizer_file),
        tmp_path / "data",
        validation_fraction=0.2,
        progress=False,
    )
    run_config = preset_config("based_tiny", **config.to_dict())
    run_config.unlock()
    run_config.data.update(path=str(data))
    result = fine_tune_two_steps(run_config, workdir)
    assert result.initial_eval is None  # resumed from the converted checkpoint
    assert result.final_step == 2
    _, tuned, _ = load_for_inference(workdir)
    assert not np.array_equal(tuned["embedding"], params["embedding"])

    # ... and the fine-tuned model goes back to the released layout.
    exported = tmp_path / "exported"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxbased.cli.convert",
            f"--workdir={workdir}",
            f"--export_to={exported}",
            "--format=bin",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (exported / "gpt2-bytes.tiktoken").is_file()
    back = load_checkpoint(exported, implementation="xla")
    assert back.config == config and back.weights_file.name == "pytorch_model.bin"
    for (path, ours), (_, theirs) in zip(
        jax.tree_util.tree_leaves_with_path(tuned),
        jax.tree_util.tree_leaves_with_path(back.params),
        strict=True,
    ):
        np.testing.assert_array_equal(ours, theirs, err_msg=jax.tree_util.keystr(path))


def test_the_written_train_state_is_the_one_train_py_creates():
    import optax

    from jaxbased.interop.workdir import train_state_for
    from jaxbased.training.optimizer import make_optimizer
    from jaxbased.training.state import TrainState

    config = ModelConfig.from_preset("based_tiny", vocab_size=100)
    params = random_params(config, seed=0)
    written = train_state_for(params)
    created = TrainState.create(params, make_optimizer(optax.constant_schedule(1e-3)))
    assert jax.tree.structure(written) == jax.tree.structure(created)
    for ours, theirs in zip(jax.tree.leaves(written), jax.tree.leaves(created), strict=True):
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)


def test_the_gpt2_tokenizer_is_found_in_the_checkpoint_folder(tmp_path):
    from tokenizers import pre_tokenizers

    from jaxbased.interop.tokenizer import checkpoint_tokenizer

    # GPT-2's original files: byte-level symbols in vocab.json, merges.txt (one merge here).
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab["he"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    original = tmp_path / "original"
    original.mkdir()
    (original / "vocab.json").write_text(json.dumps(vocab))
    (original / "merges.txt").write_text("#version: 0.2\nh e\n")
    tokenizer = checkpoint_tokenizer(original)
    assert tokenizer.eos_id == vocab["<|endoftext|>"] and tokenizer.vocab_size == len(vocab)
    ids = tokenizer.encode("hello\n")
    assert ids[0] == vocab["he"] and tokenizer.decode(ids) == "hello\n"
    # A rank file beside the weights is used too; an explicit file wins over both.
    with_rank_file = tmp_path / "ranks"
    with_rank_file.mkdir()
    tiny_tiktoken(with_rank_file / "gpt2.tiktoken")
    assert checkpoint_tokenizer(with_rank_file).spec() == {"kind": "gpt2", "file": "gpt2.tiktoken"}
    explicit = tiny_tiktoken(tmp_path / "other.tiktoken")
    chosen = checkpoint_tokenizer(with_rank_file, explicit)
    assert chosen.spec() == {"kind": "gpt2", "file": "other.tiktoken"}


def test_evaluation_loads_a_released_folder_with_its_tokenizer(based_checkpoint, tmp_path):
    from jaxbased.evaluation import load_model

    folder, _ = based_checkpoint
    tokenizer_file = tiny_tiktoken(tmp_path / "gpt2.tiktoken")
    config, params, tokenizer = load_model(
        checkpoint=folder, tokenizer_file=tokenizer_file, dtype="bfloat16"
    )
    imported = load_checkpoint(folder)
    assert config == imported.config.replace(dtype="bfloat16")
    np.testing.assert_array_equal(params["embedding"], imported.params["embedding"])
    assert tokenizer.spec() == {"kind": "gpt2", "file": "gpt2.tiktoken"}
    with pytest.raises(ValueError, match="exactly one"):
        load_model(checkpoint=folder, workdir=tmp_path)
