"""Everything a training run needs before its first step, as one record (:class:`RunSetup`).

:func:`setup_run` parses the config, prepares the workdir and the data (the built-in corpus is
tokenized into ``workdir/builtin_data`` once), builds the model, learning-rate schedule,
optimizer and device mesh, the sharded train state (restored from the latest complete checkpoint
of the workdir, with the data iterator where it was, or freshly initialised and evaluated), the
jit-compiled steps and the metrics writer. :func:`jaxbased.training.loop.train` runs the steps.

With ``config.distill.teacher_workdir`` set, the model is an EchoAtt student of that teacher
(:mod:`jaxbased.training.distill_run`): a fresh state starts from the teacher's weights, and
``RunSetup.distillation`` holds the teacher and the distillation step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxbased.config import ModelConfig
from jaxbased.data.corpus import Document, builtin_corpus_files, builtin_corpus_fingerprint
from jaxbased.data.pipeline import make_iterator, training_batches, validation_batches
from jaxbased.data.sequence_slices import assemble_global_batch, process_piece, slice_windows
from jaxbased.data.token_store import TokenDataset, write_token_dataset
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.layer_layout import convert_layout, is_stacked
from jaxbased.model import LanguageModel, count_parameters
from jaxbased.sequence_sharding import check_sequence_sharding
from jaxbased.sharding import (
    BATCH_AXES,
    SEQUENCE_AXIS,
    logical_shardings,
    make_mesh,
    token_batch_sharding,
    with_shardings,
)
from jaxbased.training.checkpointing import TOKENIZER_SUBDIR, Checkpointer, check_compatible
from jaxbased.training.distill_run import (
    Distillation,
    check_teacher_tokenizer,
    distill_settings,
    initial_student_params,
    load_teacher,
    make_distillation,
    share_count,
    student_config,
)
from jaxbased.training.flops import flops_per_token, measure_matmul_peak
from jaxbased.training.metrics import MetricsWriter
from jaxbased.training.optimizer import learning_rate_schedule, make_optimizer
from jaxbased.training.state import TrainState
from jaxbased.training.steps import evaluate, make_eval_step, make_train_step, token_losses

BUILTIN_DATA_SUBDIR = "builtin_data"


@dataclasses.dataclass
class RunSetup:
    """A run ready for its first step.

    Attributes:
      workdir: the absolute workdir (created).
      config: the whole run config (sections ``model``, ``data``, ``train``, ``mesh``, ...).
      model_config: ``config.model`` as a ``ModelConfig``.
      is_writer: whether this process writes metrics and the tokenizer (JAX process 0).
      mesh: the device mesh; ``data_sharding`` shards a token batch over it (rows over
        ``data`` x ``fsdp``, time slices over ``sequence``).
      state: the float32 train state, sharded on ``mesh`` (restored or initialised).
      train_step, eval_step: the jit-compiled steps (``train_step`` donates the state).
      iterator: the training batches (this process's rows and time slices, as slice windows:
        :mod:`jaxbased.data.sequence_slices`), checkpointable.
      put_batch: ``put_batch(host_piece) -> global batch array`` on ``data_sharding``.
      validation: the global validation batches, ``[batch, n (seq_len / n + 1)]`` int32 slice
        windows each (``n = mesh.shape["sequence"]``; with 1, ``[batch, seq_len + 1]``).
      checkpointer: the workdir's checkpoints; ``resumed_step`` the step restored (None: fresh).
      initial_eval: the evaluation of a fresh state (None when resumed).
      metadata: what every checkpoint records beside the state (model, tokenizer, data).
      parameters: the number of parameters; ``flops``: training FLOPs per token by part
        (:func:`~jaxbased.training.flops.flops_per_token`); ``peak``: FLOP/s for utilisation.
      writer: the metrics writer (None on processes that do not write).
      distillation: the EchoAtt distillation of the run (None when ``distill`` is off).
    """

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    model_config: ModelConfig
    is_writer: bool
    mesh: jax.sharding.Mesh
    data_sharding: jax.sharding.NamedSharding
    state: TrainState
    train_step: Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[[Any, jax.Array], dict[str, jax.Array]]
    iterator: Any
    put_batch: Callable[[np.ndarray], jax.Array]
    validation: list[np.ndarray]
    checkpointer: Checkpointer
    resumed_step: int | None
    initial_eval: dict[str, float] | None
    metadata: dict[str, Any]
    parameters: int
    flops: dict[str, float]
    peak: float
    writer: MetricsWriter | None
    distillation: Distillation | None = None

    def close(self) -> None:
        """Finish the checkpoint saves and close the checkpointer and the writer."""
        self.checkpointer.close()
        if self.writer is not None:
            self.writer.close()


def prepare_builtin_data(
    workdir: pathlib.Path, max_bytes: int, validation_fraction: float
) -> pathlib.Path:
    """Tokenize the built-in corpus (byte-level) into ``workdir/builtin_data`` once."""
    output = workdir / BUILTIN_DATA_SUBDIR
    workdir.mkdir(parents=True, exist_ok=True)
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


def _open_data(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, model_config: ModelConfig
) -> TokenDataset:
    """The run's dataset: ``data.path``, or the built-in corpus tokenized into the workdir
    (which is created then, after the model's vocabulary is checked against it)."""
    if config.data.path:
        path = pathlib.Path(config.data.path)
        if not path.exists():
            raise ValueError(f"data.path={config.data.path!r} does not exist")
        return TokenDataset.open(path)
    byte_vocab_size = ByteTokenizer.vocab_size
    if model_config.vocab_size < byte_vocab_size:
        raise ValueError(
            f"the built-in corpus holds token id {byte_vocab_size - 1} >= model "
            f"vocab_size={model_config.vocab_size} (byte-level tokens); set "
            f"--config.model.vocab_size={byte_vocab_size}"
        )
    return TokenDataset.open(
        prepare_builtin_data(
            workdir, config.data.builtin_max_bytes, config.data.validation_fraction
        )
    )


def _check_data_settings(data_config: ml_collections.ConfigDict) -> None:
    """The ``data`` settings checked before any data is read or written."""
    for name in ("seq_len", "batch_size", "builtin_max_bytes", "prefetch_threads"):
        value = data_config[name]
        minimum = 0 if name == "prefetch_threads" else 1
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"data.{name}={value!r} must be an integer >= {minimum}")
    if not 0 <= data_config.validation_fraction <= 0.5:
        raise ValueError(
            f"data.validation_fraction={data_config.validation_fraction} must be in [0, 0.5]"
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


def optimizer_from_config(
    train_config: ml_collections.ConfigDict,
) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The learning-rate schedule and optimizer of the ``train`` section."""
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
    return schedule, optimizer


def format_eval(values: dict[str, float]) -> str:
    """``loss 2.3456, perplexity 10.45, accuracy 0.512``."""
    return (
        f"loss {values['loss']:.4f}, perplexity {values['perplexity']:.2f}, "
        f"accuracy {values['accuracy']:.3f}"
    )


def _say_when_complete(resumed_step: int, num_steps: int) -> None:
    """A warning when the resumed checkpoint already reached ``train.num_steps``: the run only
    evaluates, and the warning says how to extend it."""
    if resumed_step < num_steps:
        return
    why = (
        "the run is complete"
        if resumed_step == num_steps
        else f"train.num_steps={num_steps} is below the checkpoint's step {resumed_step}"
    )
    logging.warning(
        "nothing to train: %s; to train further, run the same command with "
        "--config.train.num_steps=N for an N above %d (e.g. --config.train.num_steps=%d; the "
        "learning-rate schedule then spans the new total), or use a new --workdir",
        why,
        resumed_step,
        2 * resumed_step,
    )


def setup_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> RunSetup:
    """Prepare the run of ``config`` in ``workdir`` (resuming it if it holds a checkpoint).

    Nothing is created before the config and the data are checked. Resumes from the newest
    intact checkpoint: damaged newer steps are skipped with one warning and moved to
    ``<workdir>/damaged_checkpoints/`` (never deleted), since this run saves those step numbers
    again. Raises ``ValueError`` naming the setting for an invalid config or data,
    ``IncompatibleCheckpointError`` when the workdir holds a checkpoint of another model, and
    ``DamagedCheckpointError`` when every checkpoint is damaged.
    """
    workdir = pathlib.Path(workdir).absolute()
    train_config, data_config = config.train, config.data
    model_config = ModelConfig.from_dict(config.model)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_writer = process_index == 0

    mesh = make_mesh(config.mesh)
    sequence_slices = mesh.shape[SEQUENCE_AXIS]
    check_sequence_sharding(model_config, sequence_slices, data_config.seq_len)
    row_shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    rows_multiple = math.lcm(row_shards, train_config.grad_accum_steps)
    if data_config.batch_size % rows_multiple:
        raise ValueError(
            f"data.batch_size={data_config.batch_size} must be divisible by mesh.data * "
            f"mesh.fsdp = {row_shards} and by train.grad_accum_steps = "
            f"{train_config.grad_accum_steps} (e.g. {rows_multiple})"
        )
    if train_config.num_steps < 1:
        raise ValueError(f"train.num_steps={train_config.num_steps} must be >= 1")
    _check_data_settings(data_config)
    distill = distill_settings(config)
    if distill is not None and sequence_slices > 1:
        raise ValueError(
            f"mesh.sequence={sequence_slices}: distillation (distill.teacher_workdir) reads whole "
            "windows and cannot split the sequence yet; use mesh.sequence=1"
        )
    teacher = None
    if distill is not None:
        teacher = load_teacher(distill, model_config)
        if distill.shared_layers is not None:
            model_config = student_config(distill, model_config, teacher)
        else:
            share_count(distill, teacher)  # the layers themselves need the validation data

    dataset = _open_data(config, workdir, model_config)
    _check_vocab(dataset, model_config)
    # Each process reads only the rows and time slices its devices hold, targets included.
    data_sharding = token_batch_sharding(mesh)
    piece = process_piece(
        data_sharding, data_config.batch_size, data_config.seq_len, sequence_slices
    )
    logging.info(
        "process %d reads rows %d..%d and time slices %d..%d of %d of every batch",
        process_index,
        piece.row_start,
        piece.row_stop - 1,
        piece.slice_start,
        piece.slice_stop - 1,
        sequence_slices,
    )
    batches = training_batches(
        dataset,
        seq_len=data_config.seq_len,
        batch_size=data_config.batch_size,
        seed=data_config.seed,
        piece=piece,
    )
    global_shape = (
        data_config.batch_size,
        sequence_slices * (data_config.seq_len // sequence_slices + 1),
    )

    def put_batch(host_piece: np.ndarray) -> jax.Array:
        return assemble_global_batch(
            data_sharding, global_shape, {process_index: (piece, host_piece)}
        )

    validation = validation_batches(
        dataset,
        seq_len=data_config.seq_len,
        batch_size=data_config.batch_size,
        max_batches=train_config.eval_batches,
    )
    if teacher is not None:
        check_teacher_tokenizer(teacher, dataset)
        if distill.shared_layers is None:
            model_config = student_config(distill, model_config, teacher, validation)

    validation = [slice_windows(batch, sequence_slices) for batch in validation]
    model = LanguageModel(model_config)
    losses = functools.partial(token_losses, sequence_slices=sequence_slices)
    schedule, optimizer = optimizer_from_config(train_config)

    def init_boxed_state(model: LanguageModel = model) -> TrainState:
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

    workdir.mkdir(parents=True, exist_ok=True)  # config and data are valid: the run starts
    checkpointer = Checkpointer(
        workdir, keep=train_config.keep_checkpoints, async_save=train_config.async_checkpoints
    )
    iterator = make_iterator(batches, prefetch_threads=data_config.prefetch_threads)
    target = with_shardings(abstract_boxed, state_shardings)

    def read_checkpoint(step: int) -> tuple[Any, dict, dict]:
        saved_model = checkpointer.metadata(step)["model"]
        check_compatible(saved_model, model_config, workdir)
        # The checkpoint is read in the parameter layout it was saved in (unrolled or stacked,
        # jaxbased.layer_layout), then converted on the devices to this run's.
        saved_layout = dataclasses.replace(
            model_config, scan_layers=bool(saved_model.get("scan_layers", False))
        )
        if is_stacked(saved_layout) == is_stacked(model_config):
            return checkpointer.restore(step, target)
        saved_boxed = jax.eval_shape(lambda: init_boxed_state(LanguageModel(saved_layout)))
        saved_target = with_shardings(saved_boxed, logical_shardings(saved_boxed, mesh))
        saved_state, data_state, metadata = checkpointer.restore(step, saved_target)
        convert = jax.jit(
            lambda tree: convert_layout(tree, model_config), out_shardings=state_shardings
        )
        logging.info("converted the checkpoint's parameter layout to this run's")
        return convert(saved_state), data_state, metadata

    found = checkpointer.restore_newest_intact(read_checkpoint)
    latest = None if found is None else found[0]
    initial_eval = None
    eval_step = make_eval_step(model, losses)
    if found is not None:
        _, (state, data_state, _), damaged = found
        for step in damaged:  # newer than the one resumed: this run saves those steps again
            moved = checkpointer.set_aside(step)
            logging.info("moved the damaged step %d to %s; it is not deleted", step, moved)
        iterator.set_state(data_state)
        logging.info("resumed from the checkpoint of step %d in %s", latest, workdir)
        _say_when_complete(latest, train_config.num_steps)
    elif teacher is not None:
        params_shardings = state_shardings.params
        init_from = jax.jit(
            lambda params: TrainState(
                step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
            ),
            out_shardings=state_shardings,
        )
        state = init_from(initial_student_params(teacher, model_config, params_shardings))
        initial_eval = evaluate(eval_step, state.params, validation, data_sharding)
        logging.info(
            "initial evaluation (the student from the teacher): %s", format_eval(initial_eval)
        )
    else:
        state = init_state()
        initial_eval = evaluate(eval_step, state.params, validation, data_sharding)
        logging.info("initial evaluation: %s", format_eval(initial_eval))
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
    if distill is not None:
        metadata["distill"] = {
            "teacher_workdir": str(distill.teacher_workdir),
            "steps": distill.steps,
            "attention_sharing": [list(pair) for pair in model_config.attention_sharing],
        }
    writer = MetricsWriter(workdir, tensorboard=train_config.tensorboard) if is_writer else None
    train_step = make_train_step(
        model,
        optimizer,
        schedule,
        train_config.grad_accum_steps,
        state_shardings=state_shardings,
        batch_sharding=data_sharding,
        losses=losses,
    )
    distillation = None
    if distill is not None:
        distillation = make_distillation(
            distill,
            teacher,
            model,
            optimizer,
            schedule,
            grad_accum_steps=train_config.grad_accum_steps,
            state_shardings=state_shardings,
            batch_sharding=data_sharding,
            mesh=mesh,
            start_step=int(state.step),
            num_steps=train_config.num_steps,
        )
    logging.info(
        "mesh %s over %d devices in %d processes",
        dict(mesh.shape),
        mesh.devices.size,
        process_count,
    )
    return RunSetup(
        workdir=workdir,
        config=config,
        model_config=model_config,
        is_writer=is_writer,
        mesh=mesh,
        data_sharding=data_sharding,
        state=state,
        train_step=train_step,
        eval_step=eval_step,
        iterator=iterator,
        put_batch=put_batch,
        validation=validation,
        checkpointer=checkpointer,
        resumed_step=latest,
        initial_eval=initial_eval,
        metadata=metadata,
        parameters=parameters,
        flops=flops,
        peak=peak,
        writer=writer,
        distillation=distillation,
    )
