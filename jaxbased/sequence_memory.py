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
``r(n)`` states per linear-attention layer (:func:`exclusive_prefix_rounds`), one halo per window
or convolution. Layer sizes come from the model's decoding cache (``init_cache``): its states
have exactly the shapes that cross a slice boundary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from jaxbased.ops.sequence_parallel import exclusive_prefix_rounds

#: ``[L, G, D']`` float32 arrays per row that a time-split linear-attention layer holds beyond
#: the unsharded op of its slice (measured on XLA:CPU: 0.5-0.9, module docstring).
SLICE_FEATURE_COPIES = 1
#: Mixers whose slices exchange a (decayed) linear-attention state.
STATE_MIXERS = ("based", "decay_attention", "transnormer", "mamba2")
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
    """

    mixer: str
    state_bytes: int
    halo_bytes: int
    rounds: int
    feature_floats_per_token: int

    @property
    def sent_bytes(self) -> int:
        """Bytes one device sends per row in the forward (``r(n)`` states and one halo)."""
        return self.rounds * self.state_bytes + self.halo_bytes


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

    @property
    def memory_per_row(self) -> int:
        """What the time-split layers hold beyond the slice's one-device step, bytes per row:
        the sum over layers, or the largest layer's under remat across scanned layers."""
        if self.shards == 1 or not self.layers:
            return 0
        per_layer = [self.layer_memory(layer) for layer in self.layers]
        return max(per_layer) if self.remat_across_layers else sum(per_layer)

    @property
    def sent_per_row(self) -> int:
        """Bytes one device sends per row and train step, forward and backward."""
        return 0 if self.shards == 1 else 2 * sum(layer.sent_bytes for layer in self.layers)


def _split(value: int, parts: int) -> int:
    """``value / parts`` when it divides (heads or channels split over ``tensor``), else whole."""
    return value // parts if value % parts == 0 else value


def _nbytes(leaf: Any, tensor: int = 1, axis: int | None = None) -> int:
    shape = list(leaf.shape)
    if axis is not None:
        shape[axis] = _split(shape[axis], tensor)
    return math.prod(shape) * np.dtype(leaf.dtype).itemsize


def layer_boundaries(config: Any, *, shards: int, tensor: int = 1) -> tuple[LayerBoundary, ...]:
    """Per layer of ``config`` (a ``ModelConfig``), what crosses a slice boundary for one row on
    a mesh with ``shards`` devices on ``sequence`` and ``tensor`` on heads and channels."""
    from jaxbased.model import LanguageModel

    model = LanguageModel(config.replace(scan_layers=False))  # one cache entry per layer
    cache = jax.eval_shape(lambda: model.init_cache(1, 1))
    rounds = exclusive_prefix_rounds(shards)
    boundaries = []
    for mixer, layer_cache in zip(config.layer_pattern, cache.layers, strict=True):
        state = halo = features = 0
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
        boundaries.append(
            LayerBoundary(
                mixer=mixer,
                state_bytes=state,
                halo_bytes=halo,
                rounds=rounds if mixer in STATE_MIXERS else 0,
                feature_floats_per_token=features,
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
