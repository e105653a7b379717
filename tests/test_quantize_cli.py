"""jaxbased-quantize end to end: a train.py workdir and a mamba_ssm checkpoint folder become
quantized workdirs that jaxbased-generate runs; other model families are refused."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from absl.testing import flagsaver

from jaxbased import ModelConfig, generate
from jaxbased.cli import errors
from jaxbased.data.corpus import Document
from jaxbased.data.token_store import TokenDataset, write_token_dataset
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.quantization.calibration import (
    QuantizationSettings,
    calibration_windows,
    quantize_model,
)
from jaxbased.quantization.workdir import is_quantized_workdir, load_quantized_workdir
from jaxbased.training.checkpointing import Checkpointer
from jaxbased.training.optimizer import make_optimizer
from jaxbased.training.state import TrainState
from tests.conftest import init_model
from tests.test_mamba_interop import synthetic_mamba_state_dict, tiny_tiktoken

CONFIG = ModelConfig.from_preset(
    "mamba_tiny",
    vocab_size=257,  # the byte tokenizer's, end-of-text included
    d_model=32,
    num_layers=2,
    layer_pattern=("mamba",) * 2,
    init_std=0.1,
)
REPO = pathlib.Path(__file__).resolve().parents[1]
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


def run_main(module, capsys, **flag_values) -> str:
    """A command's absl ``main`` with these flags; returns what it printed."""
    was_parsed = flags.FLAGS.is_parsed()
    if not was_parsed:
        flags.FLAGS.mark_as_parsed()
    try:
        with flagsaver.flagsaver(**flag_values):
            module.main([module.COMMAND.name])
    finally:
        if not was_parsed:
            flags.FLAGS.unparse_flags()
    return capsys.readouterr().out


def test_quantize_a_workdir_and_generate_from_it(tmp_path, data, capsys):
    from jaxbased.cli import quantize

    params = write_workdir(tmp_path / "run", CONFIG)
    output = tmp_path / "int8"
    printed = run_main(
        quantize, capsys, workdir=str(tmp_path / "run"), calibration_data=str(data),
        output_workdir=str(output), num_sequences=3, seq_len=32,
    )  # fmt: skip
    summary = json.loads(printed.strip().splitlines()[-1])
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

    done = subprocess.run(
        [sys.executable, "-m", "jaxbased.cli.generate", f"--workdir={output}",
         "--prompt=the quick", "--max_new_tokens=5", "--temperature=0", "--nostop_at_eos"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    greedy = generate(
        model, stored, [tokenizer.encode("the quick")], max_new_tokens=5, temperature=0.0
    )
    assert done.stdout == "the quick" + tokenizer.decode(greedy.tokens[0]) + "\n"

    with pytest.raises(errors.UsageError, match="exists"):
        run_main(
            quantize, capsys, workdir=str(tmp_path / "run"), calibration_data=str(data),
            output_workdir=str(output),
        )  # fmt: skip


def test_a_mamba_ssm_checkpoint_quantizes_and_generates(tmp_path, data, capsys, rng):
    from safetensors.numpy import save_file

    from jaxbased.cli import quantize
    from tests.test_mamba_interop import TINY_REFERENCE_JSON

    folder = tmp_path / "mamba-ssm"
    folder.mkdir()
    reference = {**TINY_REFERENCE_JSON, "d_model": 32, "n_layer": 2}
    (folder / "config.json").write_text(json.dumps(reference))
    from jaxbased.interop.mamba_checkpoint import mamba_config_from_reference

    config = mamba_config_from_reference(reference)
    save_file(synthetic_mamba_state_dict(config, rng), str(folder / "model.safetensors"))
    tokenizer_file = tiny_tiktoken(tmp_path / "bytes.tiktoken")
    output = tmp_path / "int8"
    run_main(
        quantize, capsys, checkpoint=str(folder), tokenizer_file=str(tokenizer_file),
        calibration_data=str(data), output_workdir=str(output), num_sequences=2, seq_len=16,
        ssm_input_observer="min_max", hadamard=False,
    )  # fmt: skip
    model, params, tokenizer, metadata = load_quantized_workdir(output)
    assert model.config.num_layers == 2 and not model.hadamard
    assert metadata["settings"]["ssm_input_observer"] == "min_max"
    assert params["layers_1"]["mixer"]["in_proj_kernel"].dtype == np.int8
    result = generate(model, params, [tokenizer.encode("abc")], max_new_tokens=4, temperature=0.0)
    assert result.num_generated[0] == 4


def test_other_families_and_bad_flags_are_usage_errors(tmp_path, data, capsys):
    from jaxbased.cli import quantize

    based = ModelConfig(vocab_size=257, d_model=16, num_layers=1, layer_pattern=("based",))
    write_workdir(tmp_path / "based", based)
    common = {"calibration_data": str(data), "output_workdir": str(tmp_path / "out")}
    with pytest.raises(errors.UsageError, match=r"quantization supports .*\['based'\]"):
        run_main(quantize, capsys, workdir=str(tmp_path / "based"), **common)
    assert not (tmp_path / "out").exists()
    with pytest.raises(errors.UsageError, match="seq_len"):
        run_main(quantize, capsys, workdir=str(tmp_path / "based"), seq_len=0, **common)
    with pytest.raises(errors.UsageError, match="not a prepared dataset"):
        run_main(
            quantize, capsys, workdir=str(tmp_path / "based"), calibration_data=str(tmp_path),
            output_workdir=str(tmp_path / "out"),
        )  # fmt: skip
