"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (docs/mqar.md).

An example of length ``T`` with ``P`` key-value pairs::

    position:  0   1   2   3  ...  2P-2 2P-1 | 2P ...                              T-1
    input:     k0  v0  k1  v1 ...  kP-1 vP-1 | filler, with each key k_j once as a query
    target:    -   -   -   -  ...  -    -    | v_j at the query of k_j, IGNORE_INDEX elsewhere

- keys are ``P`` distinct tokens from ``[1, V/2)``, values ``P`` distinct tokens from
  ``[V/2, V)``, both uniformly random and independent (so each key gets a random value);
- the query of key ``j`` sits at position ``2P + 2 g_j``: the gaps ``g_j`` are ``P`` distinct
  slots out of ``(T - 2P) // 2``, drawn one after the other without replacement with
  probabilities proportional to ``power_a * (g + 1) ** (power_a - 1)`` (a power law: a key is
  most often queried soon after the context; ``power_a = 1`` is uniform). Key ``j`` takes the
  ``j``-th gap drawn, so the first pairs tend to be queried first, as in Zoology;
- every other input position after the context (``random_non_queries``) holds a uniformly
  random token from ``[0, V)``, else ``0``;
- the target at a query position is the value paired with the queried key (the model reads the
  key and must say its value next); every other target is ``IGNORE_INDEX``.

This is Zoology's ``multiquery_ar`` (HazyResearch/zoology, one pass over the pairs), vectorised:
keys and values by Floyd's sampling plus a shuffle (uniform over ordered distinct draws), gaps by
the Gumbel-top-k trick (the distribution of drawing one after the other without replacement).
100k examples of length 64 take well under a second. Batches are returned as NumPy ``int32``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from jaxtyping import Int

#: Target of every position that is not an answer (PyTorch's ``ignore_index``, as in Zoology).
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class MQARSegment:
    """Examples of one (sequence length, number of pairs) setting.

    Attributes:
      inputs: ``[N, T]`` int32 tokens.
      targets: ``[N, T]`` int32, the value at each query position, ``IGNORE_INDEX`` elsewhere.
      answer_positions: ``[N, P]`` int32, the query positions in pair order (key ``j`` is
        queried at ``answer_positions[:, j]``); sorted they are where ``targets`` is set.
      answers: ``[N, P]`` int32, the values to predict there (``targets`` at those positions).
      seq_len, num_pairs, vocab_size: the setting.
    """

    inputs: Int[np.ndarray, "N T"]
    targets: Int[np.ndarray, "N T"]
    answer_positions: Int[np.ndarray, "N P"]
    answers: Int[np.ndarray, "N P"]
    seq_len: int
    num_pairs: int
    vocab_size: int

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def name(self) -> str:
        """``"T{seq_len}_P{num_pairs}"``, the key of this segment in result files."""
        return f"T{self.seq_len}_P{self.num_pairs}"

    def take(self, indices: np.ndarray | slice) -> MQARSegment:
        """The examples at ``indices`` (a slice or an integer index array)."""
        return dataclasses.replace(
            self,
            inputs=self.inputs[indices],
            targets=self.targets[indices],
            answer_positions=self.answer_positions[indices],
            answers=self.answers[indices],
        )


