"""Which models and sequence lengths a mesh's ``sequence`` axis can split, checked before any
compile (docs/sequence_parallelism.md).

:func:`check_sequence_sharding` raises one ``ValueError`` naming the sizes and what would work
when a training or evaluation run cannot split its sequences ``sequence`` ways:

- the length ``T`` must divide into ``sequence`` whole slices of ``L = T / sequence`` tokens;
- every mixer of the pattern must have a sequence-parallel form
  (:data:`SEQUENCE_SHARDED_MIXERS`), computed by the XLA algorithms
  (``implementation`` ``auto`` or ``xla``);
- a slice must hold what its first token needs from the previous one: ``window - 1`` keys for
  ``sliding_window``, ``kernel_size - 1`` inputs for ``base_conv``;
- SeqBoat runs its packed algorithm (``masked`` is a full-length reference).

Slices need not be whole chunks of the chunked linear attention: each shard pads its own last
chunk, as the unsharded op pads the sequence's tail (logged, since that padding is work).
"""

from __future__ import annotations

from typing import Any

from absl import logging

from jaxbased.ops.sequence_parallel import SEQUENCE_IMPLEMENTATIONS

#: Mixers whose forward and backward split the time axis, each passing only what crosses a
#: slice boundary (``mlp`` acts on each token alone): the linear-attention family through the
#: (decayed) state prefix, the windows and short convs through a halo.
SEQUENCE_SHARDED_MIXERS: tuple[str, ...] = (
    "based",
    "sliding_window",
    "base_conv",
    "mlp",
    "decay_attention",
    "transnormer",
    "mamba2",
    "mamba",
    "seqboat",
)


def _divisors(number: int) -> list[int]:
    return [size for size in range(1, number + 1) if number % size == 0]


def halo_tokens(config: Any) -> dict[str, int]:
    """``{mixer: tokens a slice needs from the previous slice}`` for the used mixers that reach
    back a fixed number of tokens (``sliding_window``: ``window - 1``; ``base_conv``:
    ``kernel_size - 1``; ``mamba2``, ``mamba``: the short conv's ``conv_kernel_size - 1``)."""
    halos = {}
    if "sliding_window" in config.layer_pattern:
        halos["sliding_window"] = config.sliding_window.window - 1
    if "base_conv" in config.layer_pattern:
        halos["base_conv"] = config.base_conv.kernel_size - 1
    if "mamba2" in config.layer_pattern:
        halos["mamba2"] = config.mamba2.conv_kernel_size - 1
    if "mamba" in config.layer_pattern:
        halos["mamba"] = config.mamba.conv_kernel_size - 1
    return halos


def check_sequence_sharding(config: Any, sequence: int, seq_len: int) -> None:
    """Raise ``ValueError`` unless ``config`` (a ``ModelConfig``) can train on sequences of
    ``seq_len`` tokens split over ``sequence`` devices; nothing to check for ``sequence = 1``."""
    if sequence == 1:
        return
    if seq_len % sequence:
        working = [size for size in _divisors(seq_len) if size > 1] or ["none above 1"]
        multiple = -(-seq_len // sequence) * sequence
        raise ValueError(
            f"mesh.sequence={sequence} does not split data.seq_len={seq_len} into whole slices; "
            f"use a seq_len divisible by {sequence} (e.g. {multiple}) or a sequence size "
            f"dividing {seq_len}: {working}"
        )
    unsharded = sorted(set(config.layer_pattern) - set(SEQUENCE_SHARDED_MIXERS))
    if unsharded:
        raise ValueError(
            f"mesh.sequence={sequence}: layer_pattern has mixers {unsharded} that cannot split "
            f"the sequence yet; those that can: {SEQUENCE_SHARDED_MIXERS}; or use mesh.sequence=1"
        )
    if config.implementation not in SEQUENCE_IMPLEMENTATIONS:
        raise ValueError(
            f"mesh.sequence={sequence}: implementation={config.implementation!r} cannot split "
            f"the sequence yet; allowed with sequence > 1: {SEQUENCE_IMPLEMENTATIONS}"
        )
    if "seqboat" in config.layer_pattern and config.seqboat.algorithm != "packed":
        raise ValueError(
            f"mesh.sequence={sequence}: seqboat.algorithm={config.seqboat.algorithm!r} (the "
            "full-length reference) cannot split the sequence; use seqboat.algorithm='packed'"
        )
    length = seq_len // sequence
    for mixer, halo in halo_tokens(config).items():
        if length < halo:
            working = [size for size in _divisors(seq_len) if seq_len // size >= halo]
            raise ValueError(
                f"mesh.sequence={sequence} splits data.seq_len={seq_len} into slices of {length} "
                f"tokens, but {mixer} needs the {halo} tokens before each slice from one "
                f"neighbour; sequence sizes that work: {working}, or seq_len >= "
                f"{halo * sequence}"
            )
    if "based" in config.layer_pattern and length % config.based.chunk_size:
        logging.info(
            "sequence slices of %d tokens are not whole chunks of based.chunk_size=%d: each "
            "shard pads its last chunk",
            length,
            config.based.chunk_size,
        )
