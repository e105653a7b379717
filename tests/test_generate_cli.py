"""jaxbased-generate: reads a train.py workdir, streams the same text as generate()."""

import pathlib
import subprocess
import sys

import numpy as np
import optax
import pytest

from jaxbased import LanguageModel, ModelConfig, generate
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.training.checkpointing import Checkpointer
from jaxbased.training.optimizer import make_optimizer
from jaxbased.training.state import TrainState
from tests.conftest import init_model

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir laid out as train.py leaves it: one checkpoint of a byte-level tiny BASED."""
    config = ModelConfig.from_preset("based_tiny", vocab_size=257, init_std=0.2)
    _, params = init_model(config)
    path = tmp_path_factory.mktemp("run")
    checkpointer = Checkpointer(path, async_save=False)
    metadata = {"model": config.to_dict(), "tokenizer": ByteTokenizer().spec()}
    optimizer = make_optimizer(optax.constant_schedule(1e-3))
    state = TrainState.create(params, optimizer).replace(step=np.int32(5))
    checkpointer.save(5, state, {}, metadata)
    checkpointer.close()
    return path, config, params


def run_cli(*flags, stdin=None):
    command = [sys.executable, "-m", "jaxbased.cli.generate", *flags]
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_streams_the_greedy_continuation_of_stdin(workdir):
    path, config, params = workdir
    prompt = "Hello wörld"  # multi-byte characters go through the streaming decoder
    done = run_cli(
        f"--workdir={path}", "--max_new_tokens=24", "--temperature=0", "--nostop_at_eos",
        stdin=prompt,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    tokenizer = ByteTokenizer()
    expected = generate(
        LanguageModel(config),
        params,
        [tokenizer.encode(prompt)],
        max_new_tokens=24,
        temperature=0,
    )
    assert done.stdout == prompt + tokenizer.decode(expected.tokens[0]) + "\n"
    assert "tokens/s" in done.stderr


def test_prompt_file_and_several_samples(workdir, tmp_path):
    path, _, _ = workdir
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Once upon", encoding="utf-8")
    done = run_cli(
        f"--workdir={path}", f"--prompt_file={prompt_file}", "--num_samples=2",
        "--max_new_tokens=6", "--seed=3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Once upon") == 2 and "--- sample 1" in done.stdout
    both = run_cli(f"--workdir={path}", "--prompt=a", "b")
    assert both.returncode != 0 and "one way only" in both.stderr
