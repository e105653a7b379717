"""Batched autoregressive generation with fixed-size caches (greedy, temperature, top-k, top-p).

``generate(model, params, prompts, max_new_tokens=...)`` runs two compiled programs:

1. **Prefill** (``jax.jit``): the prompts, right-padded to a bucketed length ``T``, go through
   the parallel forms of every layer (chunked linear attention, blocked window attention, conv)
   with their per-row lengths, so that every layer's cache holds exactly the valid tokens of its
   row: padding is never seen by a valid position (the model is causal), never enters a window
   or KV cache (those slots keep position -1), a conv state, or a linear-attention state. Only
   the logits at each row's last prompt token are computed (``[B, V]``, not ``[B, T, V]``).
2. **Decode** (``jax.jit`` around a ``lax.while_loop``): each iteration feeds one token per row
   at that row's own position (``cache.positions [B]``), samples the next token and writes it
   with ``dynamic_update_slice`` into a ``[B, max_new_tokens]`` buffer. Rows stop on their own
   (a stop token), the loop ends when every row has stopped or ``max_new_tokens`` are made. The
   caches are loop-carried and donated, so XLA updates them in place (no per-step copy; see
   ``tests/test_generation.py::test_decode_loop_does_not_copy_the_caches``).

Sampling at step ``t`` for row ``b`` draws from ``softmax(filter(logits / temperature))`` with the
key ``fold_in(fold_in(key(seed), t), b)`` (:mod:`jaxbased.sampling`: ``filter`` keeps the
``top_k`` largest logits, then the smallest set of largest-probability tokens whose probability
sums to ``>= top_p``). ``temperature = 0`` is greedy (argmax). Token ids ``>= vocab_size``
(the padded embedding rows) are never produced. Log-probabilities are those of the model
itself, ``log_softmax(logits)[token]`` over the real vocabulary, before temperature and
filtering.

Compilation: one prefill per (batch, bucketed prompt length, ``max_new_tokens``) and one decode
loop per (batch, ``max_new_tokens``, sampling mode: greedy / top-k / top-p on or off, callback
on or off); temperature, top_p values, seed, stop tokens and the callback function itself are
runtime arguments. Prompt lengths are bucketed to powers of two from 16 to 1024, then multiples
of 1024.

Streaming: ``callback(step, tokens)`` is called on the host from inside the compiled loop with
``jax.experimental.io_callback(..., ordered=True)``: one program, no per-chunk dispatch or
host round trip, tokens arrive in order as soon as each step is done. The price is that the
loop waits for the callback, so it should be quick (printing text is). A single compiled
trampoline dispatches to the current callback by id, so a new callback function does not
recompile.

Recycled Attention (``recycled_attention=RecycledAttentionPolicy(top_k=...)``,
docs/recycled_attention.md): the full-attention layers keep their whole KV cache and decode most
steps over a recycled set of ``top_k`` keys per head, refreshed from the attention probabilities
of a full step every ``stride`` steps (or when the query drifts). It is part of the cache's
structure, so each policy compiles its own prefill and decode loop once; the choice between a
full and a recycled step is a ``lax.cond`` per layer inside the loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jaxtyping import Array, Int

from jaxbased.config import ModelConfig
from jaxbased.layers.mixer import accepts_recycled_attention
from jaxbased.model import LanguageModel, ModelCache, layer_mixer
from jaxbased.ops.recycled_attention import RecycledAttentionPolicy, RecycledKVCache
from jaxbased.sampling import check_sampling_arguments, sample

#: Prompt lengths are padded up to powers of two from this one ...
MIN_BUCKET = 16
#: ... up to this one, then to multiples of it.
LARGE_BUCKET = 1024

Callback = Callable[[int, np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What :func:`generate` returns (host NumPy arrays).

    Attributes:
      tokens: per row, the generated token ids, ending with the stop token if the row stopped.
      token_array: ``[B, max_new_tokens]`` int32, the same tokens, ``-1`` after a row's end.
      num_generated: ``[B]`` int32, tokens generated per row (``len(tokens[b])``).
      stopped: ``[B]`` bool, whether the row ended on a stop token.
      logprobs: per row, ``[num_generated[b]]`` float32 log-probabilities of the generated
        tokens under the model (before temperature and filtering); None unless asked for.
      prompt_lengths: ``[B]`` int32.
      prefill_seconds, decode_seconds: wall time of the two compiled programs (compilation
        included on a first call).
      cache_bytes: bytes of the decoding cache pytree (every layer's cache plus positions).
      full_attention_steps: under Recycled Attention, ``[L]`` int32, the full steps each
        full-attention layer took while decoding (in cache order: a scanned unit's layers
        grouped by unit position); None without a policy.
    """

    tokens: list[list[int]]
    token_array: np.ndarray
    num_generated: np.ndarray
    stopped: np.ndarray
    logprobs: list[np.ndarray] | None
    prompt_lengths: np.ndarray
    prefill_seconds: float
    decode_seconds: float
    cache_bytes: int
    full_attention_steps: np.ndarray | None = None

    @property
    def total_generated(self) -> int:
        """Tokens generated over all rows."""
        return int(self.num_generated.sum())


