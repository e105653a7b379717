"""The step loop between host checks: no device-to-host transfer, batches fetched one step ahead
(resuming exactly), non-finite steps skipped on the device, profiling a range of steps."""

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src import array as jax_array
from jax._src import config as jax_config

import jaxbased.training.loop as loop_module
import jaxbased.training.setup as training_setup
from jaxbased import ModelConfig
from jaxbased.training.checkpointing import Checkpointer, load_for_inference
from jaxbased.training.loop import NonFiniteLossError, TrainResult, train
from jaxbased.training.optimizer import make_optimizer
from jaxbased.training.prefetch import DevicePrefetcher
from jaxbased.training.profiling import parse_profile_steps
from jaxbased.training.state import TrainState
from jaxbased.training.steps import (
    make_train_step,
    no_non_finite_step,
    stop_updates_after_non_finite,
)
from tests.conftest import init_model
from tests.test_training import TINY_MODEL, corpus, replay_training, tiny_config  # noqa: F401

#: Steps 1..8: logs at 4 and 8, an evaluation at 6, checkpoints at 3, 6 and 8 (the last step).
LOOP = dict(num_steps=8, log_every=4, eval_every=6, checkpoint_every=3)
HOST_CHECK_STEPS = {3, 4, 6, 8}
OUT_OF_VOCABULARY = 1 << 30  # its embedding row is NaN (jnp.take fills out-of-range rows)
#: One MLP block: the cheapest model to compile; what these tests check is the loop around it.
ONE_BLOCK = dict(TINY_MODEL, num_layers=1, layer_pattern=("mlp",))


def loop_config(data_path: pathlib.Path, **train_overrides):
    """``tiny_config`` with the one-block model and the :data:`LOOP` schedule."""
    config = tiny_config(data_path, **{**LOOP, **train_overrides})
    config.model.update(num_layers=1, layer_pattern=("mlp",))
    return config


def emulate_the_guard_on_cpu(
    monkeypatch: pytest.MonkeyPatch, on_read: Callable[[], int] = lambda: 0
) -> list[tuple[int, str]]:
    """Make ``jax.transfer_guard_device_to_host("disallow")`` effective on the CPU backend too.

    XLA:CPU hands arrays to NumPy without a copy, so the guard never fires there (JAX checks it
    only where a copy to the host happens). The scalar conversions of a ``jax.Array``
    (``float``, ``int``, ``bool``, ``operator.index``), ``.tolist()``, ``str`` and formatting,
    and ``jax.device_get`` read ``ArrayImpl._value``; this fixture makes that read raise while
    the calling thread's device-to-host guard says ``disallow``, as an accelerator's transfer
    would (stricter: it refuses explicit ``device_get`` too). ``np.asarray`` and ``.item()``
    take the CPU buffer without that read and are left to the real guard on accelerators.
    Returns the reads it allowed, as ``(on_read(), guard level)``.
    """
    original = jax_array.ArrayImpl._value
    allowed_reads: list[tuple[int, str]] = []

    def guarded_value(self):
        level = jax_config.transfer_guard_device_to_host.value
        if level in ("disallow", "disallow_explicit"):
            raise RuntimeError(f"Disallowed device-to-host transfer: {self.aval}")
        allowed_reads.append((on_read(), str(level)))
        return original.fget(self)

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(guarded_value))
    return allowed_reads


@pytest.fixture
def guard_every_device_value(monkeypatch) -> list[tuple[int, str]]:
    return emulate_the_guard_on_cpu(monkeypatch)


def read_train_lines(workdir: pathlib.Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if line["split"] == "train"}


def read_eval_steps(workdir: pathlib.Path) -> list[int]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if line["split"] == "eval"]


def checkpoint_params(workdir: pathlib.Path, step: int | None = None) -> list[np.ndarray]:
    return jax.tree.leaves(load_for_inference(workdir, step)[1])


def assert_same_leaves(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise


@dataclasses.dataclass
class GuardedRun:
    result: TrainResult
    guard_at_dispatch: list[str]  # the device-to-host guard level as each step was dispatched
    reads: list[tuple[int, str]]  # (steps dispatched so far, guard level) of each device read


@pytest.fixture(scope="module")
def guarded_run(corpus, tmp_path_factory) -> GuardedRun:  # noqa: F811
    """Eight steps of the tiny config under the transfer guard (with its CPU emulation),
    recording where the loop read device values."""
    workdir = tmp_path_factory.mktemp("guarded") / "run"
    guard_at_dispatch: list[str] = []
    wrap = loop_module.stop_updates_after_non_finite

    def recording(train_step):
        step = wrap(train_step)

        def recorded_step(*args):
            guard_at_dispatch.append(str(jax_config.transfer_guard_device_to_host.value))
            return step(*args)

        return recorded_step

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "stop_updates_after_non_finite", recording)
        levels = emulate_the_guard_on_cpu(patch, on_read=lambda: len(guard_at_dispatch))
        result = train(loop_config(corpus), workdir, disallow_transfers_between_checks=True)
    return GuardedRun(result, guard_at_dispatch, levels)


