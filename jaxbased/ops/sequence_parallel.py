"""Sequence-parallel forms of the ops whose outputs depend on earlier tokens.

Under an active mesh (``jax.set_mesh``) whose ``sequence`` axis has ``n > 1`` devices, the
activations ``[B, T, ...]`` are split along time into ``n`` contiguous slices of ``L = T / n``
tokens (shard ``s`` holds tokens ``s L .. (s + 1) L - 1``). Each op below runs inside
``jax.shard_map`` on its slice and passes to its neighbours only what crosses a slice boundary
(docs/sequence_parallelism.md):

- :func:`linear_attention_sharded` (causal linear attention with the BASED normalizer, and the
  decayed, unnormalised form of RetNet, TransNormerLLM and Mamba-2's SSD): each
  shard scans its slice from a zero state, with a column of ones appended to the values so that
  the same scan yields the normalizer: ``n_i = sum_{j<=i, j in slice} phi(q_i).phi(k_j) [v_j, 1]``
  and the slice's final state ``S = sum_j phi(k_j) ⊗ [v_j, 1]`` ``[B, H, D', Dv + 1]``. The
  states are combined by an exclusive prefix sum over the axis
  (:func:`exclusive_prefix_sum`: one shift and ``ceil(log2(n - 1))`` doubling steps of
  ``ppermute``), giving ``S_in``, the state of every earlier slice. Each shard then corrects
  ``n_i += phi(q_i) S_in`` and returns ``y_i = n_i[:Dv] / (n_i[Dv] + eps)``. With a decay the
  prefix is over ``(total log decay, state)`` pairs (:func:`exclusive_decayed_prefix`, the same
  rounds) and the correction is weighted by the slice's cumulative decay.
- :func:`window_attention_sharded` (sliding-window softmax attention): each shard receives the
  previous shard's last ``window - 1`` keys and values (one ``ppermute``) and attends its
  queries over them and its own keys; shard 0 masks them out.
- :func:`short_conv_sharded` (causal depthwise convolution): each shard receives the previous
  shard's last ``kernel - 1`` inputs (one ``ppermute``) as its initial state; shard 0 receives
  zeros, the unsharded op's initial state.

Every shard computes its part with the XLA algorithms of the unsharded ops; the functions are
exact reformulations, equal to the unsharded ops up to float rounding. Batch dims stay split over
the mesh's batch axes and heads (channels) over ``tensor`` as in :mod:`jaxbased.ops.dispatch`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float

from jaxbased.ops.dispatch import mesh_partition

#: The mesh axis that splits the time axis of activations.
SEQUENCE_AXIS = "sequence"


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """How the active mesh splits an op's ``[B, T, H, ...]`` arrays.

    Attributes:
      shards: devices along ``sequence`` (``n > 1``).
      batch_axes: mesh axes that split the batch dim (None: not split).
      head_axis: the mesh axis that splits heads or channels (None: not split).
    """

    shards: int
    batch_axes: tuple[str, ...] | None
    head_axis: str | None

    def spec(self, ndim: int, heads: bool = True) -> PartitionSpec:
        """Spec of a batch-major ``[B, T, H, ...]`` array of rank ``ndim`` (``heads=False``:
        the third dim is not split)."""
        rest = [self.head_axis if heads else None] + [None] * (ndim - 3)
        return PartitionSpec(self.batch_axes, SEQUENCE_AXIS, *rest[: ndim - 2])


def sequence_shards() -> int:
    """Devices along the active mesh's ``sequence`` axis (1 without a mesh, without the axis,
    or inside a ``shard_map`` that already made it manual)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        return 1
    if SEQUENCE_AXIS in getattr(mesh, "manual_axes", ()):
        return 1
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))[SEQUENCE_AXIS]