# ----------------------------------------------------------------------------------------------
# Compiled programs


@dataclasses.dataclass(frozen=True)
class _DecodeMode:
    """The static part of a decode loop (changing it recompiles)."""

    num_steps: int
    greedy: bool
    top_k: int
    use_top_p: bool
    with_callback: bool


_CALLBACKS: dict[int, Callback] = {}
_CALLBACK_IDS = itertools.count()
_CALLBACK_LOCK = threading.Lock()


def _dispatch_callback(callback_id: np.ndarray, step: np.ndarray, tokens: np.ndarray) -> None:
    _CALLBACKS[int(callback_id)](int(step), np.asarray(tokens))


class _Programs:
    """The jitted prefill and decode loop of one model (kept in :data:`_PROGRAMS`)."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.prefill = jax.jit(self._prefill, static_argnames=("max_len", "recycled_attention"))
        self.decode = jax.jit(self._decode, static_argnames=("mode",), donate_argnames=("cache",))
        self.forced_decode = jax.jit(self._forced_decode, donate_argnames=("cache",))

    def _prefill(
        self,
        params: Any,
        tokens: Array,
        lengths: Array,
        *,
        max_len: int,
        recycled_attention: RecycledAttentionPolicy | None = None,
    ) -> tuple[Array, ModelCache]:
        return self.model.apply(
            {"params": params},
            tokens,
            max_len,
            lengths,
            True,
            recycled_attention,
            method=LanguageModel.prefill,
        )

    def _decode(
        self,
        params: Any,
        cache: ModelCache,
        first_logits: Array,
        key: Array,
        temperature: Array,
        top_p: Array,
        stop_mask: Array,
        callback_id: Array,
        *,
        mode: _DecodeMode,
    ) -> tuple[Array, Array, Array, ModelCache]:
        model, config = self.model, self.model.config
        batch, padded_vocab = first_logits.shape
        real_vocab = jnp.arange(padded_vocab) < config.vocab_size
        top_k = min(mode.top_k, config.vocab_size)

        def choose(step: Array, logits: Array, done: Array) -> tuple[Array, Array, Array, Array]:
            logits = jnp.where(real_vocab, logits.astype(jnp.float32), -jnp.inf)
            token = sample(
                logits,
                jax.random.fold_in(key, step),
                temperature,
                top_p,
                greedy=mode.greedy,
                top_k=top_k,
                use_top_p=mode.use_top_p,
            )
            logprob = jnp.take_along_axis(
                jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1
            )[:, 0]
            recorded = jnp.where(done, -1, token)
            logprob = jnp.where(done, 0.0, logprob)
            if mode.with_callback:
                io_callback(_dispatch_callback, None, callback_id, step, recorded, ordered=True)
            return token, recorded, logprob, done | stop_mask[token]

        def write(buffer: Array, column: Array, step: Array) -> Array:
            return jax.lax.dynamic_update_slice(buffer, column[:, None], (0, step))

        step0 = jnp.zeros((), jnp.int32)
        token, recorded, logprob, done = choose(step0, first_logits, jnp.zeros((batch,), bool))
        tokens_out = write(jnp.full((batch, mode.num_steps), -1, jnp.int32), recorded, step0)
        logprobs_out = write(jnp.zeros((batch, mode.num_steps), jnp.float32), logprob, step0)

        def keep_going(carry: tuple) -> Array:
            step, done = carry[0], carry[-1]
            return (step < mode.num_steps) & ~jnp.all(done)

        def body(carry: tuple) -> tuple:
            step, previous, cache, tokens_out, logprobs_out, done = carry
            logits, cache = model.apply(
                {"params": params}, previous, cache, method=LanguageModel.decode_step
            )
            token, recorded, logprob, done = choose(step, logits, done)
            return (
                step + 1,
                token,
                cache,
                write(tokens_out, recorded, step),
                write(logprobs_out, logprob, step),
                done,
            )

        carry = (step0 + 1, token, cache, tokens_out, logprobs_out, done)
        _, _, cache, tokens_out, logprobs_out, done = jax.lax.while_loop(keep_going, body, carry)
        return tokens_out, logprobs_out, done, cache

    def _forced_decode(
        self, params: Any, cache: ModelCache, first_logits: Array, tokens: Array
    ) -> tuple[Array, ModelCache]:
        """Log-probabilities of ``tokens [B, N]`` fed one by one (teacher forcing): the first
        from ``first_logits``, token ``n`` from the step that consumed token ``n - 1``."""
        model, config = self.model, self.model.config
        real_vocab = jnp.arange(first_logits.shape[-1]) < config.vocab_size

        def logprob(logits: Array, token: Array) -> Array:
            logits = jnp.where(real_vocab, logits.astype(jnp.float32), -jnp.inf)
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            return jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]

        def body(cache: ModelCache, pair: tuple[Array, Array]) -> tuple[ModelCache, Array]:
            previous, token = pair
            logits, cache = model.apply(
                {"params": params}, previous, cache, method=LanguageModel.decode_step
            )
            return cache, logprob(logits, token)

        first = logprob(first_logits, tokens[:, 0])
        pairs = (jnp.swapaxes(tokens[:, :-1], 0, 1), jnp.swapaxes(tokens[:, 1:], 0, 1))
        cache, rest = jax.lax.scan(body, cache, pairs)
        return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1), cache


_PROGRAMS: dict[tuple[type, Any], _Programs] = {}


def _module_fields(model: LanguageModel) -> dict[str, Any]:
    """The fields that define ``model`` (``config``, and those a subclass adds, such as a
    quantized model's arithmetic), without Flax's ``parent`` and ``name``."""
    return {
        field.name: getattr(model, field.name)
        for field in dataclasses.fields(model)
        if field.init and field.name not in ("parent", "name")
    }


def _programs_for(model: LanguageModel) -> _Programs:
    fields = _module_fields(model)
    key = (type(model), tuple(fields.items()))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _Programs(type(model)(**fields))
    return _PROGRAMS[key]


# ----------------------------------------------------------------------------------------------
# Arguments


def bucket_length(length: int) -> int:
    """Padded prompt length: the next power of two in ``[16, 1024]``, then a multiple of 1024."""
    if length <= LARGE_BUCKET:
        return max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())
    return -(-length // LARGE_BUCKET) * LARGE_BUCKET


def _prepare_prompts(
    prompts: Sequence[Sequence[int]] | np.ndarray | Array, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``[B, bucket]`` int32 tokens and ``[B]`` int32 lengths."""
    if isinstance(prompts, np.ndarray | jax.Array):
        array = np.asarray(prompts)
        if array.ndim != 2:
            raise ValueError(
                f"a prompt array must be [batch, seq] token ids; got shape {array.shape} "
                "(wrap a single prompt in a list: [prompt])"
            )
        rows = list(array)
    elif isinstance(prompts, Sequence) and not isinstance(prompts, str | bytes):
        rows = [np.asarray(row) for row in prompts]
    else:
        raise ValueError(
            f"prompts must be a list of token-id lists or an int array; got {prompts!r}"
        )
    if not rows:
        raise ValueError("prompts is empty; give at least one prompt")
    for index, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(
                f"prompt {index} must be a flat list of token ids; got shape {row.shape}"
            )
        if row.size == 0:
            raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
        if row.dtype.kind not in "iu":
            raise ValueError(f"prompt {index} must hold integer token ids; got dtype {row.dtype}")
        low, high = int(row.min()), int(row.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"prompt {index} has token id {bad} outside the vocabulary [0, {vocab_size})"
            )
    lengths = np.array([row.size for row in rows], np.int32)
    tokens = np.zeros((len(rows), bucket_length(int(lengths.max()))), np.int32)
    for index, row in enumerate(rows):
        tokens[index, : row.size] = row
    return tokens, lengths


def _unbox_params(params: Any) -> Any:
    params = nn.meta.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return params


def _tree_bytes(tree: Any) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def recycled_attention_layers(config: ModelConfig) -> tuple[int, ...]:
    """The layers (0-based) that decode under a Recycled Attention policy: full attention."""
    return tuple(
        index
        for index, name in enumerate(config.layer_pattern)
        if accepts_recycled_attention(layer_mixer(config, name, index, parent=None))
    )


def check_recycled_attention(config: ModelConfig, policy: RecycledAttentionPolicy | None) -> None:
    """``ValueError`` unless ``policy`` is None or a policy and the model has full-attention
    layers to apply it to."""
    if policy is None:
        return
    if not isinstance(policy, RecycledAttentionPolicy):
        raise ValueError(f"recycled_attention={policy!r} must be a RecycledAttentionPolicy or None")
    if not recycled_attention_layers(config):
        raise ValueError(
            "recycled_attention needs full-attention layers ('attention' in the layer "
            f"pattern); this model has layer_pattern={tuple(config.layer_pattern)}"
        )


def full_attention_steps(cache: ModelCache) -> np.ndarray:
    """``[L]`` int32: the full steps each Recycled Attention layer of ``cache`` took."""
    counts = [
        np.ravel(np.asarray(layer.full_steps))
        for layer in cache.layers
        if isinstance(layer, RecycledKVCache)
    ]
    return np.concatenate(counts).astype(np.int32) if counts else np.zeros((0,), np.int32)


# ----------------------------------------------------------------------------------------------
# The entry point


def generate(
    model: LanguageModel,
    params: Any,
    prompts: Sequence[Sequence[int]] | Int[np.ndarray, "B T"] | Int[Array, "B T"],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    return_logprobs: bool = False,
    callback: Callback | None = None,
    recycled_attention: RecycledAttentionPolicy | None = None,
) -> GenerationResult:
    """Continue each prompt with up to ``max_new_tokens`` sampled tokens.

    Args:
      model: a :class:`~jaxbased.LanguageModel` (only its config is used).
      params: its parameters (the ``params`` collection, boxed or not, or ``{"params": ...}``).
      prompts: a list of token-id lists of any lengths (>= 1 each), or an int array ``[B, T]``.
      max_new_tokens: tokens to generate per row (>= 0); a row that emits a stop token ends
        early, and the loop ends when every row has.
      temperature: softmax temperature; 0 is greedy decoding.
      top_k: sample among the ``top_k`` most likely tokens (0: no limit).
      top_p: nucleus sampling, the smallest set of tokens with probability >= ``top_p``.
      seed: PRNG seed; the same seed, prompts and arguments give the same tokens.
      stop_tokens: token ids that end a row (the stop token is included in its output).
      return_logprobs: also return each generated token's log-probability.
      callback: ``callback(step, tokens)`` is called on the host after each step with that
        step's ``[B]`` int32 tokens (``-1`` for rows already stopped), in order.
      recycled_attention: decode the full-attention layers under this Recycled Attention
        policy (None: plain full attention); the model needs at least one such layer.

    Returns a :class:`GenerationResult`. Raises ``ValueError`` on invalid arguments.
    """
    config = model.config
    check_sampling_arguments(temperature, top_k, top_p)
    check_recycled_attention(config, recycled_attention)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    tokens, lengths = _prepare_prompts(prompts, config.vocab_size)
    stop_mask = np.zeros((config.padded_vocab_size,), bool)
    for stop in stop_tokens:
        if not 0 <= int(stop) < config.vocab_size:
            raise ValueError(
                f"stop token {stop} is outside the vocabulary [0, {config.vocab_size})"
            )
        stop_mask[int(stop)] = True
    batch = tokens.shape[0]
    if max_new_tokens == 0:
        return GenerationResult(
            tokens=[[] for _ in range(batch)],
            token_array=np.zeros((batch, 0), np.int32),
            num_generated=np.zeros((batch,), np.int32),
            stopped=np.zeros((batch,), bool),
            logprobs=[np.zeros((0,), np.float32) for _ in range(batch)]
            if return_logprobs
            else None,
            prompt_lengths=lengths,
            prefill_seconds=0.0,
            decode_seconds=0.0,
            cache_bytes=0,
        )

    programs = _programs_for(model)
    params = _unbox_params(params)
    mode = _DecodeMode(
        num_steps=int(max_new_tokens),
        greedy=temperature == 0,
        top_k=int(top_k),
        use_top_p=top_p < 1.0,
        with_callback=callback is not None,
    )
    callback_id = -1
    if callback is not None:
        with _CALLBACK_LOCK:
            callback_id = next(_CALLBACK_IDS)
            _CALLBACKS[callback_id] = callback
    try:
        start = time.perf_counter()
        first_logits, cache = programs.prefill(
            params,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            max_len=tokens.shape[1] + int(max_new_tokens),
            recycled_attention=recycled_attention,
        )
        jax.block_until_ready(first_logits)
        prefill_seconds = time.perf_counter() - start
        cache_bytes = _tree_bytes(cache)

        start = time.perf_counter()
        token_array, logprob_array, stopped, final_cache = programs.decode(
            params,
            cache,
            first_logits,
            jax.random.key(seed),
            jnp.asarray(temperature if temperature > 0 else 1.0, jnp.float32),
            jnp.asarray(top_p, jnp.float32),
            jnp.asarray(stop_mask),
            jnp.asarray(callback_id, jnp.int32),
            mode=mode,
        )
        token_array, logprob_array, stopped = jax.device_get((token_array, logprob_array, stopped))
        decode_seconds = time.perf_counter() - start
        full_steps = None if recycled_attention is None else full_attention_steps(final_cache)
    finally:
        if callback is not None:
            with _CALLBACK_LOCK:
                _CALLBACKS.pop(callback_id, None)

    num_generated = (token_array >= 0).sum(axis=1).astype(np.int32)
    return GenerationResult(
        tokens=[token_array[b, : num_generated[b]].tolist() for b in range(batch)],
        token_array=np.asarray(token_array, np.int32),
        num_generated=num_generated,
        stopped=np.asarray(stopped, bool),
        logprobs=(
            [np.asarray(logprob_array[b, : num_generated[b]]) for b in range(batch)]
            if return_logprobs
            else None
        ),
        prompt_lengths=lengths,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        cache_bytes=cache_bytes,
        full_attention_steps=full_steps,
    )


@dataclasses.dataclass(frozen=True)
class TeacherForcedResult:
    """What :func:`teacher_forced_logprobs` returns (host NumPy arrays).

    Attributes:
      logprobs: ``[B, N]`` float32, ``log p(tokens[b, P + n] | tokens[b, :P + n])`` through the
        decode path (prefill of the first ``P`` tokens, then one decode step per token).
      prefill_seconds, decode_seconds: wall time of the two compiled programs (compilation
        included on a first call).
      full_attention_steps: as in :class:`GenerationResult` (None without a policy).
    """

    logprobs: np.ndarray
    prefill_seconds: float
    decode_seconds: float
    full_attention_steps: np.ndarray | None

    @property
    def perplexity(self) -> float:
        """``exp(-mean(logprobs))`` over every row and position."""
        return float(np.exp(-np.mean(self.logprobs.astype(np.float64))))


def teacher_forced_logprobs(
    model: LanguageModel,
    params: Any,
    tokens: Int[np.ndarray, "B T"] | Int[Array, "B T"],
    prompt_length: int,
    *,
    recycled_attention: RecycledAttentionPolicy | None = None,
) -> TeacherForcedResult:
    """Score ``tokens[:, prompt_length:]`` given what precedes them, through the decode path.

    The first ``P = prompt_length`` tokens of each row are prefilled; then every later token is
    fed by one decode step (as :func:`generate` would, but with the given tokens instead of
    sampled ones), so a decode policy such as ``recycled_attention`` acts on every scored token
    but the first (which the prefill's logits score).

    Args:
      tokens: ``[B, T]`` int token ids in ``[0, vocab_size)``; ``1 <= P < T``.
      prompt_length: ``P``.
      recycled_attention: as in :func:`generate`.

    Returns a :class:`TeacherForcedResult` with ``[B, T - P]`` log-probabilities.
    """
    config = model.config
    check_recycled_attention(config, recycled_attention)
    array = np.asarray(tokens)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a [batch, seq] integer array; got {array.shape}")
    if isinstance(prompt_length, bool) or not 1 <= int(prompt_length) < array.shape[1]:
        raise ValueError(
            f"prompt_length={prompt_length!r} must be in [1, {array.shape[1] - 1}] for "
            f"{array.shape[1]} tokens"
        )
    if array.min() < 0 or array.max() >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size})")
    prompt_length = int(prompt_length)
    programs = _programs_for(model)
    params = _unbox_params(params)
    batch, seq = array.shape
    array = jnp.asarray(array, jnp.int32)
    start = time.perf_counter()
    first_logits, cache = programs.prefill(
        params,
        array[:, :prompt_length],
        jnp.full((batch,), prompt_length, jnp.int32),
        max_len=seq,
        recycled_attention=recycled_attention,
    )
    jax.block_until_ready(first_logits)
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    logprobs, cache = programs.forced_decode(params, cache, first_logits, array[:, prompt_length:])
    logprobs = np.asarray(jax.device_get(logprobs), np.float32)
    decode_seconds = time.perf_counter() - start
    return TeacherForcedResult(
        logprobs=logprobs,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        full_attention_steps=(None if recycled_attention is None else full_attention_steps(cache)),
    )


def decode_cache_bytes(model: LanguageModel, batch_size: int, max_len: int) -> int:
    """Bytes of the decoding cache for ``batch_size`` rows of up to ``max_len`` tokens.

    Computed from shapes only (nothing is allocated). BASED's layers keep fixed-size states, so
    this does not depend on ``max_len``; full attention's KV cache grows linearly with it.
    """
    shapes = jax.eval_shape(lambda: model.init_cache(batch_size, max_len))
    return _tree_bytes(shapes)


__all__ = [
    "GenerationResult",
    "RecycledAttentionPolicy",
    "TeacherForcedResult",
    "bucket_length",
    "check_recycled_attention",
    "decode_cache_bytes",
    "full_attention_steps",
    "generate",
    "recycled_attention_layers",
    "teacher_forced_logprobs",
]
