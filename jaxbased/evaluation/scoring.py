"""Batched scoring and generation on token ids: what an evaluation harness asks of a model.

:class:`LanguageModelScorer` answers the three request kinds of lm-evaluation-harness without
depending on it (the adapter in :mod:`jaxbased.evaluation.lm_eval_model` only converts text):

- :meth:`~LanguageModelScorer.loglikelihood`: for ``(context, continuation)`` token lists,
  ``sum_i log p(continuation_i | context, continuation_<i)`` and whether every continuation
  token is the argmax (greedy) prediction;
- :meth:`~LanguageModelScorer.rolling_loglikelihood`: ``log p(document)`` with every token
  predicted once, in windows of ``max_length`` tokens (lm-eval's ``get_rolling_token_windows``
  with ``context_len=1``, made disjoint);
- :meth:`~LanguageModelScorer.generate_until`: greedy (or sampled) continuations cut at the
  first stop string, computed in batches with :func:`jaxbased.generate`.

Log-probabilities are ``log_softmax`` over the padded vocabulary, as the reference's logits and
our training loss have them. Inputs longer than ``max_length`` keep their last ``max_length``
tokens. Requests are sorted by length and run in batches of ``batch_size`` rows, right-padded
to a bucketed length (powers of two from 16, then multiples of 1024), so that few shapes are
compiled; results come back in the order asked.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxbased.data.tokenizers import Tokenizer
from jaxbased.generation import generate
from jaxbased.model import LanguageModel

MIN_BUCKET = 16
LARGE_BUCKET = 1024


def bucket(length: int) -> int:
    """The padded length of a row of ``length`` tokens: a power of two >= 16 up to 1024, then
    a multiple of 1024."""
    if length <= LARGE_BUCKET:
        return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())
    return -(-length // LARGE_BUCKET) * LARGE_BUCKET


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, continuation)`` windows that predict every token of ``tokens`` once.

    The tokens are cut into blocks of ``max_length`` predicted tokens; the first block is
    conditioned on ``prefix_token``, each later full block on the last token before it, and a
    shorter last block on the ``max_length - len(block)`` tokens before it (so its forward is a
    full ``max_length`` window). Each window is one forward of ``len(context) +
    len(continuation) - 1 <= max_length`` tokens, as lm-eval's
    ``get_rolling_token_windows(..., context_len=1)`` followed by ``make_disjoint_window``.
    """
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be >= 1")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, max_length)
        end = predicted + count
        windows.append((tokens[end - max_length - 1 : end - count], tokens[end - count : end]))
        predicted = end
    return windows


@functools.partial(jax.jit, static_argnums=0)
def _token_scores(
    model: LanguageModel, params: Any, inputs: Int[Array, "B T"], targets: Int[Array, "B T"]
) -> tuple[Float[Array, "B T"], Bool[Array, "B T"]]:
    """``log_softmax(logits)[target] = logits[target] - logsumexp(logits)`` (float32) and
    ``argmax(logits) == target`` per position (no second ``[B, T, V]`` array)."""
    logits = model.apply({"params": params}, inputs).astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    chosen = chosen - jax.nn.logsumexp(logits, axis=-1)
    return chosen, jnp.argmax(logits, axis=-1) == targets


