"""jaxbased-quantize end to end: a train.py workdir and a mamba_ssm checkpoint folder become
quantized workdirs that jaxbased-generate and the evaluation loaders run; other model families
and bad flags are usage errors. The commands run as subprocesses (their absl flags would clash
with other commands imported in the same test process)."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbased import ModelConfig, generate
from jaxbased.cli import errors
from jaxbased.data.corpus import Document
from jaxbased.data.token_store import TokenDataset, write_token_dataset
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.evaluation import evaluate_perplexity, load_inference_model
from jaxbased.quantization.calibration import (
    QuantizationSettings,
    calibration_windows,
    quantize_model,
)
from jaxbased.quantization.mamba import QuantizedLanguageModel
from jaxbased.quantization.workdir import is_quantized_workdir, load_quantized_workdir
from jaxbased.training.checkpointing import Checkpointer
from jaxbased.training.optimizer import make_optimizer
from jaxbased.training.state import TrainState
from tests.conftest import init_model
from tests.test_mamba_interop import (
    TINY_REFERENCE_JSON,
    synthetic_mamba_state_dict,
    tiny_tiktoken,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ModelConfig.from_preset(
    "mamba_tiny",
    vocab_size=257,  # the byte tokenizer's, end-of-text included
    d_model=32,
    num_layers=2,
    layer_pattern=("mamba",) * 2,
    init_std=0.1,
)
TEXT = "the quick brown fox jumps over the lazy dog. " * 12


def write_workdir(path, config, seed=0):
    _, params = init_model(config, seed=seed)
    checkpointer = Checkpointer(path, async_save=False)
    metadata = {"model": config.to_dict(), "tokenizer": ByteTokenizer().spec()}
    state = TrainState.create(params, make_optimizer(optax.constant_schedule(1e-3)))
    checkpointer.save(1, state, {}, metadata)
    checkpointer.close()
    return params


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    documents = [Document(f"doc{i}", TEXT) for i in range(4)]
    path = tmp_path_factory.mktemp("data") / "ds"
    write_token_dataset(documents, ByteTokenizer(), path, progress=False)
    return path


def run(command, *flags):
    return subprocess.run(
        [sys.executable, "-m", f"jaxbased.cli.{command}", *flags],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip


def test_quantize_a_workdir_and_generate_from_it(tmp_path, data):
    params = write_workdir(tmp_path / "run", CONFIG)
    output = tmp_path / "int8"
    done = run(
        "quantize", f"--workdir={tmp_path / 'run'}", f"--calibration_data={data}",
        f"--output_workdir={output}", "--num_sequences=3", "--seq_len=32",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["calibration_sequences"] == 3 and summary["arithmetic"] == "int8"
    assert summary["quantized_parameter_bytes"] < summary["float_parameter_bytes"]
    assert is_quantized_workdir(output)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    # The stored model is the one the library's recipe makes from the same sequences.
    model, stored, tokenizer, metadata = load_quantized_workdir(output)
    sequences = calibration_windows(TokenDataset.open(data).tokens("train"), 3, 32)
    expected_model, expected, _ = quantize_model(CONFIG, params, sequences, QuantizationSettings())
    tokens = jnp.asarray(sequences[:1, :10])
    np.testing.assert_array_equal(
        model.apply({"params": stored}, tokens), expected_model.apply({"params": expected}, tokens)
    )
    assert metadata["source"]["seq_len"] == 32 and tokenizer.spec() == ByteTokenizer().spec()

    done = run(
        "generate", f"--workdir={output}", "--prompt=the quick", "--max_new_tokens=5",
        "--temperature=0", "--nostop_at_eos",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    greedy = generate(
        model, stored, [tokenizer.encode("the quick")], max_new_tokens=5, temperature=0
    )
    assert done.stdout == "the quick" + tokenizer.decode(greedy.tokens[0]) + "\n"

    # What jaxbased-perplexity, -serve and lm-eval load: the quantized model itself.
    loaded, loaded_params, _ = load_inference_model(workdir=output)
    assert isinstance(loaded, QuantizedLanguageModel) and loaded.arithmetic == "int8"
    result = evaluate_perplexity(loaded, loaded_params, TokenDataset.open(data), seq_len=32)
    assert np.isfinite(result.loss) and result.tokens > 0
    with pytest.raises(ValueError, match="drop step"):
        load_inference_model(workdir=output, step=1)


def test_a_mamba_ssm_checkpoint_quantizes_and_generates(tmp_path, data, rng):
    from safetensors.numpy import save_file

    from jaxbased.interop.mamba_checkpoint import mamba_config_from_reference

    folder = tmp_path / "mamba-ssm"
    folder.mkdir()
    reference = {**TINY_REFERENCE_JSON, "d_model": 32, "n_layer": 2}
    (folder / "config.json").write_text(json.dumps(reference))
    config = mamba_config_from_reference(reference)
    save_file(synthetic_mamba_state_dict(config, rng), str(folder / "model.safetensors"))
    tokenizer_file = tiny_tiktoken(tmp_path / "bytes.tiktoken")
    output = tmp_path / "int8"
    done = run(
        "quantize", f"--checkpoint={folder}", f"--tokenizer_file={tokenizer_file}",
        f"--calibration_data={data}", f"--output_workdir={output}", "--num_sequences=2",
        "--seq_len=16", "--ssm_input_observer=min_max", "--nohadamard",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    model, params, tokenizer, metadata = load_quantized_workdir(output)
    assert model.config.num_layers == 2 and not model.hadamard
    assert metadata["settings"]["ssm_input_observer"] == "min_max"
    assert params["layers_1"]["mixer"]["in_proj_kernel"].dtype == np.int8
    result = generate(model, params, [tokenizer.encode("abc")], max_new_tokens=4, temperature=0)
    assert result.num_generated[0] == 4


def test_other_families_and_bad_flags_are_usage_errors(tmp_path, data):
    based = ModelConfig(vocab_size=257, d_model=16, num_layers=1, layer_pattern=("based",))
    write_workdir(tmp_path / "based", based)
    common = (f"--calibration_data={data}", f"--output_workdir={tmp_path / 'out'}")
    refused = run("quantize", f"--workdir={tmp_path / 'based'}", *common)
    assert refused.returncode == errors.EXIT_USAGE
    assert "quantization supports" in refused.stderr and "['based']" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "out").exists()
    bad = run("quantize", f"--workdir={tmp_path / 'based'}", "--seq_len=0", *common)
    assert bad.returncode == errors.EXIT_USAGE and "--seq_len=0" in bad.stderr
    exists = run(
        "quantize", f"--workdir={tmp_path / 'based'}", f"--calibration_data={data}",
        f"--output_workdir={tmp_path}",
    )  # fmt: skip
    assert exists.returncode == errors.EXIT_USAGE and "exists" in exists.stderr
