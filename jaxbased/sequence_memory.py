"""What the ``sequence`` mesh axis adds to a device's train-step memory, and what it sends.

With ``n`` devices on ``sequence`` every device holds ``L = T / n`` tokens of each of its rows,
so the planner sizes the step of a slice: the one-device step of ``L`` tokens (per-token work,
the time-split mixers' activations and the head all shrink by ``n``) plus, per layer, what the
sharded mixers hold beyond the unsharded ops (docs/sequence_parallelism.md):

- **boundary buffers**: the state a linear-attention layer receives from the earlier slices
  (``[H, D', Dv']`` float32 per row, kept for the backward of the scan that starts from it), the
  halo a window or convolution receives (``window - 1`` keys and values, ``kernel_size - 1``
  inputs);
- **the slice state's feature maps**: each shard first sums its slice's state from a zero start
  (``jaxbased.ops.sequence_parallel.slice_final_state``: a rematerialised chunk scan over
  ``phi(k)``) and then runs the unsharded op from the received state; on XLA:CPU, for BASED
  layers of ``D'`` = 273 and ``sequence`` 2 to 8, the sharded step held 0.5-0.9 ``[L, G, D']``
  float32 arrays per layer and row more than the one-device step of the slice (``G`` query
  groups: the heads, or Mamba-2's groups; the received state and its cotangent included),
  counted as
  :data:`SLICE_FEATURE_COPIES`. (Before the two passes, a correction ``phi(q_i) S_in``
  evaluated outside the scan held 3.5-3.9 of them.)

These are summed over the layers, except under remat across scanned layers (``remat`` other
than ``none`` with ``scan_layers`` and a repeating pattern): the backward then recomputes one
block at a time, and only the largest layer's share is held at once. (Measured for ``full``: a
12-layer scanned BASED mix came to 1.41x of the compiled step with the sum, 0.91x with the
slice's step alone; ``minimal`` is treated alike, not measured.)

It also counts the bytes each device sends per train step (forward and the mirrored backward):
``r(n)`` states per linear-attention, Mamba and SeqBoat layer (:func:`exclusive_prefix_rounds`;
SeqBoat's active counts go forward only, integers have no cotangent), one halo per window,
convolution, CCA or SeqBoat layer, and for full attention and CCA the all-gathered keys and
values (CCA: its pooled core tokens). A gather is counted as a ring sends it: ``n - 1`` slices
per device, for the forward all-gather, its rematerialised copy in the backward (full attention
runs its shard under ``jax.checkpoint``) and the reduce-scatter of the cotangents. Full
attention also holds the gathered ``[T, H, D + Dv]`` keys and values of one layer at a time, and
their cotangent, beyond the slice's step. Layer sizes come from the model's decoding cache
(``init_cache``): its states have exactly the shapes that cross a slice boundary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jaxbased.ops.sequence_parallel import exclusive_prefix_rounds
from jaxbased.ops.sequence_parallel_attention import cca_halo_tokens

#: ``[L, G, D']`` float32 arrays per row that a time-split linear-attention layer holds beyond
#: the unsharded op of its slice (measured on XLA:CPU: 0.5-0.9, module docstring).
SLICE_FEATURE_COPIES = 1
#: Mixers whose slices exchange a state by the exclusive scan's ``r(n)`` rounds.
STATE_MIXERS = ("based", "decay_attention", "transnormer", "mamba2", "mamba", "seqboat")
#: Gather-type collectives per train step of the mixers that all-gather over ``sequence``: the
#: forward all-gather, its recomputation under ``jax.checkpoint`` (full attention only) and
#: the backward's reduce-scatter.
GATHERS_PER_STEP = {"attention": 3, "cca_attention": 2}
#: Copies of one layer's gathered ``[T, H, D + Dv]`` keys and values that full attention holds
#: beyond the slice's step (the gathered pair and its cotangent).
GATHERED_COPIES = 2
FLOAT32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class LayerBoundary:
    """What one layer passes across a slice boundary, per row of the batch, on one device.

    Attributes:
      mixer: the layer's mixer name.
      state_bytes: the float32 state (and ``[H]`` log decays) sent per ``ppermute`` round.
      halo_bytes: the halo (window keys and values, convolution inputs) sent once.
      rounds: ``ppermute`` rounds of the state scan (0 without a state).
      feature_floats_per_token: ``G * D'``, the query features of one token (0 without a state).
      forward_only_bytes: sent per round in the forward only (SeqBoat's int32 active count).
      gathered_bytes_per_token: bytes of one token's share of an all-gather (full attention:
        its key and value, ``H (D + Dv)``; CCA: ``1 / g`` of its pooled cores), 0 without one.
      gathers: gather-type collectives per train step (:data:`GATHERS_PER_STEP`).
    """

    mixer: str
    state_bytes: int
    halo_bytes: int
    rounds: int
    feature_floats_per_token: int
    forward_only_bytes: int = 0
    gathered_bytes_per_token: float = 0
    gathers: int = 0

    def sent_bytes(self, shards: int, slice_tokens: int) -> int:
        """Bytes one device sends per row and train step, forward and backward: the states
        and halo both ways, the forward-only counts, and ``gathers`` ring gathers of
        ``shards - 1`` slices each."""
        both_ways = 2 * (self.rounds * self.state_bytes + self.halo_bytes)
        gathered = self.gathers * (shards - 1) * round(slice_tokens * self.gathered_bytes_per_token)
        return both_ways + self.rounds * self.forward_only_bytes + gathered


@dataclasses.dataclass(frozen=True)
class SequenceBytes:
    """The ``sequence`` axis's additions for one device, per row (sequence) of its batch."""

    shards: int
    slice_tokens: int
    layers: tuple[LayerBoundary, ...]
    #: The backward recomputes one scanned block at a time (module docstring).
    remat_across_layers: bool = False

    def layer_memory(self, layer: LayerBoundary) -> int:
        """One layer's boundary buffers plus its slice state's feature maps, bytes per row."""
        features = (
            SLICE_FEATURE_COPIES
            * self.slice_tokens
            * layer.feature_floats_per_token
            * FLOAT32_BYTES
        )
        return layer.state_bytes + layer.halo_bytes + features

    def gathered_memory(self, layer: LayerBoundary) -> int:
        """Full attention's gathered keys and values over the whole row and their cotangent,
        bytes per row (0 for the other mixers: CCA's gathered cores are ``1 / g`` of that)."""
        if layer.mixer != "attention":
            return 0
        tokens = self.shards * self.slice_tokens
        return round(GATHERED_COPIES * tokens * layer.gathered_bytes_per_token)

    @property
    def memory_per_row(self) -> int:
        """What the time-split layers hold beyond the slice's one-device step, bytes per row:
        the sum over layers, or the largest layer's under remat across scanned layers, plus
        the largest gathered keys and values (one checkpointed layer holds them at a time)."""
        if self.shards == 1 or not self.layers:
            return 0
        per_layer = [self.layer_memory(layer) for layer in self.layers]
        boundaries = max(per_layer) if self.remat_across_layers else sum(per_layer)
        return boundaries + max(self.gathered_memory(layer) for layer in self.layers)

    @property
    def sent_per_row(self) -> int:
        """Bytes one device sends per row and train step, forward and backward."""
        if self.shards == 1:
            return 0
        return sum(layer.sent_bytes(self.shards, self.slice_tokens) for layer in self.layers)