class LanguageModelScorer:
    """Scores and continues token sequences with a jaxbased model (see the module docstring).

    Args:
      model: the language model (its config decides shapes and dtypes).
      params: its float32 parameters (unboxed).
      tokenizer: turns generated ids into text for stop strings; ``eos_id`` ends generation.
      batch_size: rows per compiled call.
      max_length: the most tokens a forward sees (longer inputs keep their tail).
    """

    def __init__(
        self,
        model: LanguageModel,
        params: Any,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 8,
        max_length: int = 2048,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2")
        self.model, self.tokenizer = model, tokenizer
        self.params = jax.tree.map(jnp.asarray, params)
        self.batch_size, self.max_length = batch_size, max_length
        self._stop_token_cache: dict[tuple[str, ...], tuple[int, ...]] = {}

    # Log-likelihoods ----------------------------------------------------------------------------
    def loglikelihood(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` for each ``(context, continuation)``.

        Both are token-id lists; the context must not be empty (give the end-of-text id for
        an unconditional score) and the continuation must hold at most ``max_length`` tokens (an
        empty one scores ``(0.0, True)``).
        """
        rows = []
        for index, (context, continuation) in enumerate(requests):
            context, continuation = list(context), list(continuation)
            if not context:
                raise ValueError(f"request {index}: empty context (start it with eos_id)")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"request {index}: continuation of {len(continuation)} tokens is longer than "
                    f"max_length={self.max_length}"
                )
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        scored = [index for index, row in enumerate(rows) if row[2] > 0]
        order = sorted(scored, key=lambda i: -len(rows[i][0]))
        vocab = self.model.config.vocab_size
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            length = bucket(max(len(rows[i][0]) for i in chosen))
            inputs = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            for row, index in enumerate(chosen):
                row_inputs, row_targets, _ = rows[index]
                if max(row_inputs + row_targets) >= vocab or min(row_inputs + row_targets) < 0:
                    raise ValueError(f"request {index}: token ids outside [0, {vocab})")
                inputs[row, : len(row_inputs)] = row_inputs
                targets[row, : len(row_targets)] = row_targets
            logprobs, greedy = _token_scores(
                self.model, self.params, jnp.asarray(inputs), jnp.asarray(targets)
            )
            logprobs, greedy = np.asarray(logprobs, np.float64), np.asarray(greedy)
            for row, index in enumerate(chosen):
                row_inputs, _, count = rows[index]
                span = slice(len(row_inputs) - count, len(row_inputs))
                results[index] = (float(logprobs[row, span].sum()), bool(greedy[row, span].all()))
        return results

    def rolling_loglikelihood(
        self, documents: Sequence[Sequence[int]], prefix_token: int | None = None
    ) -> list[float]:
        """``log p(document)`` for each token list, every token predicted once after
        ``prefix_token`` (default: the tokenizer's end-of-text id), see :func:`rolling_windows`."""
        prefix = self.tokenizer.eos_id if prefix_token is None else prefix_token
        windows, owners = [], []
        for index, document in enumerate(documents):
            for window in rolling_windows(document, prefix, self.max_length):
                windows.append(window)
                owners.append(index)
        totals = [0.0] * len(documents)
        for owner, (logprob, _) in zip(owners, self.loglikelihood(windows), strict=True):
            totals[owner] += logprob
        return totals

    # Generation ---------------------------------------------------------------------------------
    def stop_tokens(self, until: Sequence[str]) -> tuple[int, ...]:
        """Ids that end a row early for stop strings ``until``: end-of-text, and every token
        whose own text (valid UTF-8) contains a stop string, since the text is cut there anyway.
        Stop strings spread over several tokens are still cut, after generation."""
        key = tuple(sorted(set(until)))
        if key not in self._stop_token_cache:
            stops = {self.tokenizer.eos_id}
            if key:
                for token in range(self.tokenizer.vocab_size):
                    if token == self.tokenizer.eos_id:
                        continue
                    text = self.tokenizer.decode([token])
                    if "\ufffd" not in text and any(s in text for s in key):
                        stops.add(token)
            self._stop_token_cache[key] = tuple(sorted(stops))
        return self._stop_token_cache[key]

    def generate_until(
        self,
        contexts: Sequence[Sequence[int]],
        *,
        until: Sequence[str] = (),
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        """Continue each context (token ids) by up to ``max_new_tokens`` tokens and return the
        text before the first of the stop strings ``until`` (and before end-of-text).

        Contexts keep their last ``max_length - max_new_tokens`` tokens. Rows are generated
        ``batch_size`` at a time (the last batch padded with copies), greedily unless
        ``temperature > 0``.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        keep = self.max_length - max_new_tokens
        if keep < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a context in "
                f"max_length={self.max_length}"
            )
        prompts = []
        for index, context in enumerate(contexts):
            context = list(context)[-keep:]
            if not context:
                raise ValueError(f"context {index} is empty (start it with eos_id)")
            prompts.append(context)
        stops = self.stop_tokens(until)
        texts = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            batch = [prompts[i] for i in chosen]
            batch += [batch[-1]] * (self.batch_size - len(batch))
            result = generate(
                self.model,
                self.params,
                batch,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                stop_tokens=stops,
            )
            for row, index in enumerate(chosen):
                tokens = [t for t in result.tokens[row] if t != self.tokenizer.eos_id]
                text = self.tokenizer.decode(tokens)
                for stop in until:
                    text = text.split(stop)[0]
                texts[index] = text
        return texts
