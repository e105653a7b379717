"""MQAR training of one model (one learning rate), as Zoology does it, on the library's stack.

The optimizer, train step and evaluation step are :mod:`jaxbased.training`'s, with the loss on
the answer positions only (:func:`jaxbased.training.steps.answer_losses`: the targets that are
not ``IGNORE_INDEX``); what is MQAR's own lives here: the batches of the segment mixes, the
accuracy per example and per segment, early stopping on it and the record of a run.

Loss: cross-entropy of the tied head at the answer positions, averaged over answers. Accuracy:
the share of answers whose argmax is the value, per example, then averaged over examples
(Zoology's ``valid/accuracy``; every example of a segment has the same number of answers).
Optimiser: AdamW over every parameter (as PyTorch's ``AdamW(model.parameters())`` in Zoology:
biases, norms and the embedding decay too), weight decay 0.1, cosine decay to 0 over the run (per
step; Zoology steps its cosine once per epoch), no clipping. Training stops early once the
test-mix accuracy reaches ``early_stop_accuracy`` (Zoology: 0.99), checked every ``eval_every``
steps and at the end of every epoch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxbased.config import ModelConfig
from jaxbased.data.mqar import MQARSegment, batches_per_epoch, iterate_batches
from jaxbased.model import LanguageModel
from jaxbased.mqar.models import init_params
from jaxbased.training.optimizer import learning_rate_schedule, make_optimizer
from jaxbased.training.state import TrainState
from jaxbased.training.steps import answer_losses, make_eval_step, make_train_step, sum_evaluation


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
class MQAREvaluation:
    """Test-mix metrics: ``accuracy`` (mean over examples of each example's share of right
    answers), ``loss`` (mean cross-entropy over answers) and the accuracy of each segment by
    name (``"T256_P16"``)."""

    accuracy: float
    loss: float
    accuracy_by_segment: dict[str, float]


@dataclasses.dataclass(frozen=True)
class MQARResult:
    """What an MQAR run ended with.

    final: the last evaluation (the one that stopped it early, or after the last step).
    history: ``{"step", "train_loss", "accuracy", "loss", "seconds"}`` at every evaluation.
    steps: optimizer steps taken; stopped_early: whether the accuracy target was reached.
    seconds: wall time of the run, compilation included.
    """

    final: MQAREvaluation
    history: list[dict[str, Any]]
    steps: int
    stopped_early: bool
    seconds: float


def answer_batch(batch: MQARSegment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inputs [B, T], answer_positions [B, P], answers [B, P])`` int32: the batch as
    :func:`jaxbased.training.steps.answer_losses` reads it."""
    return batch.inputs, batch.answer_positions, batch.answers


def evaluate_mqar(
    eval_step: Callable[[Any, Any], dict[str, jax.Array]],
    params: Any,
    segments: list[MQARSegment],
    batch_size: int,
) -> MQAREvaluation:
    """Accuracy and loss of ``params`` on every example of ``segments``.

    ``eval_step`` is ``make_eval_step(model, answer_losses)``; each segment's accuracy is its
    share of right answers (its examples all have the same number), the overall accuracy the
    mean over all examples, and the loss the mean over all answers.
    """
    examples, weighted_accuracy, loss_sum, answers, by_segment = 0, 0.0, 0.0, 0.0, {}
    for segment in segments:
        batches = (
            answer_batch(segment.take(slice(start, start + batch_size)))
            for start in range(0, len(segment), batch_size)
        )
        totals = sum_evaluation(eval_step, params, batches)
        accuracy = totals["correct_sum"] / totals["tokens"]
        by_segment[segment.name] = accuracy
        examples += len(segment)
        weighted_accuracy += accuracy * len(segment)
        loss_sum += totals["loss_sum"]
        answers += totals["tokens"]
    return MQAREvaluation(
        accuracy=weighted_accuracy / examples,
        loss=loss_sum / answers,
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


def train_mqar(
    config: ModelConfig,
    train_segments: list[MQARSegment],
    test_segments: list[MQARSegment],
    settings: TrainSettings,
    *,
    log_prefix: str = "",
) -> MQARResult:
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
    schedule = learning_rate_schedule(
        peak=settings.learning_rate,
        final=0.0,
        warmup_steps=settings.warmup_steps,
        total_steps=steps_total,
        warmup_init=0.0,
    )
    optimizer = make_optimizer(
        schedule,
        beta1=settings.beta1,
        beta2=settings.beta2,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        grad_clip=settings.grad_clip,
        decay_mask=None,
    )
    model = LanguageModel(config)
    train_step = make_train_step(model, optimizer, schedule, losses=answer_losses)
    eval_step = make_eval_step(model, answer_losses)
    state = TrainState.create(init_params(config, settings.seed), optimizer)

    history: list[dict[str, Any]] = []
    recent_losses: list[jax.Array] = []
    step, epoch = 0, 0
    final: MQAREvaluation | None = None

    def run_evaluation() -> MQAREvaluation:
        result = evaluate_mqar(eval_step, state.params, test_segments, settings.eval_batch_size)
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

    def reached(result: MQAREvaluation) -> bool:
        target = settings.early_stop_accuracy
        return target is not None and result.accuracy >= target

    while step < steps_total:
        for batch in iterate_batches(
            train_segments,
            settings.batch_size,
            seed=settings.seed * 100_003 + epoch,
            interleave=settings.interleave_segments,
        ):
            state, metrics = train_step(state, answer_batch(batch))
            recent_losses.append(metrics["loss"])
            step += 1
            if step >= steps_total:
                break
            if settings.eval_every and step % settings.eval_every == 0:
                final = run_evaluation()
                if reached(final):
                    return MQARResult(final, history, step, True, time.perf_counter() - start)
        epoch += 1
        if not history or history[-1]["step"] != step:
            final = run_evaluation()
        if reached(final):
            return MQARResult(final, history, step, True, time.perf_counter() - start)
    assert final is not None
    return MQARResult(final, history, step, False, time.perf_counter() - start)
