"""Continuous batching over a fixed number of decode slots (docs/serving.md).

The engine owns one cache of ``num_slots`` rows (``LanguageModel.init_cache(num_slots,
max_len)``): BASED's, Mamba's and the decay mixers' per-row states are fixed-size, window
attention keeps a ring of ``window`` keys, and full attention's keys are bounded by
``max_len``. A background thread runs the scheduler loop, one iteration at a time:

1. **drop** cancelled requests: queued ones leave the queue, running ones free their slots;
2. **prefill**, within ``prefill_token_budget`` prompt tokens per iteration (at least one
   piece of work always runs):

   - a prompt of up to ``prefill_chunk`` tokens is prefilled whole by the parallel forms
     (``[1, bucket]`` tokens, right-padded to :func:`jaxbased.generation.bucket_length`, with
     the prompt's length, so padding never enters a cache);
   - a longer prompt is prefilled in pieces of ``prefill_chunk`` tokens, one piece per
     iteration, so that the running sequences keep decoding between them: the first piece by
     the parallel forms, the next ones by a compiled scan of ``decode_step`` over the piece
     (the recurrent forms) on the request's own one-row cache;

   a prefilled ``[1, ...]`` cache is written into each of the request's slots by a compiled
   ``dynamic_update_slice`` (the slot index is a traced argument: one program for every
   slot), and the first token of each sequence is sampled from the prompt's last logits;
3. **decode**: one compiled step over every slot (``[num_slots]`` tokens in, ``[num_slots]``
   tokens out), each slot with its own temperature, ``top_k``, ``top_p`` and PRNG key;
4. **finish**: a sequence that produced a stop token, a stop string or ``max_tokens`` tokens
   frees its slot in the same iteration, and the next iteration may admit into it.

Recycled Attention (``EngineConfig.recycled_attention``, docs/recycled_attention.md): the
full-attention layers keep a :class:`~jaxbased.ops.recycled_attention_slots.SlotRecycledKVCache`
per slot, with a schedule of its own, reset when a request is inserted into the slot: each
slot takes the steps that ``generate(..., recycled_attention=policy)`` takes for its prompt
alone. The full-attention pass over the cache runs on a decode step when some occupied slot is
due for it (the due slots take it, the others their recycled step); the steps of a chunked
prefill are all full, so that a prompt's last token chooses the first set, as in a whole
prefill.

Compiled programs: one prefill per prompt bucket, one chunk extension, one first-token
sampler, one slot insertion and one decode step. :meth:`Engine.warmup` compiles all of them,
after which a steady server never traces or compiles again (:meth:`Engine.trace_counts`).

Sampling draws as :func:`jaxbased.generate` does: token ``t`` of sequence ``i`` of a request
with seed ``s`` uses the key ``fold_in(fold_in(key(s), t), i)`` and the same filtered
distribution, so a request's tokens do not depend on what else is running, and the ``n``
sequences of a seeded request are the rows of ``generate([prompt] * n, seed=s)``. Greedy
decoding (``temperature = 0``) is the argmax.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jaxtyping import Array, Float, Int

from jaxbased.generation import MIN_BUCKET, bucket_length, check_recycled_attention
from jaxbased.model import LanguageModel, ModelCache
from jaxbased.ops.recycled_attention import RecycledAttentionPolicy
from jaxbased.ops.recycled_attention_slots import (
    SlotRecycledKVCache,
    empty_slot_cache,
    set_row_flags,
    to_slot_caches,
)
from jaxbased.serving.metrics import ServingMetrics

#: Alternatives per token that ``logprobs`` may ask for (OpenAI's limit).
MAX_TOP_LOGPROBS = 5

#: The reasons a sequence ends.
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFullError(RuntimeError):
    """The admission queue is full (answered with HTTP 429)."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or stopped and admits nothing (HTTP 503)."""


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine.

    Attributes:
      num_slots: sequences decoded together (rows of the decode step), >= 1.
      max_len: tokens per sequence, prompt plus generated, >= 2 (full attention's KV cache
        holds this many; the other mixers' caches do not depend on it).
      max_queue: requests waiting for slots before new ones are refused, >= 1.
      prefill_token_budget: prompt tokens prefilled between two decode steps (at least one
        prompt or chunk always is), >= 1.
      prefill_chunk: prompts longer than this are prefilled in pieces of this many tokens,
        one per iteration; 0 prefills every prompt whole. A power of two >= 16 and <=
        ``max_len``, or 0.
      recycled_attention: decode the full-attention layers under this Recycled Attention
        policy, each slot on its own schedule (docs/recycled_attention.md); None: plain
        full attention.
    """

    num_slots: int = 8
    max_len: int = 2048
    max_queue: int = 64
    prefill_token_budget: int = 2048
    prefill_chunk: int = 512
    recycled_attention: RecycledAttentionPolicy | None = None

    def __post_init__(self) -> None:
        _check_int("num_slots", self.num_slots, 1)
        _check_int("max_len", self.max_len, 2)
        _check_int("max_queue", self.max_queue, 1)
        _check_int("prefill_token_budget", self.prefill_token_budget, 1)
        _check_int("prefill_chunk", self.prefill_chunk, 0)
        chunk = self.prefill_chunk
        if chunk and (chunk < MIN_BUCKET or chunk & (chunk - 1) or chunk > self.max_len):
            raise ValueError(
                f"prefill_chunk={chunk} must be 0 (prefill prompts whole) or a power of two "
                f">= {MIN_BUCKET} and <= max_len={self.max_len}"
            )
        policy = self.recycled_attention
        if policy is not None and not isinstance(policy, RecycledAttentionPolicy):
            raise TypeError(
                f"recycled_attention={policy!r} must be a RecycledAttentionPolicy or None"
            )


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (validated by :meth:`check`).

    Attributes:
      max_tokens: tokens to generate per sequence, >= 1.
      temperature: 0 is greedy; else > 0.
      top_k: keep the ``top_k`` most likely tokens (0: all).
      top_p: nucleus mass in ``(0, 1]`` (1: off).
      seed: PRNG seed; None draws one.
      n: sequences for the prompt, each in its own slot.
      stop: strings that end a sequence (not included in its text).
      stop_token_ids: token ids that end a sequence (included in its tokens, not its text).
      logprobs: alternatives per token to report (0 .. 5), or None for no log-probabilities.
      ignore_eos: do not end a sequence at the tokenizer's end-of-text token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False

    def check(self, vocab_size: int) -> None:
        """Raise ``ValueError`` naming the first field out of range."""
        _check_int("max_tokens", self.max_tokens, 1)
        if not isinstance(self.temperature, int | float) or not (
            np.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0")
        _check_int("top_k", self.top_k, 0)
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        _check_int("n", self.n, 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs!r} must be in [0, {MAX_TOP_LOGPROBS}]")
        if any(not isinstance(stop, str) or not stop for stop in self.stop):
            raise ValueError(f"stop={list(self.stop)!r} must hold non-empty strings")
        for token in self.stop_token_ids:
            if not 0 <= token < vocab_size:
                raise ValueError(f"stop token {token} is outside the vocabulary [0, {vocab_size})")


# ----------------------------------------------------------------------------------------------
# Events (engine thread -> whoever submitted)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """Sequence ``choice`` produced ``token_id``; ``text`` is the text that became final with
    it (maybe empty: an incomplete character or a possible start of a stop string waits).

    ``logprob`` is the token's log-probability under the model (before temperature and
    filtering); ``top_logprobs`` the ``(token, log-probability)`` of the most likely tokens,
    as many as the request's ``logprobs`` asks for."""

    choice: int
    token_id: int
    text: str
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class FinishEvent:
    """Sequence ``choice`` ended; ``reason`` is one of :data:`FINISH_REASONS`: ``stop`` (a stop
    token or string), ``length`` (``max_tokens``), ``cancelled`` or ``error``."""

    choice: int
    reason: str


