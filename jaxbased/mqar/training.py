"""Training and evaluation of one MQAR model (one learning rate), as Zoology does it.

Loss: cross-entropy of the tied head at the answer positions only (the targets that are not
``IGNORE_INDEX``); accuracy: the share of answers whose argmax is the value, per example, then
averaged over examples (Zoology's ``valid/accuracy``; every example of a segment has the same
number of answers). Optimiser: AdamW over every parameter (as PyTorch's ``AdamW(model.
parameters())`` in Zoology: biases, norms and the embedding decay too), weight decay 0.1, cosine
decay to 0 over the run (per step; Zoology steps its cosine once per epoch). Training stops early
once the test-mix accuracy reaches ``early_stop_accuracy`` (Zoology: 0.99), checked every
``eval_every`` steps and at the end of every epoch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxbased.config import ModelConfig
from jaxbased.data.mqar import MQARSegment, batches_per_epoch, iterate_batches
from jaxbased.model import LanguageModel
from jaxbased.mqar.models import answer_logits, init_params


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How one MQAR model is trained.

    Attributes:
      learning_rate: peak learning rate (after ``warmup_steps``), cosine to 0 at the end.
      batch_size: training examples per step (every batch comes from one segment).
      max_epochs: passes over the training mix; the run stops earlier at ``max_steps``.
      max_steps: cap on optimizer steps (None: ``max_epochs`` full epochs).
      eval_every: evaluate every this many steps (0: only at the end of each epoch).
      eval_batch_size: test examples per evaluation forward.
      early_stop_accuracy: stop once the test accuracy is ``>=`` this (None: never).
      weight_decay, beta1, beta2, eps: AdamW (decoupled decay on every parameter).
      interleave_segments: visit the batches of all training segments in one random order
        (False: segment after segment, in the order of the mix, as Zoology).
      warmup_steps: linear warmup from 0 (Zoology: none).
      grad_clip: global-norm clipping (0: none, as Zoology).
      seed: parameter initialisation and batch order.
    """

    learning_rate: float
    batch_size: int = 64
    max_epochs: int = 32
    max_steps: int | None = None
    eval_every: int = 0
    eval_batch_size: int = 256
    early_stop_accuracy: float | None = 0.99
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    interleave_segments: bool = False
    warmup_steps: int = 0
    grad_clip: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be > 0")
        for name in ("batch_size", "max_epochs", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ValueError(f"max_steps={self.max_steps!r} must be None or an integer >= 1")
        for name in ("eval_every", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"weight_decay={self.weight_decay!r} and grad_clip={self.grad_clip!r} must be >= 0"
            )


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Test-mix metrics: ``accuracy`` (mean over examples of each example's share of right
    answers), ``loss`` (mean cross-entropy over answers) and the accuracy of each segment by
    name (``"T256_P16"``)."""

    accuracy: float
    loss: float
    accuracy_by_segment: dict[str, float]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a run ended with.

    final: the last evaluation (the one that stopped it early, or after the last step).
    history: ``{"step", "train_loss", "accuracy", "loss", "seconds"}`` at every evaluation.
    steps: optimizer steps taken; stopped_early: whether the accuracy target was reached.
    seconds: wall time of the run, compilation included.
    """

    final: Evaluation
    history: list[dict[str, Any]]
    steps: int
    stopped_early: bool
    seconds: float


def _cross_entropy(logits: jax.Array, answers: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, answers[..., None], axis=-1)[..., 0]


def make_optimizer(settings: TrainSettings, total_steps: int) -> optax.GradientTransformation:
    """AdamW with decay on every parameter, cosine from the peak to 0 over ``total_steps``."""
    if settings.warmup_steps:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=settings.learning_rate,
            warmup_steps=settings.warmup_steps,
            decay_steps=max(total_steps, settings.warmup_steps + 1),
            end_value=0.0,
        )
    else:
        schedule = optax.cosine_decay_schedule(settings.learning_rate, max(total_steps, 1))
    adamw = optax.adamw(
        schedule,
        b1=settings.beta1,
        b2=settings.beta2,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )
    if settings.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(settings.grad_clip), adamw)
    return adamw


def make_step_functions(
    config: ModelConfig, optimizer: optax.GradientTransformation
) -> tuple[Callable, Callable]:
    """``train_step(params, opt_state, tokens, positions, answers) -> (params, opt_state, loss)``
    and ``eval_step(params, tokens, positions, answers) -> (correct [B, P] bool, losses [B, P])``,
    both jitted (one compilation per batch shape); ``train_step`` donates its state."""
    model = LanguageModel(config)

    def loss_fn(params, tokens, positions, answers):
        logits = answer_logits(model, params, tokens, positions)
        return jnp.mean(_cross_entropy(logits, answers))

    @jax.jit
    def eval_step(params, tokens, positions, answers):
        logits = answer_logits(model, params, tokens, positions)
        correct = jnp.argmax(logits, axis=-1) == answers
        return correct, _cross_entropy(logits, answers)

    def train_step(params, opt_state, tokens, positions, answers):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, positions, answers)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(train_step, donate_argnums=(0, 1)), eval_step