def sequence_layout(batch: int, seq: int, heads: int) -> SequenceLayout | None:
    """The :class:`SequenceLayout` for arrays with these dims, or None when the active mesh
    does not split time (no ``sequence`` axis larger than one, or ``seq`` not divisible by it:
    then the unsharded op runs and XLA places the data)."""
    shards = sequence_shards()
    if shards <= 1 or seq % shards:
        return None
    batch_axes, head_axis = mesh_partition(batch, heads) or (None, None)
    return SequenceLayout(shards, batch_axes, head_axis)


def constrain_sequence(x: jax.Array, batch_axes: Any) -> PartitionSpec | None:
    """The spec ``(batch_axes, "sequence", None, ...)`` for an activation ``[B, T, ...]`` when
    the active mesh splits time and ``T`` divides, else None."""
    if x.ndim < 2 or sequence_layout(x.shape[0], x.shape[1], 1) is None:
        return None
    return PartitionSpec(batch_axes, SEQUENCE_AXIS, *([None] * (x.ndim - 2)))


def _shift_to_next(x: Any, shards: int, offset: int = 1) -> Any:
    """Every leaf of ``x`` sent from shard ``s`` to shard ``s + offset``; the first ``offset``
    shards receive zeros."""
    pairs = [(source, source + offset) for source in range(shards - offset)]
    return jax.tree.map(lambda leaf: jax.lax.ppermute(leaf, SEQUENCE_AXIS, pairs), x)


def exclusive_prefix_sum(x: Any, shards: int) -> Any:
    """``sum_{r < s} x_r`` on shard ``s`` of the ``sequence`` axis (zeros on shard 0), leaf by
    leaf, inside a ``shard_map`` over that axis.

    One shift by one shard, then doubling steps (shift by 1, 2, 4, ... and add) over the shifted
    values, of which shard 0's is already zero: ``1 + ceil(log2(n - 1))`` ``ppermute`` rounds for
    ``n`` shards (1, 3, 4 for n = 2, 4, 8), each sending one copy of ``x`` per device.
    """
    total = _shift_to_next(x, shards)
    offset = 1
    while offset < shards - 1:
        received = _shift_to_next(total, shards, offset)
        total = jax.tree.map(jnp.add, total, received)
        offset *= 2
    return total


def exclusive_prefix_rounds(shards: int) -> int:
    """``ppermute`` rounds of :func:`exclusive_prefix_sum` over ``shards`` devices."""
    if shards <= 1:
        return 0
    return 1 + (math.ceil(math.log2(shards - 1)) if shards > 2 else 0)


#: Implementations the sequence-sharded ops run: each shard computes with the XLA algorithms
#: (``auto`` resolves to them under a time-split mesh).
SEQUENCE_IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla")


def check_sequence_implementation(op: str, implementation: str) -> None:
    """Raise ``ValueError`` when ``implementation`` cannot run ``op`` on a time-split mesh."""
    if implementation not in SEQUENCE_IMPLEMENTATIONS:
        raise ValueError(
            f"{op} with implementation={implementation!r} cannot run on a mesh with "
            f"{SEQUENCE_AXIS}={sequence_shards()}; allowed there: {SEQUENCE_IMPLEMENTATIONS}, "
            f"or {SEQUENCE_AXIS}=1"
        )


