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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import shutil
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxbased.config import ModelConfig
from jaxbased.data.corpus import Document, builtin_corpus_files, builtin_corpus_fingerprint
from jaxbased.data.pipeline import make_iterator, training_batches, validation_batches
from jaxbased.data.token_store import TokenDataset, write_token_dataset
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.model import LanguageModel, count_parameters
from jaxbased.sharding import (
    LOGICAL_RULES,
    batch_sharding,
    global_batch,
    logical_shardings,
    make_mesh,
    with_shardings,
)
from jaxbased.training.checkpointing import TOKENIZER_SUBDIR, Checkpointer, check_compatible
from jaxbased.training.flops import flops_per_token, measure_matmul_peak
from jaxbased.training.metrics import MetricsWriter, format_duration, progress_line
from jaxbased.training.optimizer import learning_rate_schedule, make_optimizer
from jaxbased.training.state import TrainState
from jaxbased.training.steps import make_eval_step, make_train_step

BUILTIN_DATA_SUBDIR = "builtin_data"


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


def prepare_builtin_data(
    workdir: pathlib.Path, max_bytes: int, validation_fraction: float
) -> pathlib.Path:
    """Tokenize the built-in corpus (byte-level) into ``workdir/builtin_data`` once."""
    output = workdir / BUILTIN_DATA_SUBDIR
    files = builtin_corpus_files(max_bytes)
    fingerprint = builtin_corpus_fingerprint(files)
    if output.exists():
        metadata = json.loads((output / "metadata.json").read_text())
        if metadata.get("builtin_fingerprint") == fingerprint:
            return output
        logging.info("built-in corpus changed (other Python?): re-tokenizing %s", output)
    logging.info("tokenizing the built-in corpus (%d stdlib files) into %s", len(files), output)
    documents = (Document(str(p), p.read_text(encoding="utf-8", errors="replace")) for p in files)
    return write_token_dataset(
        documents,
        ByteTokenizer(),
        output,
        validation_fraction=validation_fraction,
        overwrite=True,
        progress=False,
        extra_metadata={"builtin_fingerprint": fingerprint, "builtin_max_bytes": max_bytes},
    )


def _open_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> TokenDataset:
    if config.data.path:
        path = pathlib.Path(config.data.path)
        if not path.exists():
            raise ValueError(f"data.path={config.data.path!r} does not exist")
        return TokenDataset.open(path)
    return TokenDataset.open(
        prepare_builtin_data(
            workdir, config.data.builtin_max_bytes, config.data.validation_fraction
        )
    )


def _check_vocab(dataset: TokenDataset, model_config: ModelConfig) -> None:
    max_token = int(dataset.metadata["max_token_id"])
    if max_token >= model_config.vocab_size:
        raise ValueError(
            f"the data holds token id {max_token} >= model vocab_size={model_config.vocab_size} "
            f"(its tokenizer has vocab_size {dataset.vocab_size}); set "
            f"--config.model.vocab_size={dataset.vocab_size}"
        )


def _save_tokenizer(dataset: TokenDataset, workdir: pathlib.Path) -> None:
    target = workdir / TOKENIZER_SUBDIR
    staging = workdir / f".{TOKENIZER_SUBDIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dataset.tokenizer().save(staging)
    (staging / "spec.json").write_text(json.dumps(dataset.metadata["tokenizer"]))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _local_rows(batch: np.ndarray) -> np.ndarray:
    """This process's contiguous share of the rows of a global batch."""
    local = batch.shape[0] // jax.process_count()
    return batch[jax.process_index() * local : (jax.process_index() + 1) * local]


def evaluate(
    eval_step, params: Any, batches: list[np.ndarray], sharding: Any = None
) -> dict[str, float]:
    """Mean loss, perplexity and token accuracy over global ``batches``."""
    totals = {"loss_sum": 0.0, "correct_sum": 0.0, "tokens": 0.0}
    for batch in batches:
        if sharding is not None:
            batch = global_batch(_local_rows(batch), sharding)
        for key, value in eval_step(params, batch).items():
            totals[key] += float(value)
    loss = totals["loss_sum"] / totals["tokens"]
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "accuracy": totals["correct_sum"] / totals["tokens"],
    }