def evaluate(
    eval_step: Callable, params: Any, segments: list[MQARSegment], batch_size: int
) -> Evaluation:
    """Accuracy and loss of ``params`` on every example of ``segments`` (:class:`Evaluation`)."""
    per_example_accuracy, losses, by_segment = [], [], {}
    for segment in segments:
        correct_rows = []
        for start in range(0, len(segment), batch_size):
            batch = segment.take(slice(start, start + batch_size))
            correct, loss = eval_step(params, batch.inputs, batch.answer_positions, batch.answers)
            correct_rows.append(np.asarray(correct))
            losses.append(np.asarray(loss).ravel())
        rows = np.concatenate(correct_rows).mean(axis=1)
        per_example_accuracy.append(rows)
        by_segment[segment.name] = float(rows.mean())
    return Evaluation(
        accuracy=float(np.concatenate(per_example_accuracy).mean()),
        loss=float(np.concatenate(losses).mean()),
        accuracy_by_segment=by_segment,
    )


def total_steps(settings: TrainSettings, train_segments: list[MQARSegment]) -> int:
    """Optimizer steps of a run that does not stop early."""
    per_epoch = batches_per_epoch(train_segments, settings.batch_size)
    if per_epoch == 0:
        raise ValueError(
            f"batch_size={settings.batch_size} is larger than every training segment "
            f"({[len(segment) for segment in train_segments]} examples)"
        )
    steps = per_epoch * settings.max_epochs
    return steps if settings.max_steps is None else min(steps, settings.max_steps)


def train(
    config: ModelConfig,
    train_segments: list[MQARSegment],
    test_segments: list[MQARSegment],
    settings: TrainSettings,
    *,
    log_prefix: str = "",
) -> TrainResult:
    """Train ``LanguageModel(config)`` on the training mix; see the module docstring."""
    start = time.perf_counter()
    if not test_segments:
        raise ValueError("test_segments is empty; early stopping and results need a test mix")
    for segment in (*train_segments, *test_segments):
        if segment.vocab_size > config.vocab_size:
            raise ValueError(
                f"segment {segment.name} uses vocab_size={segment.vocab_size} but the model "
                f"has vocab_size={config.vocab_size}"
            )
    steps_total = total_steps(settings, train_segments)
    optimizer = make_optimizer(settings, steps_total)
    train_step, eval_step = make_step_functions(config, optimizer)
    params = init_params(config, settings.seed)
    opt_state = optimizer.init(params)

    history: list[dict[str, Any]] = []
    recent_losses: list[jax.Array] = []
    step, epoch = 0, 0
    final: Evaluation | None = None

    def run_evaluation() -> Evaluation:
        result = evaluate(eval_step, params, test_segments, settings.eval_batch_size)
        train_loss = float(np.mean(jax.device_get(recent_losses))) if recent_losses else math.nan
        recent_losses.clear()
        history.append(
            dict(
                step=step,
                train_loss=train_loss,
                accuracy=result.accuracy,
                loss=result.loss,
                seconds=time.perf_counter() - start,
            )
        )
        logging.info(
            "%sstep %d: train loss %.3f, test loss %.3f, accuracy %.4f",
            log_prefix,
            step,
            train_loss,
            result.loss,
            result.accuracy,
        )
        return result

    def reached(result: Evaluation) -> bool:
        target = settings.early_stop_accuracy
        return target is not None and result.accuracy >= target

    while step < steps_total:
        for batch in iterate_batches(
            train_segments,
            settings.batch_size,
            seed=settings.seed * 100_003 + epoch,
            interleave=settings.interleave_segments,
        ):
            params, opt_state, loss = train_step(
                params, opt_state, batch.inputs, batch.answer_positions, batch.answers
            )
            recent_losses.append(loss)
            step += 1
            if step >= steps_total:
                break
            if settings.eval_every and step % settings.eval_every == 0:
                final = run_evaluation()
                if reached(final):
                    return TrainResult(final, history, step, True, time.perf_counter() - start)
        epoch += 1
        if not history or history[-1]["step"] != step:
            final = run_evaluation()
        if reached(final):
            return TrainResult(final, history, step, True, time.perf_counter() - start)
    assert final is not None
    return TrainResult(final, history, step, False, time.perf_counter() - start)