def test_steps_between_host_checks_read_nothing_from_the_devices(guarded_run, corpus):  # noqa: F811
    workdir = guarded_run.result.workdir
    assert guarded_run.result.final_step == 8 and not guarded_run.result.preempted
    # Every step was dispatched under the guard; device values were read (through the hook
    # that refuses them under the guard) before the first step and at host checks only.
    assert guarded_run.guard_at_dispatch == ["disallow"] * 8
    read_steps = {step for step, _ in guarded_run.reads}
    assert {0, 4, 8} <= read_steps <= {0} | HOST_CHECK_STEPS
    lines = read_train_lines(workdir)
    assert sorted(lines) == [4, 8]
    assert read_eval_steps(workdir) == [0, 6, 8]
    # Each checkpoint's data state is the one after its step's batch (Grain's next_index), not
    # after the batch fetched ahead.
    for step in (3, 6, 8):
        data_state = json.loads(
            (workdir / "checkpoints" / str(step) / "data" / "metadata").read_text()
        )
        assert data_state["next_index"] == step
    # The logged metrics are those of the logged step itself: the losses of a replay of the run
    # outside the loop, step by step (make_train_step, float(loss) after every step), up to
    # float32 rounding (the loop's step is compiled differently).
    _, losses = replay_training(loop_config(corpus), 8)
    np.testing.assert_allclose(
        [lines[4]["loss"], lines[8]["loss"]], [losses[3], losses[7]], rtol=1e-6
    )
    assert abs(losses[7] - losses[6]) > 1e-3  # so a neighbouring step's loss would not pass
    for line in lines.values():
        assert line["step_time"] > 0 and line["tokens_per_second"] > 0
        assert "update_skipped" not in line


def test_the_emulated_guard_refuses_a_read_only_inside_the_guard(guard_every_device_value):
    value = jnp.arange(3.0) + 1
    with jax.transfer_guard_device_to_host("disallow"):
        with pytest.raises(RuntimeError, match="Disallowed device-to-host transfer"):
            float(value[1])
        for read in (lambda: int(value[0]), lambda: bool(value[0]), lambda: f"{value[0]}"):
            with pytest.raises(RuntimeError, match="Disallowed device-to-host transfer"):
                read()
        with pytest.raises(RuntimeError, match="Disallowed device-to-host transfer"):
            jax.device_get(value)
        with jax.transfer_guard_device_to_host("allow"):
            assert float(value[2]) == 3.0
    assert float(value[0]) == 1.0
    assert [level for _, level in guard_every_device_value] == ["allow", "None"]