@dataclasses.dataclass(frozen=True)
class ErrorEvent:
    """The request failed inside the engine; no more events follow."""

    message: str


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclasses.dataclass
class _Sequence:
    """One sequence of a request: its tokens and text so far (engine thread only).

    ``text`` is the decoded text of ``text_ids[:committed]`` (whole characters); ``emitted``
    counts the characters of it already sent."""

    index: int
    slot: int = -1
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    committed: int = 0
    emitted: int = 0
    finish_reason: str | None = None
    last_token_time: float = 0.0


class Request:
    """A prompt and its sampling settings, submitted with :meth:`Engine.submit`.

    ``sink(event)`` is called on the engine's thread for every :data:`Event`, in order; it
    must be quick (hand the event to another thread or event loop). ``id`` is set by
    :meth:`Engine.submit`.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sink: Callable[[Event], None],
    ) -> None:
        self.id: int | None = None
        self.prompt_ids = [int(token) for token in prompt_ids]
        self.params = params
        self.sink = sink
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.cancelled = False
        self.sequences = [_Sequence(index) for index in range(params.n)]
        self.seed = (
            int(np.random.default_rng().integers(0, 2**31 - 1))
            if params.seed is None
            else int(params.seed)
        )

    @property
    def done(self) -> bool:
        """Whether every sequence has ended."""
        return all(sequence.finish_reason is not None for sequence in self.sequences)


class Completion:
    """A sink that gathers a request's events (:meth:`Engine.complete` returns it): per
    sequence, ``token_ids``, ``logprobs`` (floats), ``text`` and ``finish_reasons``."""

    def __init__(self, n: int) -> None:
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.text = [""] * n
        self.finish_reasons: list[str | None] = [None] * n
        self.error: str | None = None
        self.finished = threading.Event()

    def __call__(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.token_ids[event.choice].append(event.token_id)
            self.logprobs[event.choice].append(event.logprob)
            self.text[event.choice] += event.text
        elif isinstance(event, FinishEvent):
            self.finish_reasons[event.choice] = event.reason
            if all(reason is not None for reason in self.finish_reasons):
                self.finished.set()
        else:
            self.error = event.message
            self.finished.set()


@dataclasses.dataclass
class _Prefilling:
    """A request whose long prompt is being prefilled chunk by chunk into its own one-row
    cache, its slots reserved (engine thread only)."""

    request: Request
    slots: list[int]
    cache: ModelCache
    logits: Array
    done_tokens: int


# ----------------------------------------------------------------------------------------------
# Compiled programs


def choose_tokens(
    logits: Float[Array, "B V"],
    key_data: Array,
    steps: Int[Array, " B"],
    rows: Int[Array, " B"],
    temperature: Float[Array, " B"],
    top_k: Int[Array, " B"],
    top_p: Float[Array, " B"],
    *,
    vocab_size: int,
    top_n: int = MAX_TOP_LOGPROBS,
) -> tuple[Int[Array, " B"], Float[Array, " B"], Int[Array, "B N"], Float[Array, "B N"]]:
    """One token per row, each with its own sampling settings, as :func:`jaxbased.generate`
    draws them: greedy rows (``temperature = 0``) take the argmax; the others draw from
    ``softmax(filter(logits / temperature))`` (``top_k`` then ``top_p``; 0 and 1 are off) with
    the key ``fold_in(fold_in(wrap_key_data(key_data[b]), steps[b]), rows[b])``.

    ``logits`` ``[B, padded_vocab]`` (ids ``>= vocab_size`` are never drawn); ``key_data``
    ``[B, 2]`` uint32 (``jax.random.key_data`` of a threefry key). Returns the ``[B]`` int32
    tokens, their ``[B]`` float32 log-probabilities under the model (before temperature and
    filtering), and the ``[B, top_n]`` most likely tokens (int32) and log-probabilities.
    """
    logits = logits.astype(jnp.float32)
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> Array:
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        descending = -jnp.sort(-scaled, axis=-1)
        kth = jnp.clip(top_k, 1, vocab_size) - 1
        kth_largest = jnp.take_along_axis(descending, kth[:, None], axis=-1)
        filtered = jnp.where((top_k[:, None] > 0) & (scaled < kth_largest), -jnp.inf, scaled)
        descending = -jnp.sort(-filtered, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = mass_before < top_p[:, None]
        threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        nucleus = jnp.where(filtered >= threshold, filtered, -jnp.inf)
        filtered = jnp.where((top_p < 1.0)[:, None], nucleus, filtered)

        def row_key(data: Array, step: Array, row: Array) -> Array:
            key = jax.random.wrap_key_data(data)
            return jax.random.fold_in(jax.random.fold_in(key, step), row)

        keys = jax.vmap(row_key)(key_data, steps, rows)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy_tokens)

    tokens = jax.lax.cond(jnp.all(temperature == 0), lambda: greedy_tokens, sampled)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(log_probs, min(top_n, vocab_size))
    return tokens, chosen, top_ids.astype(jnp.int32), top_values


def params_collection(params: Any) -> Any:
    """The ``params`` collection, unboxed: what ``generate`` accepts (boxed or not, or
    ``{"params": ...}``) in the form ``model.apply({"params": ...})`` takes."""
    params = nn.meta.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return params


def _batch_axes(init_cache: Callable[[int], ModelCache]) -> Any:
    """The batch axis of every leaf of the cache ``init_cache(rows)`` (where 1 and 2 rows
    differ)."""
    one = jax.eval_shape(lambda: init_cache(1))
    two = jax.eval_shape(lambda: init_cache(2))

    def axis(a: jax.ShapeDtypeStruct, b: jax.ShapeDtypeStruct) -> int:
        differing = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
        if len(differing) != 1:
            raise ValueError(f"a cache leaf of shape {a.shape} has no single batch axis")
        return differing[0]

    return jax.tree.map(axis, one, two)


class _Programs:
    """The engine's jitted programs for one model and engine size. ``traces`` counts how often
    each was traced (a trace precedes every compilation)."""

    def __init__(self, model: LanguageModel, config: EngineConfig, params: Any) -> None:
        self.model = model
        self.config = config
        self.policy = config.recycled_attention
        self.vocab_size = model.config.vocab_size
        self._params_shape = jax.eval_shape(lambda: params)
        self.batch_axes = _batch_axes(self.init_cache)
        self.traces: collections.Counter[str] = collections.Counter()
        self.prefill = jax.jit(self._prefill)
        self.extend = jax.jit(self._extend, donate_argnums=(1,))
        self.insert = jax.jit(self._insert, donate_argnums=(0,))
        self.first_tokens = jax.jit(self._first_tokens)
        self.decode = jax.jit(self._decode, donate_argnums=(1,))

    def init_cache(self, rows: int) -> ModelCache:
        """An empty cache of ``rows`` slots; under a policy, its full-attention layers hold
        empty :class:`SlotRecycledKVCache` (found by the structure of a prefill's cache)."""
        plain = self.model.init_cache(rows, self.config.max_len)
        if self.policy is None:
            return plain
        tokens = jax.ShapeDtypeStruct((rows, 1), jnp.int32)
        lengths = jax.ShapeDtypeStruct((rows,), jnp.int32)
        _, structure = jax.eval_shape(self._apply_prefill, self._params_shape, tokens, lengths)
        layers = tuple(
            empty_slot_cache(layer, self.policy)
            if isinstance(shape, SlotRecycledKVCache)
            else layer
            for layer, shape in zip(plain.layers, structure.layers, strict=True)
        )
        return ModelCache(layers=layers, positions=plain.positions)

    def _apply_prefill(
        self, params: Any, tokens: Int[Array, "B T"], lengths: Int[Array, " B"]
    ) -> tuple[Float[Array, "B V"], ModelCache]:
        logits, cache = self.model.apply(
            {"params": params},
            tokens,
            self.config.max_len,
            lengths,
            True,
            self.policy,
            method=LanguageModel.prefill,
        )
        return logits, to_slot_caches(cache)

    def _prefill(
        self, params: Any, tokens: Int[Array, "1 T"], lengths: Int[Array, " 1"]
    ) -> tuple[Float[Array, "1 V"], ModelCache]:
        self.traces["prefill"] += 1
        return self._apply_prefill(params, tokens, lengths)

    def _extend(
        self,
        params: Any,
        cache: ModelCache,
        logits: Float[Array, "1 V"],
        tokens: Int[Array, "1 C"],
        count: Int[Array, ""],
    ) -> tuple[Float[Array, "1 V"], ModelCache]:
        """Feed the first ``count`` of ``tokens`` to a one-row cache, one decode step each;
        the logits after the last one (``logits`` if ``count`` is 0) and the cache. Under a
        policy every step is a full one (``force_full``), so the set after the prompt comes
        from its last token, and the full steps of the prompt are not counted."""
        self.traces["extend"] += 1

        def step(carry: tuple, inputs: tuple) -> tuple[tuple, None]:
            cache, logits = carry
            token, index = inputs
            if self.policy is not None:
                cache = set_row_flags(cache, force_full=True)
            new_logits, new_cache = self.model.apply(
                {"params": params}, token[None], cache, method=LanguageModel.decode_step
            )
            valid = index < count
            cache = jax.tree.map(lambda new, old: jnp.where(valid, new, old), new_cache, cache)
            return (cache, jnp.where(valid, new_logits, logits)), None

        indices = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        (cache, logits), _ = jax.lax.scan(step, (cache, logits), (tokens[0], indices))
        if self.policy is not None:
            cache = set_row_flags(cache, force_full=False, clear_full_steps=True)
        return logits, cache

    def _insert(self, cache: ModelCache, one: ModelCache, slot: Array) -> ModelCache:
        self.traces["insert"] += 1

        def put(leaf: Array, row: Array, axis: int) -> Array:
            return jax.lax.dynamic_update_slice_in_dim(leaf, row.astype(leaf.dtype), slot, axis)

        return jax.tree.map(put, cache, one, self.batch_axes)

    def _first_tokens(self, logits: Float[Array, "1 V"], *sampling: Array) -> tuple:
        self.traces["first_tokens"] += 1
        rows = sampling[0].shape[0]
        return choose_tokens(
            jnp.broadcast_to(logits, (rows, logits.shape[-1])),
            *sampling,
            vocab_size=self.vocab_size,
        )

    def _decode(
        self,
        params: Any,
        cache: ModelCache,
        tokens: Int[Array, " S"],
        occupied: Int[Array, " S"],
        *sampling: Array,
    ) -> tuple:
        """One step of every slot; ``occupied [S]`` bool marks the slots holding a sequence
        (under a policy only they can cause the full-attention pass)."""
        self.traces["decode"] += 1
        if self.policy is not None:
            cache = set_row_flags(cache, active=occupied)
        logits, cache = self.model.apply(
            {"params": params}, tokens, cache, method=LanguageModel.decode_step
        )
        return (*choose_tokens(logits, *sampling, vocab_size=self.vocab_size), cache)


# ----------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Continuous-batching generation over ``config.num_slots`` slots, in a background thread.

    Args:
      model: a :class:`~jaxbased.LanguageModel` (only its config is used).
      params: its parameters (the ``params`` collection, boxed or not, or ``{"params": ...}``,
        as :func:`jaxbased.generate` takes them). The compiled programs take them as they
        are placed; the slots' cache is built unsharded.
      config: the engine's sizes.
      decode_text: token ids -> text (the tokenizer's ``decode``), for stop strings and the
        streamed text; None keeps only token ids (stop strings are then refused).
      eos_id: the end-of-text token, a stop token of every request that does not set
        ``ignore_eos``.
      metrics: where to count (a new :class:`ServingMetrics` if None).

    Call :meth:`warmup`, then :meth:`start` (or use it as a context manager), :meth:`submit`
    requests, and :meth:`stop` it.
    """

    def __init__(
        self,
        model: LanguageModel,
        params: Any,
        config: EngineConfig | None = None,
        *,
        decode_text: Callable[[Sequence[int]], str] | None = None,
        eos_id: int | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        config = EngineConfig() if config is None else config
        self.model = model
        self.params = params_collection(params)
        self.config = config
        self.vocab_size = model.config.vocab_size
        self.decode_text = decode_text
        self.eos_id = eos_id
        self.metrics = ServingMetrics() if metrics is None else metrics
        check_recycled_attention(model.config, config.recycled_attention)
        self._programs = _Programs(model, config, self.params)
        self._request_ids = itertools.count()

        slots = config.num_slots
        self._cache = self._programs.init_cache(slots)
        self._tokens = np.zeros((slots,), np.int32)
        self._key_data = np.zeros((slots, 2), np.uint32)
        self._steps = np.zeros((slots,), np.int32)
        self._rows = np.zeros((slots,), np.int32)
        self._temperature = np.zeros((slots,), np.float32)
        self._top_k = np.zeros((slots,), np.int32)
        self._top_p = np.ones((slots,), np.float32)
        self._owners: list[tuple[Request, _Sequence] | None] = [None] * slots
        self._reserved: set[int] = set()

        self._queue: collections.deque[Request] = collections.deque()
        self._prefilling: list[_Prefilling] = []
        self._running: dict[int, Request] = {}
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._abort = False
        self.iterations = 0

        self.metrics.add_gauge("queue_depth", "requests waiting for slots", self.queue_depth)
        self.metrics.add_gauge("slots_busy", "slots holding a sequence", self.busy_slots)
        self.metrics.add_gauge("slots_total", "decode slots", lambda: float(slots))
        self.metrics.add_gauge(
            "requests_running", "requests holding slots", lambda: float(len(self._running))
        )

    # -- state ---------------------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Requests waiting for slots."""
        return len(self._queue)

    def busy_slots(self) -> int:
        """Slots holding a sequence (decoding, or reserved for a prompt being prefilled)."""
        return sum(owner is not None for owner in self._owners) + len(self._reserved)

    @property
    def accepting(self) -> bool:
        """Whether :meth:`submit` admits requests (False once draining or stopped)."""
        return self._accepting and not self._stop

    @property
    def idle(self) -> bool:
        """No request is queued, being prefilled or running."""
        return not (self._queue or self._prefilling or self._running)

    def trace_counts(self) -> dict[str, int]:
        """How often each compiled program has been traced: a steady server's counts stop
        growing once :meth:`warmup` has run."""
        return dict(self._programs.traces)

    def prompt_buckets(self) -> list[int]:
        """The padded lengths that a whole-prompt prefill may take (the prompts of up to
        ``prefill_chunk`` tokens, or of up to ``max_len - 1`` when prompts are not chunked)."""
        limit = self.config.prefill_chunk or self.config.max_len - 1
        buckets, length = [], 1
        while length <= limit:
            bucket = self._bucket(length)
            buckets.append(bucket)
            length = bucket + 1
        return buckets

    def _bucket(self, length: int) -> int:
        return min(bucket_length(length), self.config.max_len)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> Engine:
        """Start the scheduler thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jaxbased-engine", daemon=True)
            self._thread.start()
        return self

    def drain(self) -> None:
        """Stop admitting requests; queued and running ones go on."""
        with self._condition:
            self._accepting = False
            self._condition.notify_all()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop admitting, let queued and running requests finish for up to ``timeout``
        seconds, cancel what is left, and end the thread. Returns whether all finished."""
        self.drain()
        deadline = time.monotonic() + timeout
        with self._condition:
            while not self.idle and self._thread is not None and time.monotonic() < deadline:
                self._condition.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            finished = self.idle
            self._stop = True
            self._abort = not finished
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, timeout))
        if not finished:
            logging.warning("engine stopped with requests unfinished: they were cancelled")
        return finished

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests ------------------------------------------------------------------------------

    def check_prompt(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        """Raise ``ValueError`` unless the prompt's ids are in the vocabulary and the prompt
        and ``max_tokens`` fit in ``max_len``."""
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        bad = [token for token in prompt_ids if not 0 <= int(token) < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        total = len(prompt_ids) + max_tokens
        if total > self.config.max_len:
            raise ValueError(
                f"the prompt's {len(prompt_ids)} tokens plus max_tokens={max_tokens} make "
                f"{total}, more than this server's maximum of {self.config.max_len} tokens per "
                "sequence"
            )

    def check_request(self, request: Request) -> None:
        """Raise ``ValueError`` for a request this engine cannot run."""
        request.params.check(self.vocab_size)
        self.check_prompt(request.prompt_ids, request.params.max_tokens)
        if request.params.n > self.config.num_slots:
            raise ValueError(
                f"n={request.params.n} is more than this server's {self.config.num_slots} "
                "decode slots"
            )
        if request.params.stop and self.decode_text is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")

    def submit(self, requests: Request | Sequence[Request]) -> None:
        """Queue requests (all or none). Raises ``ValueError`` for an invalid one,
        :class:`QueueFullError` when they do not fit in the queue, and
        :class:`EngineStoppedError` when the engine no longer admits requests."""
        requests = [requests] if isinstance(requests, Request) else list(requests)
        for request in requests:
            self.check_request(request)
        with self._condition:
            if not self.accepting:
                raise EngineStoppedError("the server is shutting down and admits no requests")
            if len(self._queue) + len(requests) > self.config.max_queue:
                raise QueueFullError(
                    f"the queue is full ({len(self._queue)} of {self.config.max_queue} requests "
                    "waiting); retry later"
                )
            for request in requests:
                request.id = next(self._request_ids)
            self._queue.extend(requests)
            self._condition.notify_all()

    def cancel(self, request: Request) -> None:
        """Cancel a request (queued or running): its slots are freed at the next iteration.
        Thread-safe; cancelling a finished request does nothing."""
        with self._condition:
            request.cancelled = True
            self._condition.notify_all()

    def complete(
        self, prompt_ids: Sequence[int], params: SamplingParams, timeout: float = 300.0
    ) -> Completion:
        """Submit one request and wait for it (for scripts and tests; the engine must be
        started). Raises ``TimeoutError`` or ``RuntimeError`` (an engine failure)."""
        result = Completion(params.n)
        self.submit(Request(prompt_ids, params, result))
        if not result.finished.wait(timeout):
            raise TimeoutError(f"the request did not finish in {timeout} s")
        if result.error is not None:
            raise RuntimeError(result.error)
        return result

    def warmup(self) -> None:
        """Compile every program: the prefill of every prompt bucket, the chunk extension,
        the first-token sampler, the slot insertion and the decode step. Only free slots are
        written. Call it before :meth:`start`."""
        if self._thread is not None:
            raise RuntimeError("warmup() must run before start()")
        start = time.perf_counter()
        logits, one = None, None
        for bucket in self.prompt_buckets():
            logits, one = self._run_prefill(np.zeros((1, bucket), np.int32), 1)
        if self.config.prefill_chunk:
            chunk = np.zeros((1, self.config.prefill_chunk), np.int32)
            logits, one = self._run_extend(one, logits, chunk, 0)
        self._run_insert(one, 0)
        self._run_first_tokens(logits)
        self._run_decode()
        jax.block_until_ready(self._cache)
        logging.info(
            "engine warm-up: %s traced in %.1f s", self.trace_counts(), time.perf_counter() - start
        )

    # -- compiled calls ------------------------------------------------------------------------

    def _run_prefill(self, tokens: np.ndarray, length: int) -> tuple[Array, ModelCache]:
        lengths = np.array([length], np.int32)
        return self._programs.prefill(self.params, jnp.asarray(tokens), jnp.asarray(lengths))

    def _run_extend(
        self, cache: ModelCache, logits: Array, tokens: np.ndarray, count: int
    ) -> tuple[Array, ModelCache]:
        return self._programs.extend(
            self.params, cache, logits, jnp.asarray(tokens), jnp.asarray(count, jnp.int32)
        )

    def _sampling_arrays(self) -> tuple[np.ndarray, ...]:
        return (
            self._key_data,
            self._steps,
            self._rows,
            self._temperature,
            self._top_k,
            self._top_p,
        )

    def _run_first_tokens(self, logits: Array) -> tuple[np.ndarray, ...]:
        return jax.device_get(self._programs.first_tokens(logits, *self._sampling_arrays()))

    def _run_insert(self, one: ModelCache, slot: int) -> None:
        self._cache = self._programs.insert(self._cache, one, jnp.asarray(slot, jnp.int32))

    def _run_decode(self) -> tuple[np.ndarray, ...]:
        occupied = np.array([owner is not None for owner in self._owners])
        *outputs, self._cache = self._programs.decode(
            self.params, self._cache, self._tokens, occupied, *self._sampling_arrays()
        )
        return jax.device_get(tuple(outputs))

    # -- the scheduler loop --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._stop and self.idle:
                    self._condition.wait()
                if self._stop and (self._abort or self.idle):
                    break
            try:
                self._drop_cancelled()
                self._prefill_within_budget()
                if self._running:
                    self._decode_once()
                self.iterations += 1
            except Exception as error:  # a bug or a device failure: fail what is running
                logging.exception("engine iteration failed")
                self._fail_all(f"the engine failed: {type(error).__name__}: {error}")
            with self._condition:
                self._condition.notify_all()
        self._cancel_all()
        with self._condition:
            self._condition.notify_all()

    def _free_slots(self) -> list[int]:
        return [
            slot
            for slot, owner in enumerate(self._owners)
            if owner is None and slot not in self._reserved
        ]

    def _drop_cancelled(self) -> None:
        with self._condition:
            cancelled = [request for request in self._queue if request.cancelled]
            for request in cancelled:
                self._queue.remove(request)
        for request in cancelled:
            self._finish_request(request, "cancelled")
        for pending in [pending for pending in self._prefilling if pending.request.cancelled]:
            self._prefilling.remove(pending)
            self._reserved.difference_update(pending.slots)
            self._finish_request(pending.request, "cancelled")
        for request in [request for request in self._running.values() if request.cancelled]:
            self._finish_request(request, "cancelled")

    def _prefill_within_budget(self) -> None:
        """Continue the chunked prefills, then admit queued requests, while the iteration's
        budget of prompt tokens lasts (at least one piece of work runs)."""
        budget = self.config.prefill_token_budget
        chunk = self.config.prefill_chunk
        worked = False
        for pending in list(self._prefilling):
            count = min(chunk, len(pending.request.prompt_ids) - pending.done_tokens)
            if worked and count > budget:
                return
            self._continue_chunked(pending, count)
            budget -= count
            worked = True
        while True:
            with self._condition:
                if not self._queue:
                    return
                request = self._queue[0]
                length = len(request.prompt_ids)
                cost = min(length, chunk) if chunk else length
                free = self._free_slots()
                if len(free) < request.params.n or (worked and cost > budget):
                    return
                self._queue.popleft()
            slots = free[: request.params.n]
            if chunk and length > chunk:
                self._start_chunked(request, slots)
            else:
                self._prefill_whole(request, slots)
            budget -= cost
            worked = True

    def _prefill_whole(self, request: Request, slots: list[int]) -> None:
        start = time.perf_counter()
        length = len(request.prompt_ids)
        prompt = np.zeros((1, self._bucket(length)), np.int32)
        prompt[0, :length] = request.prompt_ids
        logits, one = self._run_prefill(prompt, length)
        self._place(request, slots, logits, one)
        self.metrics.observe("prefill_seconds", time.perf_counter() - start)

    def _start_chunked(self, request: Request, slots: list[int]) -> None:
        start = time.perf_counter()
        chunk = self.config.prefill_chunk
        prompt = np.asarray(request.prompt_ids[:chunk], np.int32)[None]
        logits, one = self._run_prefill(prompt, chunk)
        self._reserved.update(slots)
        self._prefilling.append(_Prefilling(request, slots, one, logits, chunk))
        self.metrics.observe("prefill_seconds", time.perf_counter() - start)

    def _continue_chunked(self, pending: _Prefilling, count: int) -> None:
        start = time.perf_counter()
        chunk = self.config.prefill_chunk
        tokens = np.zeros((1, chunk), np.int32)
        done = pending.done_tokens
        tokens[0, :count] = pending.request.prompt_ids[done : done + count]
        pending.logits, pending.cache = self._run_extend(
            pending.cache, pending.logits, tokens, count
        )
        pending.done_tokens += count
        if pending.done_tokens == len(pending.request.prompt_ids):
            self._prefilling.remove(pending)
            self._reserved.difference_update(pending.slots)
            self._place(pending.request, pending.slots, pending.logits, pending.cache)
        self.metrics.observe("prefill_seconds", time.perf_counter() - start)

    def _place(self, request: Request, slots: list[int], logits: Array, one: ModelCache) -> None:
        """Write a prefilled one-row cache into the request's slots and take the first token
        of each of its sequences."""
        params = request.params
        key_data = np.asarray(jax.random.key_data(jax.random.key(request.seed)), np.uint32)
        for sequence, slot in zip(request.sequences, slots, strict=True):
            self._run_insert(one, slot)
            sequence.slot = slot
            self._owners[slot] = (request, sequence)
            self._tokens[slot] = 0
            self._key_data[slot] = key_data
            self._steps[slot] = 0
            self._rows[slot] = sequence.index
            self._temperature[slot] = params.temperature
            self._top_k[slot] = min(params.top_k, self.vocab_size)
            self._top_p[slot] = params.top_p
        self._running[request.id] = request
        self.metrics.increment("prompt_tokens_total", len(request.prompt_ids))
        # One program whatever n is: the prompt's logits are sampled for every slot, and the
        # rows of the other slots are ignored.
        tokens, logprobs, top_ids, top_values = self._run_first_tokens(logits)
        for sequence in request.sequences:
            slot = sequence.slot
            self._accept_token(
                request,
                sequence,
                int(tokens[slot]),
                float(logprobs[slot]),
                top_ids[slot],
                top_values[slot],
            )

    def _decode_once(self) -> None:
        start = time.perf_counter()
        tokens, logprobs, top_ids, top_values = self._run_decode()
        self.metrics.observe("decode_step_seconds", time.perf_counter() - start)
        for slot, owner in enumerate(self._owners):
            if owner is None:
                continue
            request, sequence = owner
            self._accept_token(
                request,
                sequence,
                int(tokens[slot]),
                float(logprobs[slot]),
                top_ids[slot],
                top_values[slot],
            )

    def _accept_token(
        self,
        request: Request,
        sequence: _Sequence,
        token: int,
        logprob: float,
        top_ids: np.ndarray,
        top_values: np.ndarray,
    ) -> None:
        """Record a sequence's new token, send it, and finish the sequence if it stops."""
        now = time.perf_counter()
        params = request.params
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.observe("time_to_first_token_seconds", now - request.arrival)
        elif sequence.last_token_time:
            self.metrics.observe("time_per_output_token_seconds", now - sequence.last_token_time)
        sequence.last_token_time = now
        self.metrics.increment("generation_tokens_total")
        sequence.token_ids.append(token)
        self._tokens[sequence.slot] = token
        self._steps[sequence.slot] += 1

        is_stop_token = token in params.stop_token_ids or (
            token == self.eos_id and not params.ignore_eos
        )
        if not is_stop_token:
            sequence.text_ids.append(token)
        last = is_stop_token or len(sequence.token_ids) >= params.max_tokens
        text, stop_found = self._advance_text(sequence, params, last)
        top: tuple[tuple[int, float], ...] = ()
        if params.logprobs:
            top = tuple(
                (int(i), float(v))
                for i, v in zip(
                    top_ids[: params.logprobs], top_values[: params.logprobs], strict=True
                )
            )
        request.sink(TokenEvent(sequence.index, token, text, logprob, top))
        if is_stop_token or stop_found:
            self._finish_sequence(request, sequence, "stop")
        elif last:
            self._finish_sequence(request, sequence, "length")

    def _advance_text(
        self, sequence: _Sequence, params: SamplingParams, last: bool
    ) -> tuple[str, bool]:
        """The text that became final with the newest token, and whether a stop string ended
        the sequence (its text then ends just before the stop string). Held back: an
        incomplete character, and a tail that may be the start of a stop string."""
        if self.decode_text is None:
            return "", False
        pending = sequence.text_ids[sequence.committed :]
        tail = self.decode_text(pending) if pending else ""
        full = sequence.text + tail
        if not tail.endswith("\ufffd"):  # whole characters: decode them only once
            sequence.text, sequence.committed = full, len(sequence.text_ids)
        found = [index for index in (full.find(stop, sequence.emitted) for stop in params.stop)]
        found = [index for index in found if index >= 0]
        if found:
            end = min(found)
            piece = full[sequence.emitted : end]
            sequence.emitted = end
            return piece, True
        safe = len(full)
        if not last:
            safe = len(full.rstrip("\ufffd"))
            for stop in params.stop:
                for size in range(min(len(stop) - 1, safe), 0, -1):
                    if full[:safe].endswith(stop[:size]):
                        safe -= size
                        break
        piece = full[sequence.emitted : safe] if safe > sequence.emitted else ""
        sequence.emitted = max(sequence.emitted, safe)
        return piece, False

    def _finish_sequence(self, request: Request, sequence: _Sequence, reason: str) -> None:
        if sequence.finish_reason is not None:
            return
        sequence.finish_reason = reason
        if sequence.slot >= 0:
            self._owners[sequence.slot] = None
            self._temperature[sequence.slot] = 0.0  # a free slot never asks for sampling
            sequence.slot = -1
        request.sink(FinishEvent(sequence.index, reason))
        if request.done:
            self._running.pop(request.id, None)
            self.metrics.increment("requests_total", outcome=reason)
            self.metrics.observe("request_seconds", time.perf_counter() - request.arrival)

    def _finish_request(self, request: Request, reason: str) -> None:
        for sequence in request.sequences:
            self._finish_sequence(request, sequence, reason)
        self._running.pop(request.id, None)

    def _release(self, request: Request) -> None:
        for sequence in request.sequences:
            if sequence.slot >= 0:
                self._owners[sequence.slot] = None
                self._temperature[sequence.slot] = 0.0
                sequence.slot = -1
            sequence.finish_reason = sequence.finish_reason or "error"

    def _take_everything(self) -> list[Request]:
        with self._condition:
            waiting = list(self._queue)
            self._queue.clear()
        prefilling = [pending.request for pending in self._prefilling]
        self._prefilling.clear()
        self._reserved.clear()
        running = list(self._running.values())
        self._running.clear()
        return [*waiting, *prefilling, *running]

    def _fail_all(self, message: str) -> None:
        for request in self._take_everything():
            self._release(request)
            request.sink(ErrorEvent(message))
            self.metrics.increment("requests_total", outcome="error")

    def _cancel_all(self) -> None:
        for request in self._take_everything():
            self._finish_request(request, "cancelled")


__all__ = [
    "FINISH_REASONS",
    "MAX_TOP_LOGPROBS",
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineStoppedError",
    "ErrorEvent",
    "Event",
    "FinishEvent",
    "QueueFullError",
    "Request",
    "SamplingParams",
    "TokenEvent",
    "choose_tokens",
]
