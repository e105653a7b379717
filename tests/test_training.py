import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.demo import get_config
from jaxbased import LanguageModel, ModelConfig
from jaxbased.data import ByteTokenizer, Document, write_token_dataset
from jaxbased.training.checkpointing import (
    Checkpointer,
    IncompatibleCheckpointError,
    check_compatible,
    load_for_inference,
)
from jaxbased.training.loop import NonFiniteLossError, train
from jaxbased.training.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from jaxbased.training.setup import optimizer_from_config
from jaxbased.training.state import TrainState
from jaxbased.training.steps import make_train_step
from tests.conftest import init_model, model_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = dict(
    vocab_size=257,
    d_model=32,
    num_layers=3,
    layer_pattern=("base_conv", "based", "sliding_window"),
    mlp=dict(inner_dim=64, multiple_of=32),
    based=dict(heads=2, feature_dim=4, chunk_size=8),
    sliding_window=dict(heads=2, window=8),
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    documents = [Document(f"doc{i}", " ".join(rng.choice(words, size=200)) + ".") for i in range(8)]
    path = tmp_path_factory.mktemp("corpus") / "data"
    return write_token_dataset(documents, ByteTokenizer(), path, validation_fraction=0.1)


def tiny_config(data_path: pathlib.Path, **train_overrides):
    config = get_config()
    config.model.update(TINY_MODEL)
    config.data.update(path=str(data_path), seq_len=32, batch_size=4, prefetch_threads=1)
    config.train.update(
        num_steps=12,
        learning_rate=3e-3,
        final_learning_rate=3e-4,
        warmup_steps=2,
        log_every=1,
        eval_every=1000,
        eval_batches=1,
        checkpoint_every=3,
        keep_checkpoints=10,
        tensorboard=False,
        peak_flops=1e11,
    )
    config.train.update(train_overrides)
    config.sample.max_new_tokens = 0
    return config


def command_line(data_path: pathlib.Path, workdir: pathlib.Path, **train_overrides) -> list[str]:
    config = tiny_config(data_path, **train_overrides)
    flags = model_flags(TINY_MODEL)
    flags.append(f"--config.model.layer_pattern={TINY_MODEL['layer_pattern']!r}".replace(" ", ""))
    flags += [f"--config.data.{k}={config.data[k]}" for k in ("path", "seq_len", "batch_size")]
    flags += [f"--config.data.prefetch_threads={config.data.prefetch_threads}"]
    flags += [f"--config.train.{k}={v}" for k, v in config.train.items()]
    flags += ["--config.sample.max_new_tokens=0", f"--workdir={workdir}"]
    return [sys.executable, str(REPO / "train.py"), "--config=configs/demo.py", *flags]


def train_lines(workdir: pathlib.Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if line["split"] == "train"}


def final_params(workdir: pathlib.Path):
    _, params, _ = load_for_inference(workdir)
    return jax.tree.leaves(params)


def test_schedule_follows_the_recipe():
    schedule = learning_rate_schedule(peak=8e-4, final=8e-5, warmup_steps=200, total_steps=20_000)
    np.testing.assert_allclose(schedule(0), 1e-6, rtol=1e-4)  # float32 arithmetic
    np.testing.assert_allclose(schedule(100), 1e-6 + (8e-4 - 1e-6) / 2, rtol=1e-6)
    np.testing.assert_allclose(schedule(200), 8e-4, rtol=1e-6)
    np.testing.assert_allclose(schedule(200 + 19_800 // 2), (8e-4 + 8e-5) / 2, rtol=1e-5)
    np.testing.assert_allclose(schedule(20_000), 8e-5, rtol=1e-6)


def test_weight_decay_spares_biases_norms_and_embeddings():
    _, params = init_model(ModelConfig(**TINY_MODEL))
    mask = weight_decay_mask(params)
    assert mask["embedding"] is False
    conv = mask["layers_0"]
    assert conv["norm1"]["weight"] is False and conv["mixer"]["in_proj"]["bias"] is False
    assert conv["mixer"]["in_proj"]["kernel"] is True and conv["mixer"]["conv_weight"] is True
    assert conv["mlp"]["fc2"]["kernel"] is True


def test_weight_decay_spares_the_state_space_parameters():
    # mamba_ssm marks A_log and D "_no_weight_decay"; dt and conv biases are biases.
    mamba = ModelConfig.from_preset("mamba_tiny", num_layers=1, layer_pattern=("mamba",))
    mamba2 = ModelConfig.from_preset("mamba2_tiny", num_layers=1, layer_pattern=("mamba2",))
    for config in (mamba, mamba2):
        mixer = weight_decay_mask(jax.eval_shape(lambda c=config: init_model(c)[1]))
        mixer = mixer["layers_0"]["mixer"]
        assert mixer["A_log"] is False and mixer["D"] is False, config.layer_pattern
        assert mixer["in_proj"]["kernel"] is True and mixer["out_proj"]["kernel"] is True


def test_checkpoint_without_a_newer_field_counts_it_as_its_default(tmp_path):
    config = ModelConfig(**TINY_MODEL)
    saved = config.to_dict()
    del saved["use_mlp"], saved["norm"]  # written before these fields existed
    check_compatible(saved, config, tmp_path)
    with pytest.raises(IncompatibleCheckpointError, match="use_mlp: checkpoint True vs config"):
        check_compatible(saved, config.replace(use_mlp=False), tmp_path)


def test_gradient_accumulation_equals_one_big_batch(rng):
    config = ModelConfig(**TINY_MODEL)
    model, params = init_model(config)
    schedule = optax.constant_schedule(1e-3)
    optimizer = make_optimizer(schedule)
    batch = jnp.asarray(rng.integers(0, 257, size=(8, 17)), jnp.int32)
    results = []
    for accumulation in (1, 4):
        step = make_train_step(model, optimizer, schedule, accumulation)
        state, metrics = step(TrainState.create(params, optimizer), batch)
        results.append((jax.tree.leaves(state.params), float(metrics["loss"])))
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)
    for a, b in zip(results[0][0], results[1][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_tiny_model_overfits_repeated_text(tmp_path):
    # 16 bytes, so that every 32-token window starts at the same phase of the sentence.
    text = "hello, jaxbased! "[:16] * 150
    data = write_token_dataset(
        [Document("repeat", text)], ByteTokenizer(), tmp_path / "data", progress=False
    )
    config = tiny_config(
        data,
        num_steps=150,
        learning_rate=1e-2,
        final_learning_rate=1e-3,
        warmup_steps=10,
        checkpoint_every=1000,
        log_every=50,
        weight_decay=0.0,
    )
    config.model.update(d_model=64)
    config.model.mlp.inner_dim = 128
    config.model.based.heads = 4
    result = train(config, tmp_path / "run")
    assert result.final_step == 150 and not result.preempted
    assert result.initial_eval["loss"] > 4.0
    assert result.final_eval["loss"] < 0.05 and result.final_eval["accuracy"] > 0.99


def test_sigterm_then_restart_equals_an_uninterrupted_run(corpus, tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(command_line(corpus, reference), check=True, capture_output=True, cwd=REPO)
    process = subprocess.Popen(
        command_line(corpus, interrupted),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        metrics = interrupted / "metrics.jsonl"
        if metrics.exists() and max(train_lines(interrupted), default=0) >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=240)[0].decode()
    assert process.returncode == 0, output
    assert "after SIGTERM" in output
    stopped_at = Checkpointer(interrupted).latest_step()
    assert 4 <= stopped_at < 12
    subprocess.run(command_line(corpus, interrupted), check=True, capture_output=True, cwd=REPO)

    for got, want in zip(final_params(interrupted), final_params(reference), strict=True):
        np.testing.assert_array_equal(got, want)  # bitwise
    seen, expected = train_lines(interrupted), train_lines(reference)
    assert sorted(seen) == list(range(1, 13))
    assert [seen[s]["batch_checksum"] for s in seen] == [
        expected[s]["batch_checksum"] for s in seen
    ]
    assert seen[12]["loss"] == expected[12]["loss"]


def test_sigkill_during_an_async_save_restarts_from_a_complete_checkpoint(corpus, tmp_path):
    # A wider model so that each save takes long enough to be caught in the middle.
    workdir = tmp_path / "killed"
    command = command_line(corpus, workdir, checkpoint_every=2, num_steps=10)
    command += ["--config.model.d_model=256", "--config.model.mlp.inner_dim=1024"]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = workdir / "checkpoints"
    caught = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoints.exists():
            pending = [p.name for p in checkpoints.iterdir() if "tmp" in p.name]
            steps = [int(name.split(".")[0]) for name in pending if name.split(".")[0].isdigit()]
            if steps and max(steps) >= 4:
                os.kill(process.pid, signal.SIGKILL)
                caught = max(steps)
                break
        time.sleep(0.002)
    process.wait(timeout=60)
    assert caught is not None, "no save was in progress while the run was alive"
    latest = Checkpointer(workdir).latest_step()
    assert latest is not None and latest < caught  # the half-written save is not a checkpoint
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resumed from the checkpoint of step {latest}" in finished.stderr
    assert Checkpointer(workdir).latest_step() == 10


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(corpus, tmp_path):
    config = tiny_config(
        corpus, learning_rate=1e30, final_learning_rate=1e29, warmup_steps=0, checkpoint_every=1
    )
    config.train.grad_clip = 1e30
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as error:
        train(config, tmp_path / "nan")
    failed_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
    latest = Checkpointer(tmp_path / "nan").latest_step()
    assert latest == failed_step - 1
    _, params, _ = load_for_inference(tmp_path / "nan")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_workdir_of_another_model_is_refused(corpus, tmp_path):
    train(tiny_config(corpus, num_steps=2), tmp_path / "run")
    other = tiny_config(corpus, num_steps=4)
    other.model.d_model = 48
    with pytest.raises(IncompatibleCheckpointError, match="d_model: checkpoint 32 vs config 48"):
        train(other, tmp_path / "run")


def test_bad_training_inputs_are_named(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"data\.path='/nonexistent' does not exist"):
        train(tiny_config(pathlib.Path("/nonexistent")), tmp_path / "a")
    small_vocab = tiny_config(corpus)
    small_vocab.model.vocab_size = 100
    with pytest.raises(ValueError, match="token id 256 >= model vocab_size=100"):
        train(small_vocab, tmp_path / "b")
    long = tiny_config(corpus)
    long.data.seq_len = 100_000
    with pytest.raises(ValueError, match="seq_len=100000 is longer than the data"):
        train(long, tmp_path / "c")
    assert not (tmp_path / "b" / "checkpoints").exists() or not any(
        (tmp_path / "b" / "checkpoints").iterdir()
    )


def test_unknown_config_field_is_rejected_by_train_py(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "--config.model.heads=3",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "heads" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def replay_training(config, steps: int) -> tuple[TrainState, list[float]]:
    """The train state after ``steps`` steps of ``config``, recomputed here outside the loop:
    the same initial parameters, optimizer and batches as ``train`` builds, stepped by
    ``make_train_step`` without a mesh. Also returns each step's loss."""
    from flax import linen as nn

    from jaxbased.data import TokenDataset
    from jaxbased.data.pipeline import make_iterator, training_batches

    data, run = config.data, config.train
    model = LanguageModel(ModelConfig.from_dict(config.model))
    schedule, optimizer = optimizer_from_config(run)
    sample = jnp.zeros((1, data.seq_len), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(run.seed), sample)["params"])
    state = TrainState.create(params, optimizer)
    batches = training_batches(
        TokenDataset.open(data.path),
        seq_len=data.seq_len,
        batch_size=data.batch_size,
        seed=data.seed,
    )
    iterator = make_iterator(batches, prefetch_threads=1)
    step, losses = make_train_step(model, optimizer, schedule), []
    for _ in range(steps):
        state, metrics = step(state, jnp.asarray(next(iterator)))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_loaded_model_reproduces_training_logits(corpus, tmp_path):
    config = tiny_config(corpus, num_steps=3)
    train(config, tmp_path / "run")
    loaded_config, params, tokenizer = load_for_inference(tmp_path / "run")
    assert loaded_config == ModelConfig(**TINY_MODEL) and tokenizer.vocab_size == 257

    state, losses = replay_training(config, 3)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [record["loss"] for record in records if record["split"] == "train"]
    np.testing.assert_array_equal(logged, losses)  # the replay is the run that was saved
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, size=(2, 40)), jnp.int32)
    model = LanguageModel(loaded_config)
    loaded = np.asarray(model.apply({"params": params}, tokens))
    trained = np.asarray(model.apply({"params": state.params}, tokens))
    untrained = np.asarray(model.apply({"params": replay_training(config, 0)[0].params}, tokens))
    assert np.abs(trained - untrained).max() > 1e-2  # three steps moved the logits
    # The loop's step is compiled for its (1, 1, 1) mesh with shardings, which XLA fuses a little
    # differently from the replay's plain jit: the logits agree to float32 rounding (1.2e-7
    # seen, for logits of size ~0.3), 10^4 times below what the three steps changed.
    np.testing.assert_allclose(loaded, trained, rtol=0, atol=1e-6)
