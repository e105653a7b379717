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

The loop never waits for the devices except at a *host check*: a log step (every
``train.log_every`` and the last), an evaluation step, a checkpoint step (every
``train.checkpoint_every``, and after SIGTERM). On every other step it dispatches the jitted step
and puts the next batch on the devices (:mod:`jaxbased.training.prefetch`) while the step runs;
no value comes back to the host. Metrics are fetched only when they are logged, so ``step_time``,
``tokens_per_second`` and ``mfu`` are averages over the steps since the previous host check
(wall time / steps), which is what the devices sustained under asynchronous dispatch.

A non-finite loss or gradient norm skips that update and every later one on the devices
(:func:`jaxbased.training.steps.stop_updates_after_non_finite`); the next host check raises
:class:`NonFiniteLossError` naming the first such step, before anything of that step or later is
logged, evaluated or saved, so the last checkpoint is the last good state.

**Distillation.** With ``config.distill.teacher_workdir`` set, steps ``1 .. distill.steps`` run
the EchoAtt distillation step (:mod:`jaxbased.training.distill_run`) with the teacher's
parameters as an extra argument, and the later steps the language-model step; which one a step
runs depends on its number only, so a resumed run continues in the right phase.

:func:`jaxbased.training.setup.setup_run` prepares the run (config, workdir, data, model,
optimizer, mesh, checkpoints, resume); :func:`train` runs its steps, evaluations and saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from jaxbased.sharding import LOGICAL_RULES
from jaxbased.training.metrics import format_duration, progress_line
from jaxbased.training.prefetch import DevicePrefetcher
from jaxbased.training.profiling import StepProfiler, parse_profile_steps
from jaxbased.training.setup import format_eval, setup_run
from jaxbased.training.steps import evaluate, no_non_finite_step, stop_updates_after_non_finite


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN or infinite; the run stopped without saving the
    state of that step or any later one."""


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


def _transfer_guard(level: str, enabled: bool) -> contextlib.AbstractContextManager:
    """``jax.transfer_guard_device_to_host(level)`` when ``enabled``, else nothing."""
    return jax.transfer_guard_device_to_host(level) if enabled else contextlib.nullcontext()


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    disallow_transfers_between_checks: bool = False,
) -> TrainResult:
    """Train (or resume) the model of ``config`` in ``workdir``; see the module docstring.

    With ``disallow_transfers_between_checks`` the steps run under
    ``jax.transfer_guard_device_to_host("disallow")`` except inside the host checks (log,
    evaluation and checkpoint steps): any implicit device-to-host transfer elsewhere in the loop
    raises. Tests use it to show that the loop does not wait for the devices between checks.
    """
    train_config, data_config = config.train, config.data
    profile_steps = parse_profile_steps(
        train_config.get("profile_steps", ""), train_config.num_steps
    )
    run = setup_run(config, workdir)
    state, iterator, checkpointer, writer = run.state, run.iterator, run.checkpointer, run.writer
    eval_step = run.eval_step
    validation, data_sharding, metadata = run.validation, run.data_sharding, run.metadata
    flops, peak, initial_eval = run.flops, run.peak, run.initial_eval
    tokens_per_step = data_config.batch_size * data_config.seq_len
    num_steps = train_config.num_steps
    train_step = stop_updates_after_non_finite(run.train_step)
    distillation = run.distillation
    last_distill_step, distill_step, teacher_params = 0, None, None
    if distillation is not None and distillation.train_step is not None:
        last_distill_step = distillation.steps
        distill_step = stop_updates_after_non_finite(distillation.train_step)
        teacher_params = distillation.teacher_params
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    non_finite = jax.device_put(no_non_finite_step(), replicated)
    batches = DevicePrefetcher(iterator, put=run.put_batch)
    profiler = StepProfiler(profile_steps, run.workdir)
    stop = _StopFlag()
    stop.install()

    step = int(state.step)
    first_step, last_saved, preempted = step, run.resumed_step, False
    data_state = iterator.get_state()  # after the last consumed batch
    start_time = time.monotonic()
    final_eval: dict[str, float] = {}

    def check_finite() -> None:
        """Raise NonFiniteLossError if a step since the last check was not finite."""
        record = {key: value.item() for key, value in jax.device_get(non_finite).items()}
        if record["step"]:
            checkpointer.wait()
            raise NonFiniteLossError(
                f"loss {record['loss']}, grad_norm {record['grad_norm']} at step "
                f"{record['step']}; its update and every later one were skipped and the run "
                f"stopped at step {step} without saving them (last complete checkpoint: step "
                f"{checkpointer.latest_step()})"
            )

    def log_step(metrics: dict[str, jax.Array], host_batch: np.ndarray) -> None:
        """Fetch and log the metrics of ``step``, timed over the steps since the last check."""
        values = {
            key: float(value)
            for key, value in jax.device_get(metrics).items()
            if key != "update_skipped"
        }
        step_time = (time.monotonic() - interval_start[0]) / (step - interval_start[1])
        values.update(
            step_time=step_time,
            tokens_per_second=tokens_per_step / step_time,
            mfu=flops["total"] * tokens_per_step / step_time / peak,
            batch_checksum=_checksum(host_batch),
        )
        eta = (time.monotonic() - start_time) / (step - first_step) * (num_steps - step)
        logging.info(progress_line(step, num_steps, values, eta))
        if writer is not None:
            writer.write(step, "train", values)

    def save() -> None:
        check_finite()  # never save the state of a non-finite step or a later one
        checkpointer.save(step, state, data_state, metadata)

    # The time of the steps since the last host check (the devices are idle after each check).
    interval_start = (time.monotonic(), step)
    context = contextlib.ExitStack()
    context.enter_context(jax.set_mesh(run.mesh))
    context.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    try:
        if initial_eval is not None and writer is not None:
            writer.write(0, "eval", initial_eval)
        with _transfer_guard("disallow", disallow_transfers_between_checks):
            while step < num_steps:
                step += 1
                profiler.before_step(step)
                batch = batches.next()
                if step <= last_distill_step:
                    state, metrics, non_finite = distill_step(
                        state, batch.device, non_finite, teacher_params
                    )
                    if step == last_distill_step and step < num_steps:
                        logging.info(
                            "step %d is the last distillation step; language-model training from "
                            "step %d",
                            step,
                            step + 1,
                        )
                else:
                    state, metrics, non_finite = train_step(state, batch.device, non_finite)
                if step < num_steps:
                    batches.prefetch()  # batch step + 1 goes to the devices while step runs
                data_state = batch.data_state
                profiler.after_step(step, state)
                log = step % train_config.log_every == 0 or step == num_steps
                evaluate_now = step % train_config.eval_every == 0 and step < num_steps
                stopping = stop.event.is_set()  # read once: a signal may arrive meanwhile
                save_now = stopping or step % train_config.checkpoint_every == 0
                if not (log or evaluate_now or save_now):
                    continue
                with _transfer_guard("allow", disallow_transfers_between_checks):
                    check_finite()
                    if log:
                        log_step(metrics, batch.host)
                    if evaluate_now:
                        evaluation = evaluate(eval_step, state.params, validation, data_sharding)
                        logging.info("step %d evaluation: %s", step, format_eval(evaluation))
                        if writer is not None:
                            writer.write(step, "eval", evaluation)
                    if save_now:
                        save()
                        last_saved = step
                    interval_start = (time.monotonic(), step)
                if stopping:
                    preempted = True
                    logging.warning("stopping at step %d after SIGTERM; checkpoint saved", step)
                    break
        if not preempted:
            if last_saved != step:
                save()
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
        profiler.stop()
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