def check_setting(*, seq_len: int, num_pairs: int, vocab_size: int) -> None:
    """Raise ``ValueError`` if ``(seq_len, num_pairs, vocab_size)`` cannot make an MQAR example.

    Needs an even ``seq_len`` (queries sit on even offsets after the context), room for the
    pairs and one query slot per key (``4 * num_pairs <= seq_len``) and enough distinct keys
    and values (``num_pairs <= vocab_size // 2 - 1``).
    """
    for name, value in (("seq_len", seq_len), ("num_pairs", num_pairs), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if seq_len % 2:
        raise ValueError(f"seq_len={seq_len} must be even (queries sit on even offsets)")
    if 4 * num_pairs > seq_len:
        raise ValueError(
            f"num_pairs={num_pairs} does not fit seq_len={seq_len}: the pairs take 2 * num_pairs "
            f"positions and the queries need num_pairs slots of 2 after them, so num_pairs must "
            f"be <= seq_len / 4 = {seq_len // 4}"
        )
    keys_available = vocab_size // 2 - 1
    if num_pairs > keys_available:
        raise ValueError(
            f"num_pairs={num_pairs} needs that many distinct keys, but vocab_size={vocab_size} "
            f"has only {keys_available} (keys come from [1, vocab_size // 2))"
        )


def _distinct_draws(
    rng: np.random.Generator, num_rows: int, population: int, count: int
) -> np.ndarray:
    """``[num_rows, count]`` distinct integers from ``[0, population)`` per row, each ordered
    sequence equally likely (Floyd's subset sampling, then a random order)."""
    chosen = np.empty((num_rows, count), np.int64)
    for index, upper in enumerate(range(population - count, population)):
        candidate = rng.integers(0, upper + 1, size=num_rows)
        taken = (chosen[:, :index] == candidate[:, None]).any(axis=1)
        chosen[:, index] = np.where(taken, upper, candidate)
    order = np.argsort(rng.random((num_rows, count)), axis=1)
    return np.take_along_axis(chosen, order, axis=1)


def _power_law_gaps(
    rng: np.random.Generator, num_rows: int, num_slots: int, count: int, power_a: float
) -> np.ndarray:
    """``[num_rows, count]`` distinct slots of ``[0, num_slots)``, drawn one after the other
    without replacement with weights ``(slot + 1) ** (power_a - 1)`` (Gumbel-top-k)."""
    log_weights = (power_a - 1.0) * np.log(np.arange(1, num_slots + 1, dtype=np.float64))
    scores = log_weights + rng.gumbel(size=(num_rows, num_slots))
    top = np.argpartition(-scores, count - 1, axis=1)[:, :count]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def multiquery_ar(
    *,
    num_examples: int,
    seq_len: int,
    num_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int | np.random.Generator = 0,
) -> MQARSegment:
    """``num_examples`` MQAR examples (see the module docstring for the layout).

    Args:
      num_examples: examples ``N``.
      seq_len: tokens per example ``T`` (even, ``>= 4 * num_pairs``).
      num_pairs: key-value pairs ``P`` per example, each queried once.
      vocab_size: ``V``; keys from ``[1, V/2)``, values from ``[V/2, V)``.
      power_a: exponent of the query gap power law, in ``(0, 1]``.
      random_non_queries: fill non-query positions after the context with random tokens.
      seed: an integer seed or a ``np.random.Generator``; equal seeds give equal data.

    Returns:
      An :class:`MQARSegment` of int32 arrays.
    """
    check_setting(seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab_size)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples={num_examples!r} must be an integer >= 1")
    if not (isinstance(power_a, int | float) and 0.0 < power_a <= 1.0):
        raise ValueError(f"power_a={power_a!r} must be in (0, 1]")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    half = vocab_size // 2
    keys = 1 + _distinct_draws(rng, num_examples, half - 1, num_pairs)
    values = half + _distinct_draws(rng, num_examples, vocab_size - half, num_pairs)
    context = 2 * num_pairs
    gaps = _power_law_gaps(rng, num_examples, (seq_len - context) // 2, num_pairs, power_a)
    query_positions = context + 2 * gaps

    if random_non_queries:
        inputs = rng.integers(0, vocab_size, size=(num_examples, seq_len))
    else:
        inputs = np.zeros((num_examples, seq_len), np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    targets = np.full((num_examples, seq_len), IGNORE_INDEX, np.int64)
    np.put_along_axis(targets, query_positions, values, axis=1)
    return MQARSegment(
        inputs=inputs.astype(np.int32),
        targets=targets.astype(np.int32),
        answer_positions=query_positions.astype(np.int32),
        answers=values.astype(np.int32),
        seq_len=seq_len,
        num_pairs=num_pairs,
        vocab_size=vocab_size,
    )


@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """One setting of a train or test mix: ``num_examples`` of ``(seq_len, num_pairs)``."""

    seq_len: int
    num_pairs: int
    num_examples: int


def make_segments(
    specs: Iterable[SegmentSpec],
    *,
    vocab_size: int,
    seed: int | Sequence[int],
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> list[MQARSegment]:
    """One segment per spec; segment ``i`` is drawn from ``seed`` (an integer or a sequence of
    integers, e.g. ``(sweep_seed, 0)`` for training and ``(sweep_seed, 1)`` for testing) and
    ``i`` alone, so mixes built from different seeds never share a random stream."""
    specs = list(specs)
    if not specs:
        raise ValueError("specs is empty; give at least one (seq_len, num_pairs, num_examples)")
    streams = np.random.SeedSequence(seed).spawn(len(specs))
    return [
        multiquery_ar(
            num_examples=spec.num_examples,
            seq_len=spec.seq_len,
            num_pairs=spec.num_pairs,
            vocab_size=vocab_size,
            power_a=power_a,
            random_non_queries=random_non_queries,
            seed=np.random.default_rng(stream),
        )
        for spec, stream in zip(specs, streams, strict=True)
    ]


def iterate_batches(
    segments: list[MQARSegment],
    batch_size: int,
    *,
    seed: int | None = None,
    interleave: bool = False,
    drop_remainder: bool = True,
) -> Iterator[MQARSegment]:
    """One epoch of batches, each from a single segment (shapes differ between segments).

    The segments come one after the other, in the order given, as in Zoology (a curriculum
    within each epoch when the mix goes from short to long). With ``seed``, examples are
    shuffled within each segment, and with ``interleave`` too the batches of all segments are
    visited in one random order. Without ``seed`` everything stays in order.
    ``drop_remainder`` drops each segment's last partial batch (so every shape compiles once).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    rng = None if seed is None else np.random.default_rng(seed)
    plan: list[tuple[int, np.ndarray | slice]] = []
    for index, segment in enumerate(segments):
        size = len(segment)
        stop = size - size % batch_size if drop_remainder else size
        order = np.arange(size) if rng is None else rng.permutation(size)
        for start in range(0, stop, batch_size):
            chunk = order[start : min(start + batch_size, stop)]
            plan.append((index, chunk if rng is not None else slice(chunk[0], chunk[-1] + 1)))
    if rng is not None and interleave:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    for index, chunk in plan:
        yield segments[index].take(chunk)


def batches_per_epoch(segments: list[MQARSegment], batch_size: int) -> int:
    """Full batches in one epoch of :func:`iterate_batches` (remainders dropped)."""
    return sum(len(segment) // batch_size for segment in segments)


def power_law_probabilities(num_slots: int, power_a: float) -> np.ndarray:
    """The normalised gap probabilities of the first query, ``p_g ∝ (g + 1) ** (power_a - 1)``."""
    weights = np.arange(1, num_slots + 1, dtype=np.float64) ** (power_a - 1.0)
    return weights / math.fsum(weights)
