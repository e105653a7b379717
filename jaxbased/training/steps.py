"""The jit-compiled train and evaluation steps, and the pooled evaluation over batches.

What a step trains on is chosen by its per-token loss function (:data:`LossFunction`):

- :func:`token_losses` (the default, language modelling): batches are ``[batch, seq_len + 1]``
  int32 windows, inputs ``[:, :-1]``, targets ``[:, 1:]``; every position counts. The loss is
  the mean next-token cross-entropy over the padded vocabulary, as the reference computes it.
  On a mesh that splits the time axis into ``n`` slices, bind ``sequence_slices=n``: batches
  are then ``[batch, n (seq_len / n + 1)]`` slice windows
  (:mod:`jaxbased.data.sequence_slices`), which a ``sequence``-sharded batch splits at slice
  boundaries.
- :func:`answer_losses` (recall tasks such as MQAR): batches are ``(tokens [B, T], positions
  [B, P], targets [B, P])`` int32 and only the chosen positions count (the head runs there only).
- EchoAtt distillation (:mod:`jaxbased.training.distill_run`): a loss that also takes the frozen
  teacher's parameters, passed to the step as an extra argument (``extra_shardings``).

With ``grad_accum_steps = n`` a batch (every array of it) is split into ``n`` micro-batches whose
gradients are summed in a ``lax.scan`` before one optimizer update (same result as one big
batch, less memory).

**Non-finite steps.** When a step's loss or gradient norm is NaN or infinite, the train step
skips its update on the device: the returned state is the input state unchanged, step counter
included (``state.step`` counts applied updates), and the metrics still report the step
(``update_skipped`` is 1.0). :func:`stop_updates_after_non_finite` makes that sticky for the
training loop and records the first such step, so that the host learns of it at its next check
without a device-to-host transfer on every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from jaxbased.data.sequence_slices import global_batch_from_host, next_token_pairs
from jaxbased.layers.mixer import METRICS_COLLECTION
from jaxbased.model import LanguageModel, mixer_metrics
from jaxbased.training.state import TrainState

#: ``losses(model, params, batch, *extra) -> (losses, correct, reported)``: per-token float32
#: loss and correctness (1.0 where the argmax is the target), both of the same shape, and the
#: scalars to report (the mixers', :func:`jaxbased.model.mixer_metrics`; often empty). ``extra``
#: are the step's extra arguments (none for language modelling), which carry no gradient.
LossFunction = Callable[[LanguageModel, Any, Any], tuple[Array, Array, dict[str, Array]]]


def apply_with_metrics(model: LanguageModel, params: Any, *args: Any, **kwargs: Any):
    """``model.apply`` that also returns the mixers' reported metrics, per layer."""
    out, variables = model.apply({"params": params}, *args, mutable=[METRICS_COLLECTION], **kwargs)
    return out, mixer_metrics(model.config, variables.get(METRICS_COLLECTION))


def token_losses(
    model: LanguageModel, params: Any, batch: Int[Array, "B L"], *, sequence_slices: int = 1
) -> tuple[Float[Array, "B T"], Float[Array, "B T"], dict[str, Array]]:
    """Per-token cross-entropy and correctness (float32) of ``batch`` windows (``[B, T + 1]``,
    or ``[B, n (T / n + 1)]`` slice windows for ``sequence_slices = n``), and the mixers'
    metrics."""
    inputs, targets = next_token_pairs(batch, sequence_slices)
    logits, metrics = apply_with_metrics(model, params, inputs)
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return losses, correct, metrics


def answer_losses(
    model: LanguageModel,
    params: Any,
    batch: tuple[Int[Array, "B T"], Int[Array, "B P"], Int[Array, "B P"]],
) -> tuple[Float[Array, "B P"], Float[Array, "B P"], dict[str, Array]]:
    """Cross-entropy and correctness (float32) at chosen positions only.

    ``batch`` is ``(tokens, positions, targets)``: the logits of ``tokens`` at
    ``positions[b, j]`` (``LanguageModel.logits_at``: the head runs there only) against
    ``targets[b, j]``.
    """
    tokens, positions, targets = batch
    logits, metrics = apply_with_metrics(model, params, tokens, positions, method="logits_at")
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return losses, correct, metrics


