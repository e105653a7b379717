"""The training loop behind ``train.py``: data, model, optimizer, checkpoints, metrics.

A run lives in a workdir::

    checkpoints/<step>/   Orbax checkpoints (train state, data iterator state, metadata)
    tokenizer/            the tokenizer of the training data (for generation)
    builtin_data/         the built-in corpus, tokenized, when no data path is given
    metrics.jsonl         one JSON line per logged train step and per evaluation
    tensorboard/          TensorBoard event files

Restarting with the same workdir resumes from the latest complete checkpoint, with the data
iterator where it was, so the resumed run computes exactly what an uninterrupted one would.
SIGTERM makes the loop save at the end of the current step and return.

:func:`jaxbased.training.setup.setup_run` prepares the run (config, workdir, data, model,
optimizer, mesh, checkpoints, resume); :func:`train` runs its steps, evaluations and saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from jaxbased.sharding import LOGICAL_RULES, global_batch
from jaxbased.training.metrics import format_duration, progress_line
from jaxbased.training.setup import format_eval, setup_run
from jaxbased.training.steps import evaluate


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without saving that state."""


@dataclasses.dataclass
class TrainResult:
    """What a run reports when it returns."""

    workdir: pathlib.Path
    final_step: int
    initial_eval: dict[str, float] | None
    final_eval: dict[str, float]
    preempted: bool
    parameters: int
    checkpoint_dir: pathlib.Path
    is_writer: bool = True


class _StopFlag:
    """Set by SIGTERM; the loop checks it after every step."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        logging.warning("signal %d received: saving a checkpoint after this step", signum)
        self.event.set()

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _checksum(batch: np.ndarray) -> int:
    """A cheap fingerprint of a batch, logged so that two runs' batches can be compared."""
    weights = np.arange(1, batch.size + 1, dtype=np.int64).reshape(batch.shape)
    return int((batch.astype(np.int64) * weights).sum() % 2_147_483_647)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> TrainResult:
    """Train (or resume) the model of ``config`` in ``workdir``; see the module docstring."""
    run = setup_run(config, workdir)
    train_config, data_config = config.train, config.data
    state, iterator, checkpointer, writer = run.state, run.iterator, run.checkpointer, run.writer
    train_step, eval_step = run.train_step, run.eval_step
    validation, data_sharding, metadata = run.validation, run.data_sharding, run.metadata
    flops, peak, initial_eval = run.flops, run.peak, run.initial_eval
    tokens_per_step = data_config.batch_size * data_config.seq_len
    stop = _StopFlag()
    stop.install()

    step = int(state.step)
    first_step, last_saved, preempted = step, run.resumed_step, False
    start_time = time.monotonic()
    final_eval: dict[str, float] = {}
    context = contextlib.ExitStack()
    context.enter_context(jax.set_mesh(run.mesh))
    context.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    try:
        if initial_eval is not None and writer is not None:
            writer.write(0, "eval", initial_eval)
        while step < train_config.num_steps:
            step_start = time.monotonic()
            local_batch = next(iterator)
            checksum = _checksum(local_batch)
            state, metrics = train_step(state, global_batch(local_batch, data_sharding))
            loss = float(metrics["loss"])
            step += 1
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step}; the run stopped without saving this state "
                    f"(last complete checkpoint: step {checkpointer.latest_step()})"
                )
            step_time = time.monotonic() - step_start
            if step % train_config.log_every == 0 or step == train_config.num_steps:
                values = {key: float(value) for key, value in metrics.items()}
                values.update(
                    step_time=step_time,
                    tokens_per_second=tokens_per_step / step_time,
                    mfu=flops["total"] * tokens_per_step / step_time / peak,
                    batch_checksum=checksum,
                )
                elapsed = time.monotonic() - start_time
                eta = elapsed / (step - first_step) * (train_config.num_steps - step)
                logging.info(progress_line(step, train_config.num_steps, values, eta))
                if writer is not None:
                    writer.write(step, "train", values)
            if step % train_config.eval_every == 0 and step < train_config.num_steps:
                evaluation = evaluate(eval_step, state.params, validation, data_sharding)
                logging.info("step %d evaluation: %s", step, format_eval(evaluation))
                if writer is not None:
                    writer.write(step, "eval", evaluation)
            if stop.event.is_set() or step % train_config.checkpoint_every == 0:
                checkpointer.save(step, state, iterator.get_state(), metadata)
                last_saved = step
            if stop.event.is_set():
                preempted = True
                logging.warning("stopping at step %d after SIGTERM; checkpoint saved", step)
                break
        if not preempted:
            if last_saved != step:
                checkpointer.save(step, state, iterator.get_state(), metadata)
            final_eval = evaluate(eval_step, state.params, validation, data_sharding)
            logging.info("final evaluation (step %d): %s", step, format_eval(final_eval))
            if writer is not None:
                writer.write(step, "eval", final_eval)
            logging.info(
                "trained %d steps in %s",
                step - first_step,
                format_duration(time.monotonic() - start_time),
            )
    finally:
        context.close()
        stop.uninstall()
        run.close()
    return TrainResult(
        workdir=run.workdir,
        final_step=step,
        initial_eval=initial_eval,
        final_eval=final_eval,
        preempted=preempted,
        parameters=run.parameters,
        checkpoint_dir=checkpointer.directory,
        is_writer=run.is_writer,
    )
