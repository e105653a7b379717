"""Drawing tokens from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Row ``b`` of a ``[B, V]`` batch of logits draws from ``softmax(filter(logits / temperature))``
with the key ``fold_in(key, b)``, where ``filter`` keeps the ``top_k`` largest logits, then the
smallest set of largest-probability tokens whose probability sums to ``>= top_p``;
``temperature = 0`` is greedy (argmax). :func:`sample_tokens` is the public entry point;
:func:`sample` is its jit-friendly core, with the sampling mode static and the temperature and
``top_p`` traced, as :mod:`jaxbased.generation`'s decode loop uses it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray


def check_sampling_arguments(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ``ValueError`` naming the first of ``temperature`` (finite, >= 0), ``top_k``
    (integer >= 0) and ``top_p`` (in ``(0, 1]``) that is out of range."""
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)) or (
        temperature < 0
    ):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 = no top-k filter)")
    if not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = no nucleus filter)")


def filter_logits(
    logits: Float[Array, "B V"], top_p: Float[Array, ""], *, top_k: int, use_top_p: bool
) -> Float[Array, "B V"]:
    """``logits`` (already divided by the temperature) with the entries that the top-k and
    top-p filters remove set to ``-inf``; ``top_k = 0`` and ``use_top_p = False`` skip them."""
    if top_k:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
    if use_top_p:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep a token while the mass of the tokens ranked above it is below top_p (the most
        # likely token is always kept).
        kept = mass_before < top_p
        threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return logits


def sample(
    logits: Float[Array, "B V"],
    key: PRNGKeyArray,
    temperature: Float[Array, ""],
    top_p: Float[Array, ""],
    *,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
) -> Int[Array, " B"]:
    """One int32 token per row: the argmax when ``greedy``, else a draw from the filtered
    ``softmax(logits / temperature)`` with the key ``fold_in(key, row)``. ``greedy``, ``top_k``
    and ``use_top_p`` are static (Python values); ``temperature`` (> 0) and ``top_p`` may be
    traced float32 scalars."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    filtered = filter_logits(scaled, top_p, top_k=top_k, use_top_p=use_top_p)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(logits.shape[0]))
    return jax.vmap(jax.random.categorical)(row_keys, filtered).astype(jnp.int32)


def sample_tokens(
    logits: Float[Array, "B V"],
    key: PRNGKeyArray,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Int[Array, " B"]:
    """Draw one token per row from ``softmax(filter(logits / temperature))``.

    Args:
      logits: ``[B, V]`` float; entries of ``-inf`` are never drawn.
      key: a PRNG key; row ``b`` uses ``fold_in(key, b)``.
      temperature: ``0`` is greedy (argmax); otherwise > 0.
      top_k: keep only the ``top_k`` largest logits per row (0: all).
      top_p: keep the smallest set of most likely tokens with probability ``>= top_p`` (1: all).

    Returns ``[B]`` int32 token ids. Raises ``ValueError`` for an argument out of range.
    """
    check_sampling_arguments(temperature, top_k, top_p)
    top_k = min(top_k, logits.shape[-1])
    return sample(
        logits,
        key,
        jnp.asarray(temperature if temperature > 0 else 1.0, jnp.float32),
        jnp.asarray(top_p, jnp.float32),
        greedy=temperature == 0,
        top_k=top_k,
        use_top_p=top_p < 1.0,
    )


__all__ = ["check_sampling_arguments", "filter_logits", "sample", "sample_tokens"]