def test_resume_between_logs_is_exact_and_profile_steps_writes_a_trace(
    guarded_run,
    corpus,  # noqa: F811
    tmp_path,
):
    # The checkpoint of step 3 was saved while batch 4 had already been fetched ahead: its data
    # state must be that after batch 3, or the resumed run would skip a batch. The resumed run
    # also traces steps 5..6 (one run serves both, to keep the suite fast).
    reference = guarded_run.result.workdir
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for step in (6, 8):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    (resumed / "metrics.jsonl").unlink()
    result = train(loop_config(corpus, profile_steps="5,6"), resumed)
    assert result.final_step == 8 and result.initial_eval is None
    traces = list((resumed / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert_same_leaves(checkpoint_params(resumed), checkpoint_params(reference))
    seen, expected = read_train_lines(resumed), read_train_lines(reference)
    assert seen[8]["batch_checksum"] == expected[8]["batch_checksum"]
    assert seen[8]["loss"] == expected[8]["loss"]


class PoisonedIterator:
    """The training iterator, with one token of batch ``poisoned`` (1-based) out of the
    vocabulary, so that the loss of that step is NaN."""

    def __init__(self, iterator, poisoned: int) -> None:
        self.iterator, self.poisoned, self.count = iterator, poisoned, 0

    def __next__(self):
        batch = next(self.iterator)
        self.count += 1
        if self.count == self.poisoned:
            batch = batch.copy()
            batch[0, 0] = OUT_OF_VOCABULARY
        return batch

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def test_a_non_finite_step_stops_at_the_next_check_with_the_last_good_checkpoint(
    guarded_run,
    corpus,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    # NaN at step 5, which is no host check: the loop learns of it at step 6 (a checkpoint
    # step) and must name step 5, save nothing of step 5 or later, and keep step 3's checkpoint.
    workdir = tmp_path / "nan"
    make_iterator = training_setup.make_iterator
    monkeypatch.setattr(
        training_setup,
        "make_iterator",
        lambda *args, **kwargs: PoisonedIterator(make_iterator(*args, **kwargs), poisoned=5),
    )
    with pytest.raises(NonFiniteLossError, match=r"loss nan, grad_norm nan at step 5;") as error:
        train(loop_config(corpus), workdir)
    assert "stopped at step 6" in str(error.value) and "checkpoint: step 3" in str(error.value)
    assert Checkpointer(workdir).latest_step() == 3
    assert sorted(read_train_lines(workdir)) == [4]  # nothing logged at or after step 5
    # The kept checkpoint is the uninterrupted run's step 3, bit for bit, data state included
    # (that checkpoint resumes exactly: test_resume_between_logs_is_exact_...).
    reference = guarded_run.result.workdir
    assert_same_leaves(checkpoint_params(workdir, 3), checkpoint_params(reference, 3))
    for item in ("data", "metadata"):
        saved = (workdir / "checkpoints" / "3" / item / "metadata").read_text()
        assert saved == (reference / "checkpoints" / "3" / item / "metadata").read_text()


def test_a_non_finite_step_leaves_the_state_unchanged_and_later_steps_too(rng):
    model, params = init_model(ModelConfig(**ONE_BLOCK))
    schedule = optax.constant_schedule(1e-3)
    optimizer = make_optimizer(schedule)
    good = [jnp.asarray(rng.integers(0, 257, size=(2, 9)), jnp.int32) for _ in range(3)]
    bad = good[1].at[0, 0].set(OUT_OF_VOCABULARY)

    def leaves(state):
        return [np.array(leaf) for leaf in jax.tree.leaves(state)]

    # The plain step: a non-finite step returns its input state, step counter included.
    step = make_train_step(model, optimizer, schedule)
    state, _ = step(TrainState.create(params, optimizer), good[0])
    before = leaves(state)
    state, metrics = step(state, bad)
    assert np.isnan(float(metrics["loss"])) and float(metrics["update_skipped"]) == 1.0
    assert_same_leaves(leaves(state), before)
    assert int(state.step) == 1
    state, metrics = step(state, good[1])
    assert float(metrics["update_skipped"]) == 0.0 and int(state.step) == 2

    # The loop's step: once a step was non-finite, no later step updates, and the record names
    # the first such step (1-based) with its loss.
    guarded = stop_updates_after_non_finite(make_train_step(model, optimizer, schedule))
    state, record = TrainState.create(params, optimizer), jax.device_put(no_non_finite_step())
    state, _, record = guarded(state, good[0], record)
    after_first = leaves(state)
    state, _, record = guarded(state, bad, record)
    state, metrics, record = guarded(state, good[2], record)  # finite, but after the bad one
    assert float(metrics["update_skipped"]) == 0.0
    assert_same_leaves(leaves(state), after_first)
    assert int(record["step"]) == 2 and np.isnan(float(record["loss"]))


def test_prefetched_batches_carry_the_state_after_themselves():
    class Counter:
        def __init__(self):
            self.position = 0

        def __next__(self):
            self.position += 1
            return np.full((2, 3), self.position, np.int32)

        def get_state(self):
            return {"position": self.position}

    counter = Counter()
    puts: list[int] = []
    prefetcher = DevicePrefetcher(counter, put=lambda batch: puts.append(int(batch[0, 0])) or batch)
    first = prefetcher.next()
    prefetcher.prefetch()  # batch 2 is read and put while "step 1" runs
    assert puts == [1, 2] and counter.position == 2
    assert first.data_state == {"position": 1} and int(first.host[0, 0]) == 1
    second = prefetcher.next()
    assert second.data_state == {"position": 2} and puts == [1, 2]
    with pytest.raises(ValueError, match="needs a sharding or a put function"):
        DevicePrefetcher(counter)


@pytest.mark.parametrize(
    "value", ["3", "1,2,3", "a,b", "3,3", "4,2", "0,2", "2,13", "1.5,3", (1, 3)]
)
def test_bad_profile_steps_are_named_before_anything_is_written(value, corpus, tmp_path):  # noqa: F811
    with pytest.raises(
        ValueError,
        match=r"train\.profile_steps=.* must be two integers START,END "
        r"with 1 <= START < END <= train\.num_steps=12",
    ):
        parse_profile_steps(value, 12)
    if isinstance(value, str):
        config = tiny_config(corpus, profile_steps=value)
        with pytest.raises(ValueError, match=r"train\.profile_steps="):
            train(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_profile_steps_accepts_a_range_or_nothing():
    assert parse_profile_steps("", 12) is None
    assert parse_profile_steps("2,5", 12) == (2, 5)
    assert parse_profile_steps(" 1 , 12 ", 12) == (1, 12)