def _split(value: int, parts: int) -> int:
    """``value / parts`` when it divides (heads or channels split over ``tensor``), else whole."""
    return value // parts if value % parts == 0 else value


def _nbytes(leaf: Any, tensor: int = 1, axis: int | None = None) -> int:
    shape = list(leaf.shape)
    if axis is not None:
        shape[axis] = _split(shape[axis], tensor)
    return math.prod(shape) * np.dtype(leaf.dtype).itemsize


def _pair_bytes(keys: Any, values: Any, tensor: int) -> int:
    """Bytes of one token's key and value over the heads of ``[1, H, S, D]`` caches (the
    heads split over ``tensor``)."""
    heads = _split(int(keys.shape[1]), tensor)
    return heads * sum(int(x.shape[3]) * np.dtype(x.dtype).itemsize for x in (keys, values))


def layer_boundaries(config: Any, *, shards: int, tensor: int = 1) -> tuple[LayerBoundary, ...]:
    """Per layer of ``config`` (a ``ModelConfig``), what crosses a slice boundary for one row on
    a mesh with ``shards`` devices on ``sequence`` and ``tensor`` on heads and channels."""
    from jaxbased.model import LanguageModel

    model = LanguageModel(config.replace(scan_layers=False))  # one cache entry per layer
    cache = jax.eval_shape(lambda: model.init_cache(1, 1))
    rounds = exclusive_prefix_rounds(shards)
    boundaries = []
    for mixer, layer_cache in zip(config.layer_pattern, cache.layers, strict=True):
        state = halo = features = forward_only = 0
        gathered: float = 0
        if mixer in ("based", "decay_attention", "transnormer"):
            kv = layer_cache.kv_state  # [1, H, D', Dv]
            heads, feature_dim, value_dim = (int(size) for size in kv.shape[1:])
            heads = _split(heads, tensor)
            value_columns = value_dim + 1 if mixer == "based" else value_dim  # the normalizer
            state = heads * feature_dim * value_columns * FLOAT32_BYTES
            state += 0 if mixer == "based" else heads * FLOAT32_BYTES  # the total log decay
            features = heads * feature_dim
        elif mixer == "mamba2":
            ssm = layer_cache.ssm_state  # [1, H, P, N]
            heads = _split(int(ssm.shape[1]), tensor)
            state = heads * int(ssm.shape[2]) * int(ssm.shape[3]) * FLOAT32_BYTES
            state += heads * FLOAT32_BYTES
            halo = _nbytes(layer_cache.conv_state, tensor, axis=2)
            features = config.mamba2.groups * config.mamba2.state_dim
        elif mixer == "sliding_window":
            keys, values = layer_cache.keys, layer_cache.values  # [1, H, S, D]
            history = config.sliding_window.window - 1
            per_key = _split(int(keys.shape[1]), tensor) * (
                int(keys.shape[3]) * np.dtype(keys.dtype).itemsize
                + int(values.shape[3]) * np.dtype(values.dtype).itemsize
            )
            halo = history * per_key
        elif mixer == "base_conv":
            halo = _nbytes(layer_cache.inputs, tensor, axis=2)  # [1, K - 1, C]
        elif mixer == "mamba":
            ssm = layer_cache.ssm_state  # [1, inner, N]: the state, then the summed steps
            channels = _split(int(ssm.shape[1]), tensor)
            state = channels * (int(ssm.shape[2]) + 1) * FLOAT32_BYTES
            halo = _nbytes(layer_cache.conv_state, tensor, axis=2)  # [1, K - 1, inner]
        elif mixer == "seqboat":
            history = config.seqboat.window - 1  # the last packed keys and values
            state = _nbytes(layer_cache.ema_state)  # [1, d, N]
            keys, values = layer_cache.keys, layer_cache.values  # [1, W, z], [1, W, h]
            state += history * sum(
                int(x.shape[2]) * np.dtype(x.dtype).itemsize for x in (keys, values)
            )
            forward_only = _nbytes(layer_cache.active_count)
        elif mixer == "attention":
            gathered = _pair_bytes(layer_cache.keys, layer_cache.values, tensor)
        elif mixer == "cca_attention":
            cca = config.cca_attention
            per_token = _pair_bytes(layer_cache.core_keys, layer_cache.core_values, tensor)
            gathered = per_token / cca.group_size
            halo = round(cca_halo_tokens(cca.group_size, cca.local_window) * per_token)
        boundaries.append(
            LayerBoundary(
                mixer=mixer,
                state_bytes=state,
                halo_bytes=halo,
                rounds=rounds if mixer in STATE_MIXERS else 0,
                feature_floats_per_token=features,
                forward_only_bytes=forward_only,
                gathered_bytes_per_token=gathered,
                gathers=GATHERS_PER_STEP.get(mixer, 0),
            )
        )
    return tuple(boundaries)


def sequence_bytes(config: Any, *, shards: int, seq_len: int, tensor: int = 1) -> SequenceBytes:
    """The :class:`SequenceBytes` of ``config`` training on ``seq_len`` tokens split over
    ``shards`` devices (``seq_len`` must divide: :func:`check_sequence_sharding` checks it)."""
    if shards < 1 or seq_len % shards:
        raise ValueError(
            f"sequence={shards} must be >= 1 and divide seq_len={seq_len} into whole slices"
        )
    from jaxbased.layer_layout import find_repeating_unit

    scanned = config.scan_layers and find_repeating_unit(config.layer_pattern) is not None
    return SequenceBytes(
        shards=shards,
        slice_tokens=seq_len // shards,
        layers=layer_boundaries(config, shards=shards, tensor=tensor),
        remat_across_layers=scanned and config.remat != "none",
    )