def _shard_map(function: Callable, in_specs: Any, out_specs: Any) -> Callable:
    return jax.shard_map(function, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def exclusive_decayed_prefix(state: Any, log_total: Array, shards: int) -> Any:
    """The state entering shard ``s`` of a decayed linear recurrence, inside a ``shard_map``
    over the ``sequence`` axis: ``sum_{r < s} exp(Λ_{r+1} + ... + Λ_{s-1}) S_r`` (zeros on
    shard 0), where shard ``r`` ran its slice from a zero state to the final state ``S_r`` and
    ``Λ_r`` is the sum of its log decays.

    ``state`` is a pytree of ``[B, H, ...]`` leaves, ``log_total`` ``[B, H]`` (log decays are
    ``<= 0``, so every factor is in ``[0, 1]``). The pairs ``(Λ, S)`` compose associatively,
    an earlier range ``(Λ_1, S_1)`` then a later one ``(Λ_2, S_2)`` giving
    ``(Λ_1 + Λ_2, exp(Λ_2) S_1 + S_2)``, and ``(0, 0)`` is the identity that ``ppermute``
    hands the shards nothing is sent to; so the scan is :func:`exclusive_prefix_sum`'s: one
    shift, then doubling steps, ``exclusive_prefix_rounds(shards)`` rounds, each moving the
    state and its ``[B, H]`` log decay once.
    """

    def scale(leaf: Array, log_factor: Array) -> Array:
        factor = jnp.exp(log_factor).astype(leaf.dtype)
        return leaf * factor.reshape(factor.shape + (1,) * (leaf.ndim - factor.ndim))

    total, total_log = _shift_to_next((state, log_total), shards)
    offset = 1
    while offset < shards - 1:
        earlier, earlier_log = _shift_to_next((total, total_log), shards, offset)
        total = jax.tree.map(
            lambda mine, theirs, log=total_log: scale(theirs, log) + mine, total, earlier
        )
        total_log = earlier_log + total_log
        offset *= 2
    return total


def linear_attention_sharded(
    q: Float[Array, "B T G F"],
    k: Float[Array, "B T G F"],
    v: Float[Array, "B T H Dv"],
    layout: SequenceLayout,
    *,
    feature_map: str,
    algorithm: str,
    chunk_size: int,
    eps: float,
    log_decay: Float[Array, " H"] | Float[Array, "B T H"] | None = None,
    normalize: bool = True,
) -> Float[Array, "B T H Dv"]:
    """Causal linear attention over a time-split mesh (module docstring), with or without the
    BASED normalizer and a decay; the result equals :func:`jaxbased.ops.linear_attention` with
    the same arguments (``[B, T, H, Dv]`` in ``v.dtype``). ``layout`` comes from
    :func:`sequence_layout` for ``(B, T, G)``: heads are split over ``tensor`` only with whole
    groups per shard.

    With ``log_decay`` (``[H]`` per head, or ``[B, T, H]`` per step, as RetNet, TransNormerLLM
    and SSD use it) each shard's final state and total log decay ``Λ`` go through
    :func:`exclusive_decayed_prefix`, and token ``i`` of a slice reads the incoming state
    decayed by ``exp(G_i)``, ``G_i`` the cumulative log decay of the slice up to ``i``:
    ``n_i += exp(G_i) phi(q_i) S_in``. Without ``normalize`` no ones column is appended."""
    from jaxbased.ops._common import compute_dtype
    from jaxbased.ops.feature_maps import get_feature_map
    from jaxbased.ops.linear_attention import linear_attention

    dtype = compute_dtype(q, k, v)
    value_dim = v.shape[3]
    phi = get_feature_map(feature_map)
    per_step_decay = log_decay is not None and log_decay.ndim == 3

    def local(q, k, v, *decay):
        batch, length = v.shape[:2]
        local_groups, local_heads = q.shape[2], v.shape[2]
        values = v.astype(dtype)
        if normalize:
            ones = jnp.ones((batch, length, local_heads, 1), dtype)
            values = jnp.concatenate([values, ones], axis=-1)  # [B, L, H, Dv + 1]
        local_decay = decay[0].astype(dtype) if decay else None
        numerator, state = linear_attention(
            q.astype(dtype),
            k.astype(dtype),
            values,
            feature_map=feature_map,
            algorithm=algorithm,
            chunk_size=chunk_size,
            return_state=True,
            normalize=False,
            implementation="xla",
            log_decay=local_decay,
        )
        if local_decay is None:
            incoming = exclusive_prefix_sum(state.kv_state, layout.shards)  # [B, H, D', Dv']
            weight = None
        else:
            steps = (
                local_decay
                if per_step_decay
                else jnp.broadcast_to(local_decay, (batch, length, local_heads))
            )
            cumulative = jnp.cumsum(steps, axis=1)  # G_i [B, L, H]
            incoming = exclusive_decayed_prefix(state.kv_state, cumulative[:, -1], layout.shards)
            weight = jnp.exp(cumulative)
        per_group = local_heads // local_groups
        incoming = incoming.reshape(batch, local_groups, per_group, *incoming.shape[2:])
        correction = jnp.einsum("blgf,bgrfd->blgrd", phi(q.astype(dtype)), incoming)
        correction = correction.reshape(numerator.shape)
        if weight is not None:
            correction = correction * weight[..., None]
        numerator = numerator + correction
        if normalize:
            y = numerator[..., :value_dim] / (numerator[..., value_dim:] + eps)
        else:
            y = numerator
        return y.astype(v.dtype)

    specs = [layout.spec(4), layout.spec(4), layout.spec(4)]
    operands = [q, k, v]
    if log_decay is not None:
        specs.append(layout.spec(3) if per_step_decay else PartitionSpec(layout.head_axis))
        operands.append(log_decay)
    return _shard_map(local, tuple(specs), layout.spec(4))(*operands)


def window_attention_sharded(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    layout: SequenceLayout,
    *,
    window: int,
    scale: float | None,
    block_size: int | None,
) -> Float[Array, "B T H Dv"]:
    """Sliding-window causal softmax attention over a time-split mesh: each shard attends its
    queries over the previous shard's last ``window - 1`` keys and values (one ``ppermute`` of
    both, concatenated) and its own. Requires ``T / n >= window - 1``. Equals
    :func:`jaxbased.ops.sliding_window_attention` (``[B, T, H, Dv]`` in ``v.dtype``)."""
    from jaxbased.ops.window_attention import windowed_attention_with_history

    history = window - 1
    length = q.shape[1] // layout.shards
    if length < history:
        raise ValueError(
            f"sequence shards of {length} tokens (T={q.shape[1]} over sequence={layout.shards}) "
            f"must hold the window's {history} earlier keys; use sequence <= "
            f"{max(1, q.shape[1] // max(history, 1))} or a longer sequence"
        )
    head_dim = k.shape[-1]

    def local(q, k, v):
        if history:
            tail = jnp.concatenate([k[:, -history:], v[:, -history:]], axis=-1)
            received = _shift_to_next(tail, layout.shards)
            earlier = (received[..., :head_dim], received[..., head_dim:])
        else:
            earlier = None
        has_earlier = jax.lax.axis_index(SEQUENCE_AXIS) > 0
        return windowed_attention_with_history(
            q, k, v, earlier, has_earlier, window=window, scale=scale, block_size=block_size
        )

    specs = (layout.spec(4), layout.spec(4), layout.spec(4))
    return _shard_map(local, specs, layout.spec(4))(q, k, v)


def short_conv_sharded(
    x: Float[Array, "B T C"], weight: Float[Array, "K C"], layout: SequenceLayout
) -> Float[Array, "B T C"]:
    """Causal depthwise convolution over a time-split mesh: each shard's initial state is the
    previous shard's last ``K - 1`` inputs (one ``ppermute``; zeros on shard 0). Requires
    ``T / n >= K - 1``. Equals :func:`jaxbased.ops.short_conv` with no initial state."""
    from jaxbased.ops.short_conv import short_conv

    history = weight.shape[0] - 1
    length = x.shape[1] // layout.shards
    if length < history:
        raise ValueError(
            f"sequence shards of {length} tokens (T={x.shape[1]} over sequence={layout.shards}) "
            f"must hold the convolution's {history} earlier inputs; use sequence <= "
            f"{max(1, x.shape[1] // history)} or a longer sequence"
        )

    def local(x, weight):
        if not history:
            return short_conv(x, weight)
        earlier = _shift_to_next(x[:, -history:], layout.shards)
        return short_conv(x, weight, initial_state=earlier)

    channels = layout.spec(3)
    weight_spec = PartitionSpec(None, layout.head_axis)
    return _shard_map(local, (channels, weight_spec), channels)(x, weight)
