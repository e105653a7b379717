"""Perplexity of a model over a prepared token dataset (``jaxbased-prepare-data`` output).

The split's token stream (documents joined by the end-of-text id, as training sees it) is cut
into windows of ``seq_len + 1`` tokens starting every ``seq_len`` tokens; each window predicts
its last tokens from the ones before, so every token but the first is predicted exactly once,
with a context that restarts every ``seq_len`` tokens (the windows of ``train.py``'s
evaluation; the last window may be shorter). With ``N`` predicted tokens ``x_t``:

    loss = -(1 / N) sum_t log softmax(logits_t)[x_t]      (nats per token, padded vocabulary)
    perplexity = exp(loss),   bits_per_token = loss / ln 2
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxbased.data.token_store import TokenDataset
from jaxbased.model import LanguageModel


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Mean negative log-likelihood ``loss`` (nats/token) over ``tokens`` predicted tokens."""

    loss: float
    perplexity: float
    bits_per_token: float
    tokens: int
    windows: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(
    model: LanguageModel, params: Any, windows: Int[Array, "B L"], lengths: Int[Array, " B"]
) -> Float[Array, ""]:
    """Summed ``-log p`` (float32) of ``windows[b, 1:lengths[b]]`` given the tokens before."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits = model.apply({"params": params}, inputs).astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    chosen = chosen - jax.nn.logsumexp(logits, axis=-1)  # log_softmax at the targets only
    valid = jnp.arange(targets.shape[1])[None, :] < (lengths[:, None] - 1)
    return -jnp.sum(jnp.where(valid, chosen, 0.0))


def perplexity_of_tokens(
    model: LanguageModel,
    params: Any,
    tokens: Int[np.ndarray, " N"],
    *,
    seq_len: int = 2048,
    batch_size: int = 8,
) -> PerplexityResult:
    """Perplexity of a token stream ``tokens [N]`` (int) cut into windows as described above.

    Raises ``ValueError`` for fewer than 2 tokens or ids outside the model's vocabulary.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    tokens = np.asarray(tokens, np.int64)
    if tokens.ndim != 1 or tokens.size < 2:
        raise ValueError(f"need a 1-D stream of at least 2 tokens; got shape {tokens.shape}")
    vocab = model.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}); got {tokens.min()}..{tokens.max()}")
    starts = list(range(0, tokens.size - 1, seq_len))
    params = jax.tree.map(jnp.asarray, params)
    total = 0.0
    for first in range(0, len(starts), batch_size):
        windows = np.zeros((batch_size, seq_len + 1), np.int32)
        lengths = np.zeros((batch_size,), np.int32)
        for row, start in enumerate(starts[first : first + batch_size]):
            piece = tokens[start : start + seq_len + 1]
            windows[row, : piece.size] = piece
            lengths[row] = piece.size
        total += float(_window_nll(model, params, jnp.asarray(windows), jnp.asarray(lengths)))
    count = tokens.size - 1
    loss = total / count
    return PerplexityResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_token=loss / math.log(2),
        tokens=count,
        windows=len(starts),
    )


def evaluate_perplexity(
    model: LanguageModel,
    params: Any,
    dataset: TokenDataset,
    *,
    split: str = "validation",
    seq_len: int = 2048,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a split of a prepared dataset (its first ``max_tokens``)."""
    if dataset.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the dataset's tokenizer has {dataset.vocab_size} ids but the model only "
            f"{model.config.vocab_size}: it was tokenized for another model"
        )
    start, end = dataset.split_bounds(split)
    if max_tokens is not None:
        end = min(end, start + max_tokens)
    tokens = dataset.tokens(split)[: end - start]
    if not isinstance(tokens, np.ndarray):  # a lazily read TensorStore view
        tokens = tokens.read().result()
    return perplexity_of_tokens(model, params, tokens, seq_len=seq_len, batch_size=batch_size)
