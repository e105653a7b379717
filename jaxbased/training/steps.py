"""The jit-compiled train and evaluation steps.

Batches are ``[batch, seq_len + 1]`` int32 windows: inputs ``[:, :-1]``, targets ``[:, 1:]``. The
loss is the mean next-token cross-entropy over the padded vocabulary, as the reference computes it.
With ``grad_accum_steps = n`` a batch is split into ``n`` micro-batches whose gradients are summed
in a ``lax.scan`` before one optimizer update (same result as one big batch, less memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from jaxbased.model import LanguageModel
from jaxbased.training.state import TrainState


def token_losses(
    model: LanguageModel, params: Any, batch: Int[Array, "B L"]
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Per-token cross-entropy and correctness (float32) of ``batch`` windows."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model.apply({"params": params}, inputs).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return losses, correct


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
) -> Callable[[TrainState, Array], tuple[TrainState, dict[str, Array]]]:
    """``step(state, batch) -> (state, metrics)``, jit-compiled with the state donated.

    With ``state_shardings`` (a pytree of ``NamedSharding`` like the state) and
    ``batch_sharding``, the step is compiled for that mesh: the state keeps its shardings
    from step to step and metrics come back replicated.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1")

    def loss_fn(params: Any, batch: Array) -> tuple[Array, Array]:
        losses, correct = token_losses(model, params, batch)
        return losses.mean(), correct.mean()

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Array) -> tuple[TrainState, dict[str, Array]]:
        if batch.shape[0] % grad_accum_steps:
            raise ValueError(
                f"batch size {batch.shape[0]} is not divisible by grad_accum_steps="
                f"{grad_accum_steps}"
            )
        micro = batch.reshape(grad_accum_steps, -1, batch.shape[-1])

        def accumulate(carry, micro_batch):
            grads_sum, loss_sum, accuracy_sum = carry
            (loss, accuracy), grads = grad_fn(state.params, micro_batch)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, accuracy_sum + accuracy), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss, accuracy), _ = jax.lax.scan(
            accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), micro
        )
        scale = 1.0 / grad_accum_steps
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss * scale,
            "accuracy": accuracy * scale,
            "grad_norm": global_norm(grads),
            "learning_rate": schedule(state.step),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def make_eval_step(model: LanguageModel) -> Callable[[Any, Array], dict[str, Array]]:
    """``eval_step(params, batch) -> {loss_sum, correct_sum, tokens}`` (sums, to be pooled)."""

    def eval_step(params: Any, batch: Array) -> dict[str, Array]:
        losses, correct = token_losses(model, params, batch)
        return {
            "loss_sum": losses.sum(),
            "correct_sum": correct.sum(),
            "tokens": jnp.asarray(losses.size, jnp.float32),
        }

    return jax.jit(eval_step)