def _checksum(batch: np.ndarray) -> int:
    """A cheap fingerprint of a batch, logged so that two runs' batches can be compared."""
    weights = np.arange(1, batch.size + 1, dtype=np.int64).reshape(batch.shape)
    return int((batch.astype(np.int64) * weights).sum() % 2_147_483_647)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> TrainResult:
    """Train (or resume) the model of ``config`` in ``workdir``; see the module docstring."""
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    train_config, data_config = config.train, config.data
    model_config = ModelConfig.from_dict(config.model)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_writer = process_index == 0

    mesh = make_mesh(config.mesh)
    if data_config.batch_size % (process_count * train_config.grad_accum_steps):
        raise ValueError(
            f"data.batch_size={data_config.batch_size} must be divisible by process_count * "
            f"train.grad_accum_steps = {process_count * train_config.grad_accum_steps}"
        )
    if train_config.num_steps < 1:
        raise ValueError(f"train.num_steps={train_config.num_steps} must be >= 1")

    dataset = _open_data(config, workdir)
    _check_vocab(dataset, model_config)
    batches = training_batches(
        dataset,
        seq_len=data_config.seq_len,
        batch_size=data_config.batch_size,
        seed=data_config.seed,
        process_index=process_index,
        process_count=process_count,
    )
    validation = validation_batches(
        dataset,
        seq_len=data_config.seq_len,
        batch_size=data_config.batch_size,
        max_batches=train_config.eval_batches,
    )

    model = LanguageModel(model_config)
    schedule = learning_rate_schedule(
        peak=train_config.learning_rate,
        final=train_config.final_learning_rate,
        warmup_steps=train_config.warmup_steps,
        total_steps=train_config.num_steps,
        warmup_init=train_config.warmup_init,
    )
    optimizer = make_optimizer(
        schedule,
        beta1=train_config.beta1,
        beta2=train_config.beta2,
        eps=train_config.eps,
        weight_decay=train_config.weight_decay,
        grad_clip=train_config.grad_clip,
    )

    def init_boxed_state() -> TrainState:
        # Parameters still in their logical-axis boxes, so that the optimizer state built from
        # them carries the same names (mu and nu are sharded like the parameters).
        sample = jnp.zeros((1, data_config.seq_len), jnp.int32)
        params = model.init(jax.random.key(train_config.seed), sample)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    abstract_boxed = jax.eval_shape(init_boxed_state)
    state_shardings = logical_shardings(abstract_boxed, mesh)
    init_state = jax.jit(lambda: nn.meta.unbox(init_boxed_state()), out_shardings=state_shardings)
    data_sharding = batch_sharding(mesh)

    checkpointer = Checkpointer(
        workdir, keep=train_config.keep_checkpoints, async_save=train_config.async_checkpoints
    )
    iterator = make_iterator(batches, prefetch_threads=data_config.prefetch_threads)
    latest = checkpointer.latest_step()
    initial_eval = None
    eval_step = make_eval_step(model)
    if latest is not None:
        check_compatible(checkpointer.metadata(latest)["model"], model_config, workdir)
        target = with_shardings(abstract_boxed, state_shardings)
        state, data_state, _ = checkpointer.restore(latest, target)
        iterator.set_state(data_state)
        logging.info("resumed from the checkpoint of step %d in %s", latest, workdir)
    else:
        state = init_state()
        initial_eval = evaluate(eval_step, state.params, validation, data_sharding)
        logging.info("initial evaluation: %s", _format_eval(initial_eval))
    if is_writer:
        _save_tokenizer(dataset, workdir)

    parameters = count_parameters(state.params)
    flops = flops_per_token(model_config, data_config.seq_len)
    peak = train_config.peak_flops or measure_matmul_peak()
    logging.info(
        "model: %s parameters, %.3g training FLOPs/token (%s); peak %.3g FLOP/s%s",
        f"{parameters:,}",
        flops["total"],
        ", ".join(f"{k} {v:.3g}" for k, v in flops.items() if k != "total"),
        peak,
        "" if train_config.peak_flops else " (measured matmul)",
    )
    metadata = {
        "model": model_config.to_dict(),
        "tokenizer": dataset.metadata["tokenizer"],
        "data_path": str(dataset.path),
        "seq_len": data_config.seq_len,
    }
    writer = MetricsWriter(workdir, tensorboard=train_config.tensorboard) if is_writer else None
    train_step = make_train_step(
        model,
        optimizer,
        schedule,
        train_config.grad_accum_steps,
        state_shardings=state_shardings,
        batch_sharding=data_sharding,
    )
    logging.info(
        "mesh %s over %d devices in %d processes",
        dict(mesh.shape),
        mesh.devices.size,
        process_count,
    )
    tokens_per_step = data_config.batch_size * data_config.seq_len
    stop = _StopFlag()
    stop.install()

    step = int(state.step)
    first_step, last_saved, preempted = step, latest, False
    start_time = time.monotonic()
    final_eval: dict[str, float] = {}
    context = contextlib.ExitStack()
    context.enter_context(jax.set_mesh(mesh))
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
                logging.info("step %d evaluation: %s", step, _format_eval(evaluation))
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
            logging.info("final evaluation (step %d): %s", step, _format_eval(final_eval))
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
        checkpointer.close()
        if writer is not None:
            writer.close()
    return TrainResult(
        workdir=workdir,
        final_step=step,
        initial_eval=initial_eval,
        final_eval=final_eval,
        preempted=preempted,
        parameters=parameters,
        checkpoint_dir=checkpointer.directory,
        is_writer=is_writer,
    )


def _format_eval(values: dict[str, float]) -> str:
    return (
        f"loss {values['loss']:.4f}, perplexity {values['perplexity']:.2f}, "
        f"accuracy {values['accuracy']:.3f}"
    )
