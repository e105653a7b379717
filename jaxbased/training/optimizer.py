"""AdamW with linear warmup and cosine decay (docs/training.md), global-norm clipping, and a weight
decay mask that spares biases, norms, embeddings and the state-space parameters ``A_log``/``D``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

NO_DECAY_NAMES = ("bias", "norm", "embedding")
#: The state-space parameters that never decay, matched by their exact leaf name: the decay
#: rates ``A_log``, the skip weights ``D`` and the time-step biases ``dt_bias`` of Mamba and
#: Mamba-2 (mamba_ssm marks them ``_no_weight_decay``; decaying ``A_log`` pulls every rate to
#: ``exp(0) = 1`` and decaying ``dt_bias`` pulls every time step to ``softplus(0) = 0.69``).
STATE_SPACE_NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias"})


def _leaf_names(path: tuple[Any, ...]) -> list[str]:
    return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def learning_rate_schedule(
    *,
    peak: float,
    final: float,
    warmup_steps: int,
    total_steps: int,
    warmup_init: float = 1e-6,
) -> optax.Schedule:
    """Linear from ``warmup_init`` to ``peak`` over ``warmup_steps``, then cosine to ``final`` at
    ``total_steps``."""
    if peak <= 0 or final < 0 or final > peak:
        raise ValueError(f"need 0 <= final ({final}) <= peak ({peak}) and peak > 0")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be >= 0, total_steps={total_steps} >= 1"
        )
    decay_steps = max(total_steps - warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(peak, decay_steps, alpha=final / peak)
    if warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(warmup_init, peak, warmup_steps)
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
    """True for every parameter that decays: not a bias, a norm weight, the embedding, nor one of
    ``STATE_SPACE_NO_DECAY_NAMES``."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        names = _leaf_names(path)
        if names and names[-1] in STATE_SPACE_NO_DECAY_NAMES:
            return False
        return not any(marker in name for name in names for marker in NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def state_space_decay_mask(params: Any) -> Any:
    """True for every parameter but the state-space ones (``STATE_SPACE_NO_DECAY_NAMES``):
    PyTorch's ``AdamW(model.parameters())`` with mamba_ssm's ``_no_weight_decay`` honoured, so
    biases, norms and the embedding still decay (the MQAR protocol's optimizer)."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        names = _leaf_names(path)
        return not (names and names[-1] in STATE_SPACE_NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    schedule: optax.Schedule,
    *,
    beta1: float = 0.9,
    beta2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    decay_mask: Callable[[Any], Any] | None = weight_decay_mask,
) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip)`` then AdamW with decoupled weight decay.

    ``grad_clip = 0`` skips the clipping. ``decay_mask(params)`` says which parameters decay
    (default :func:`weight_decay_mask`); ``None`` decays every parameter, as PyTorch's
    ``AdamW(model.parameters())``.
    """
    if not grad_clip >= 0:
        raise ValueError(f"grad_clip={grad_clip!r} must be >= 0 (0 = no clipping)")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
    adamw = optax.adamw(
        schedule, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay, mask=decay_mask
    )
    if grad_clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