def global_norm(tree: Any) -> Array:
    """``sqrt(sum of squares)`` over every leaf."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def make_train_step(
    model: LanguageModel,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    *,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    losses: LossFunction = token_losses,
    extra_shardings: tuple[Any, ...] = (),
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """``step(state, batch, *extra) -> (state, metrics)``, jit-compiled with the state donated.

    ``losses`` says what the batch is and which tokens count (:data:`LossFunction`); ``metrics``
    are the mean ``loss`` and ``accuracy`` over those tokens, the ``grad_norm`` and the
    ``learning_rate`` of the step, ``update_skipped`` (float32 1.0 when the loss or the
    gradient norm is not finite: then the returned state equals ``state``, step included), and
    the mixers' reported scalars (``mixer/layer{i}/{name}``, mean over micro-batches).

    With ``state_shardings`` (a pytree of ``NamedSharding`` like the state) and
    ``batch_sharding``, the step is compiled for that mesh: the state keeps its shardings
    from step to step and metrics come back replicated. ``extra_shardings`` (one per extra
    argument, e.g. a teacher's parameter shardings) says how ``extra`` arrives; without extra
    arguments the step is ``step(state, batch)``.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1")

    def loss_fn(
        params: Any, batch: Any, *extra: Any
    ) -> tuple[Array, tuple[Array, dict[str, Array]]]:
        token_loss, correct, reported = losses(model, params, batch, *extra)
        return token_loss.mean(), (correct.mean(), reported)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Any, *extra: Any) -> tuple[TrainState, dict[str, Array]]:
        rows = jax.tree.leaves(batch)[0].shape[0]
        if rows % grad_accum_steps:
            raise ValueError(
                f"batch size {rows} is not divisible by grad_accum_steps={grad_accum_steps}"
            )
        micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

        def accumulate(carry, micro_batch):
            grads_sum, loss_sum, accuracy_sum = carry
            (loss, (accuracy, reported)), grads = grad_fn(state.params, micro_batch, *extra)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, accuracy_sum + accuracy), reported

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss, accuracy), reported = jax.lax.scan(
            accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), micro
        )
        scale = 1.0 / grad_accum_steps
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = loss * scale, global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updated = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {
            "loss": loss,
            "accuracy": accuracy * scale,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "update_skipped": jnp.logical_not(finite).astype(jnp.float32),
            **{name: values.mean() for name, values in reported.items()},
        }
        return _select(finite, updated, state), metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, *extra_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def _select(condition: Array, when_true: Any, when_false: Any) -> Any:
    """Leaf by leaf ``when_true if condition else when_false`` (a scalar boolean ``condition``)."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), when_true, when_false)


#: ``{"step", "loss", "grad_norm"}``: the first step whose loss or gradient norm was not finite
#: (int32 ``step``; 0 while there has been none) and its two values (float32).
NonFiniteRecord = dict[str, Array]


def no_non_finite_step() -> dict[str, np.ndarray]:
    """The :data:`NonFiniteRecord` of a run with no non-finite step yet (host arrays)."""
    return {
        "step": np.zeros((), np.int32),
        "loss": np.zeros((), np.float32),
        "grad_norm": np.zeros((), np.float32),
    }


def stop_updates_after_non_finite(
    train_step: Callable[..., tuple[TrainState, dict[str, Array]]],
) -> Callable[..., tuple[TrainState, dict[str, Array], Any]]:
    """``step(state, batch, record, *extra) -> (state, metrics, record)``: ``train_step`` (a step
    of :func:`make_train_step`, called as ``train_step(state, batch, *extra)``) that applies no
    update at all once a step was non-finite.

    ``record`` is a :data:`NonFiniteRecord`. While its ``step`` is 0, the step runs as
    ``train_step`` does; the first step whose update is skipped (``update_skipped``) sets
    ``record`` to that step's number (``state.step + 1``: every earlier step was applied, so the
    counter is the number of steps run) and its loss and gradient norm. From then on every step
    returns its input state unchanged: the state stays the last good one until the host reads
    ``record`` at its next check. Jit-compiled, with the state and the record donated; no value
    leaves the devices.
    """

    def step(
        state: TrainState, batch: Any, record: NonFiniteRecord, *extra: Any
    ) -> tuple[TrainState, dict[str, Array], NonFiniteRecord]:
        updated, metrics = train_step(state, batch, *extra)
        healthy = record["step"] == 0
        first_bad = healthy & (metrics["update_skipped"] > 0)
        this_step = {
            "step": (state.step + 1).astype(jnp.int32),
            "loss": metrics["loss"].astype(jnp.float32),
            "grad_norm": metrics["grad_norm"].astype(jnp.float32),
        }
        return _select(healthy, updated, state), metrics, _select(first_bad, this_step, record)

    return jax.jit(step, donate_argnums=(0, 2))


def make_eval_step(
    model: LanguageModel, losses: LossFunction = token_losses
) -> Callable[[Any, Any], dict[str, Array]]:
    """``eval_step(params, batch) -> {loss_sum, correct_sum, tokens}`` (float32 sums over the
    tokens that ``losses`` counts, to be pooled by :func:`sum_evaluation`)."""

    def eval_step(params: Any, batch: Any) -> dict[str, Array]:
        token_loss, correct, _ = losses(model, params, batch)
        return {
            "loss_sum": token_loss.sum(),
            "correct_sum": correct.sum(),
            "tokens": jnp.asarray(token_loss.size, jnp.float32),
        }

    return jax.jit(eval_step)


def sum_evaluation(
    eval_step: Callable[[Any, Any], dict[str, Array]],
    params: Any,
    batches: Iterable[Any],
    sharding: Any = None,
) -> dict[str, float]:
    """``{loss_sum, correct_sum, tokens}`` of ``eval_step`` summed over ``batches`` (Python
    floats). With a ``sharding``, each batch is a global host array (every process holds it
    whole) of which each device takes its own block."""
    totals = {"loss_sum": 0.0, "correct_sum": 0.0, "tokens": 0.0}
    for batch in batches:
        if sharding is not None:
            batch = global_batch_from_host(batch, sharding)
        for key, value in eval_step(params, batch).items():
            totals[key] += float(value)
    return totals


def evaluate(
    eval_step: Callable[[Any, Any], dict[str, Array]],
    params: Any,
    batches: Iterable[Any],
    sharding: Any = None,
) -> dict[str, float]:
    """Mean ``loss``, ``perplexity`` and token ``accuracy`` over ``batches`` (see
    :func:`sum_evaluation`)."""
    totals = sum_evaluation(eval_step, params, batches, sharding)
    loss = totals["loss_sum"] / totals["tokens"]
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "accuracy": totals["correct_sum"] / totals["tokens"],
    }
