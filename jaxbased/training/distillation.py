"""EchoAtt distillation loss (docs/echoatt.md#distillation-loss): a sharing student learns from
its unshared teacher.

Per token ``t`` of a batch,

    hidden_t = mean over boundaries i and channels of (S_i[t] - T_i[t])^2
    kl_t     = sum_v p_T[t, v] (log p_T[t, v] - log p_S[t, v])          KL(teacher || student)
    hard_t   = -log p_S[t, argmax_v p_T[t, v]]                            the teacher's argmax
    loss_t   = hidden_weight * hidden_t + kl_weight * kl_t + hard_weight * hard_t

with ``p = softmax(logits)`` over the padded vocabulary (as the language-modelling loss) and
``S_i``, ``T_i`` the residual stream after block boundary ``i`` (:func:`block_boundaries`).
The defaults are 0.25, 0.25 and 0.5. The loss is the mean of ``loss_t`` over the tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxbased.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class DistillationWeights:
    """The weights of the three terms; each a number >= 0, not all 0."""

    hidden_weight: float = 0.25
    kl_weight: float = 0.25
    hard_weight: float = 0.5

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{field.name}={value!r} must be a number >= 0")
        if self.hidden_weight + self.kl_weight + self.hard_weight == 0:
            raise ValueError("hidden_weight, kl_weight and hard_weight are all 0; set one > 0")


def block_boundaries(student_config: ModelConfig) -> tuple[int, ...]:
    """The layers after which the hidden states are compared: the last layer of each sharing
    block (an anchor and the layers that share it), ascending. Empty without sharing."""
    blocks: dict[int, int] = {}
    for sharer, anchor in student_config.attention_sharing:
        blocks[anchor] = max(blocks.get(anchor, anchor), sharer)
    return tuple(sorted(set(blocks.values())))


def distillation_token_losses(
    student_logits: Float[Array, "B T V"],
    teacher_logits: Float[Array, "B T V"],
    student_hidden: Sequence[Float[Array, "B T D"]],
    teacher_hidden: Sequence[Float[Array, "B T D"]],
    weights: DistillationWeights = DistillationWeights(),
) -> tuple[Float[Array, "B T"], dict[str, Float[Array, "B T"]]]:
    """``loss_t`` of the module docstring ``[B, T]`` (float32) and its three terms
    (``hidden_mse``, ``kl``, ``teacher_ce``, each ``[B, T]``). ``student_hidden`` and
    ``teacher_hidden`` hold the residual stream at the same boundaries (may be empty: the
    hidden term is then 0). The teacher's side carries no gradient."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"{len(student_hidden)} student hidden states but {len(teacher_hidden)} teacher ones"
        )
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    student_log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    teacher_log_p = jax.nn.log_softmax(teacher_logits, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    hard_labels = jnp.argmax(teacher_logits, axis=-1)
    hard = -jnp.take_along_axis(student_log_p, hard_labels[..., None], axis=-1)[..., 0]
    if student_hidden:
        hidden = jnp.mean(
            jnp.stack(
                [
                    jnp.mean(
                        jnp.square(
                            s.astype(jnp.float32) - jax.lax.stop_gradient(t).astype(jnp.float32)
                        ),
                        axis=-1,
                    )
                    for s, t in zip(student_hidden, teacher_hidden, strict=True)
                ]
            ),
            axis=0,
        )
    else:
        hidden = jnp.zeros_like(kl)
    loss = weights.hidden_weight * hidden + weights.kl_weight * kl + weights.hard_weight * hard
    return loss, {"hidden_mse": hidden, "kl": kl, "teacher_ce": hard}
