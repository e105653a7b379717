"""A damaged newest checkpoint costs nothing: training and generation fall back to the newest
intact step (with one warning naming the damaged one, which is kept), and with no intact step
left they stop with one error naming every damaged step."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging

from configs.demo import get_config
from jaxbased import LanguageModel, generate
from jaxbased.cli.logging_setup import QuietLibraries
from jaxbased.data import ByteTokenizer, Document, write_token_dataset
from jaxbased.training.checkpointing import (
    CHECKPOINT_SUBDIR,
    DAMAGED_SUBDIR,
    DamagedCheckpointError,
    load_for_inference,
)
from jaxbased.training.loop import train
from jaxbased.training.setup import setup_run

TINY_MODEL = dict(
    vocab_size=257,
    d_model=32,
    num_layers=2,
    layer_pattern=("base_conv", "based"),
    mlp=dict(inner_dim=64, multiple_of=32),
    based=dict(heads=2, feature_dim=4, chunk_size=8),
)


def tiny_config(data_path: pathlib.Path):
    config = get_config()
    config.model.update(TINY_MODEL)
    config.data.update(path=str(data_path), seq_len=16, batch_size=2, prefetch_threads=1)
    config.train.update(
        num_steps=4,
        warmup_steps=1,
        log_every=1,
        eval_every=1000,
        eval_batches=1,
        checkpoint_every=2,
        keep_checkpoints=10,
        async_checkpoints=False,
        tensorboard=False,
        peak_flops=1e11,
    )
    config.sample.max_new_tokens = 0
    return config


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """A dataset and a workdir trained 4 steps with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("damage")
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    rng = np.random.default_rng(0)
    documents = [Document(f"d{i}", " ".join(rng.choice(words, size=80))) for i in range(4)]
    data = write_token_dataset(documents, ByteTokenizer(), root / "data", validation_fraction=0.2)
    workdir = root / "run"
    train(tiny_config(data), workdir)
    assert sorted(int(p.name) for p in (workdir / CHECKPOINT_SUBDIR).iterdir()) == [2, 4]
    return data, workdir


def truncate_largest_array_file(step_folder: pathlib.Path) -> None:
    arrays = [p for p in (step_folder / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    largest = max(arrays, key=lambda path: path.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def delete_metadata(step_folder: pathlib.Path) -> None:
    (step_folder / "state" / "_METADATA").unlink()


def empty_the_folder(step_folder: pathlib.Path) -> None:
    shutil.rmtree(step_folder)
    step_folder.mkdir()


DAMAGES = {
    "truncated_array_file": truncate_largest_array_file,
    "missing_metadata": delete_metadata,
    "empty_step_folder": empty_the_folder,
}


class WarningRecorder:
    """Collects the absl WARNING messages a command shows (after its log filter) while
    installed."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __enter__(self):
        import logging

        self.handler = logging.Handler(level=logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())
        self.handler.addFilter(QuietLibraries())
        absl_logging.get_absl_logger().addHandler(self.handler)
        return self

    def __exit__(self, *exc_info) -> None:
        absl_logging.get_absl_logger().removeHandler(self.handler)


def leaves(params) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


@pytest.mark.parametrize(
    "damage, train_on", [("truncated_array_file", False), ("missing_metadata", True),
                         ("empty_step_folder", False)]
)  # fmt: skip
def test_damaged_newest_step_falls_back_to_the_previous_one(pristine, tmp_path, damage, train_on):
    data, original = pristine
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    DAMAGES[damage](workdir / CHECKPOINT_SUBDIR / "4")
    _, step2_params, _ = load_for_inference(original, step=2)
    _, step4_params, _ = load_for_inference(original, step=4)

    # Generation: the parameters of step 2, one warning naming step 4, nothing moved.
    with WarningRecorder() as recorded:
        config, params, tokenizer = load_for_inference(workdir)
    assert len(recorded.messages) == 1, recorded.messages
    assert recorded.messages[0].startswith("checkpoint step 4 of ")
    assert "damaged" in recorded.messages[0] and "using step 2" in recorded.messages[0]
    for got, want in zip(leaves(params), leaves(step2_params), strict=True):
        np.testing.assert_array_equal(got, want)
    assert (workdir / CHECKPOINT_SUBDIR / "4").is_dir()
    result = generate(
        LanguageModel(config), params, [tokenizer.encode("alpha ")], max_new_tokens=4, temperature=0
    )
    assert len(result.tokens[0]) == 4

    # Training: resumes the state step 2 saved, exactly.
    run = setup_run(tiny_config(data), workdir)
    try:
        assert run.resumed_step == 2 and int(run.state.step) == 2
        for got, want in zip(leaves(run.state.params), leaves(step2_params), strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        run.close()
    # The damaged step was set aside (kept), so that the run saves step 4 again; the resumed
    # run sees the same batches, so its step 4 equals the undamaged one bitwise (trained for one
    # damage only: each training compiles its steps anew).
    assert (workdir / DAMAGED_SUBDIR / "4").is_dir()
    assert not (workdir / CHECKPOINT_SUBDIR / "4").exists()
    if not train_on:
        return
    resumed = train(tiny_config(data), workdir)
    assert resumed.final_step == 4
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [line["step"] for line in lines if line["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 3, 4]  # the first run's, then the resumed steps 3 and 4
    _, new_step4_params, _ = load_for_inference(workdir)
    for got, want in zip(leaves(new_step4_params), leaves(step4_params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_no_intact_step_is_one_error_naming_each(pristine, tmp_path):
    data, original = pristine
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    delete_metadata(workdir / CHECKPOINT_SUBDIR / "4")
    empty_the_folder(workdir / CHECKPOINT_SUBDIR / "2")
    for load in (
        lambda: load_for_inference(workdir),
        lambda: setup_run(tiny_config(data), workdir),
    ):
        with pytest.raises(DamagedCheckpointError, match="no intact checkpoint") as error:
            load()
        message = str(error.value)
        assert "step 4: state/_METADATA is missing" in message
        assert "step 2: its folder is empty" in message and "\n" not in message
    assert sorted(p.name for p in (workdir / CHECKPOINT_SUBDIR).iterdir()) == ["2", "4"]
    assert jnp.asarray(0) == 0  # jax stays usable after the failed restores
