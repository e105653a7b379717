"""Which models and sequence lengths a mesh's ``sequence`` axis can split, checked before any
compile (docs/sequence_parallelism.md).

:func:`check_sequence_sharding` raises one ``ValueError`` naming the sizes and what would work
when a training or evaluation run cannot split its sequences ``sequence`` ways:

- the length ``T`` must divide into ``sequence`` whole slices of ``L = T / sequence`` tokens;
- every mixer of the pattern must have a sequence-parallel form
  (:data:`SEQUENCE_SHARDED_MIXERS`); with ``implementation="pallas"`` every one must also run
  its kernels per shard (:data:`SEQUENCE_KERNEL_MIXERS`);
- a slice must hold what its first token needs from the previous one: ``window - 1`` keys for
  ``sliding_window``, ``kernel_size - 1`` inputs for ``base_conv``, ``local_window +
  group_size - 2`` raw keys for ``cca_attention``;
- ``cca_attention`` slices must be whole groups (``L % group_size == 0``): each pools its own;
- EchoAtt (``attention_sharing``) is refused: a sharing layer reuses its anchor's whole
  ``[B, H, T, T]`` probabilities. (Recycled Attention is a decode policy; training and
  evaluation never reach it.)
- SeqBoat runs its packed algorithm (``masked`` is a full-length reference).

Slices need not be whole chunks of the chunked linear attention: each shard pads its own last
chunk, as the unsharded op pads the sequence's tail (logged, since that padding is work).
"""

from __future__ import annotations

from typing import Any

from absl import logging

from jaxbased.ops.dispatch import IMPLEMENTATIONS
from jaxbased.ops.sequence_parallel_attention import cca_halo_tokens

#: Mixers whose forward and backward split the time axis, each passing only what crosses a
#: slice boundary (``mlp`` acts on each token alone): the linear-attention family through the
#: (decayed) state prefix, the windows and short convs through a halo, full attention through
#: all-gathered keys and values, CCA-Attention through all-gathered core tokens and a halo
#: (:mod:`jaxbased.ops.sequence_parallel_attention`).
SEQUENCE_SHARDED_MIXERS: tuple[str, ...] = (
    "based",
    "sliding_window",
    "base_conv",
    "mlp",
    "decay_attention",
    "transnormer",
    "mamba2",
    "attention",
    "cca_attention",
    "mamba",
    "seqboat",
)

#: The sharded mixers whose shards run their Pallas kernels under ``implementation="pallas"``
#: (linear attention, decayed linear attention and SSD, the window; the convs and the MLP have
#: no kernel and run XLA under every implementation).
SEQUENCE_KERNEL_MIXERS: tuple[str, ...] = (
    "based",
    "sliding_window",
    "base_conv",
    "mlp",
    "decay_attention",
    "transnormer",
    "mamba2",
    "seqboat",
)


def _divisors(number: int) -> list[int]:
    return [size for size in range(1, number + 1) if number % size == 0]


def halo_tokens(config: Any) -> dict[str, int]:
    """``{mixer: tokens a slice needs from the previous slice}`` for the used mixers that reach
    back a fixed number of tokens (``sliding_window``: ``window - 1``; ``base_conv``:
    ``kernel_size - 1``; ``mamba2``, ``mamba``: the short conv's ``conv_kernel_size - 1``;
    ``cca_attention``: ``local_window + group_size - 2`` raw keys)."""
    halos = {}
    if "sliding_window" in config.layer_pattern:
        halos["sliding_window"] = config.sliding_window.window - 1
    if "base_conv" in config.layer_pattern:
        halos["base_conv"] = config.base_conv.kernel_size - 1
    if "mamba2" in config.layer_pattern:
        halos["mamba2"] = config.mamba2.conv_kernel_size - 1
    if "mamba" in config.layer_pattern:
        halos["mamba"] = config.mamba.conv_kernel_size - 1
    if "cca_attention" in config.layer_pattern:
        cca = config.cca_attention
        halos["cca_attention"] = cca_halo_tokens(cca.group_size, cca.local_window)
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
    if config.implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={config.implementation!r} is not known; allowed: {IMPLEMENTATIONS}"
        )
    without_kernels = sorted(set(config.layer_pattern) - set(SEQUENCE_KERNEL_MIXERS))
    if config.implementation == "pallas" and without_kernels:
        raise ValueError(
            f"mesh.sequence={sequence}: implementation='pallas' cannot split the sequence of "
            f"mixers {without_kernels} yet (their shards run XLA only); use implementation "
            f"'auto' or 'xla', or mesh.sequence=1; mixers whose shards run their kernels: "
            f"{SEQUENCE_KERNEL_MIXERS}"
        )
    if config.attention_sharing:
        raise ValueError(
            f"mesh.sequence={sequence}: attention_sharing={config.attention_sharing} (EchoAtt) "
            "reuses an anchor's [B, H, T, T] probabilities, which a time-split mesh does not "
            "form; use attention_sharing=() or mesh.sequence=1"
        )
    if "seqboat" in config.layer_pattern and config.seqboat.algorithm != "packed":
        raise ValueError(
            f"mesh.sequence={sequence}: seqboat.algorithm={config.seqboat.algorithm!r} (the "
            "full-length reference) cannot split the sequence; use seqboat.algorithm='packed'"
        )
    length = seq_len // sequence
    if "cca_attention" in config.layer_pattern and length % config.cca_attention.group_size:
        group_size = config.cca_attention.group_size
        working = [size for size in _divisors(seq_len) if (seq_len // size) % group_size == 0]
        raise ValueError(
            f"mesh.sequence={sequence} splits data.seq_len={seq_len} into slices of {length} "
            f"tokens, not whole groups of cca_attention.group_size={group_size} (each slice "
            f"pools its own groups); sequence sizes that work: {working}, or a seq_len "
            f"divisible by sequence x group_size = {sequence * group_size}"
        )
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
