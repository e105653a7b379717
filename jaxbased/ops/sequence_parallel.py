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

Every shard computes its part with the XLA algorithms of the unsharded ops, or with their Pallas
kernels (the ops of :data:`SEQUENCE_KERNEL_OPS` under ``implementation="pallas"``, or ``auto``
where the kernel runs); the halos, the prefix and the corrections are XLA. The functions are
exact reformulations, equal to the unsharded ops up to float rounding. With ``return_state``
(prefill) the linear attention and the conv also return their decode state, replicated over
``sequence`` (:mod:`jaxbased.ops.sequence_parallel_prefill`). Batch dims stay split over
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

    def local_struct(self, x: Any) -> jax.ShapeDtypeStruct:
        """Shape and dtype of one shard's slice of the ``[B, T, ...]`` array ``x`` (time
        divided by the shards; batch and heads as given: kernels check their time length)."""
        return jax.ShapeDtypeStruct((x.shape[0], x.shape[1] // self.shards, *x.shape[2:]), x.dtype)


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


#: Implementations of the sequence-sharded ops whose shards compute with the XLA algorithms only
#: (``auto`` resolves to them under a time-split mesh).
SEQUENCE_IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla")
#: The ops whose shards also run their Pallas kernel inside the ``shard_map`` (the corrections
#: stay XLA), and the implementations they accept there.
SEQUENCE_KERNEL_OPS: tuple[str, ...] = ("linear_attention", "sliding_window_attention")
SEQUENCE_KERNEL_IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla", "pallas")


def check_sequence_implementation(op: str, implementation: str) -> None:
    """Raise ``ValueError`` when ``implementation`` cannot run ``op`` on a time-split mesh: the
    ops of :data:`SEQUENCE_KERNEL_OPS` take ``pallas`` too, the others only the XLA forms."""
    allowed = (
        SEQUENCE_KERNEL_IMPLEMENTATIONS if op in SEQUENCE_KERNEL_OPS else SEQUENCE_IMPLEMENTATIONS
    )
    if implementation not in allowed:
        raise ValueError(
            f"{op} with implementation={implementation!r} cannot run on a mesh with "
            f"{SEQUENCE_AXIS}={sequence_shards()}; allowed there: {allowed}, "
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
    return_state: bool = False,
    use_kernel: bool = False,
    kernel_chunk_size: int | None = None,
) -> Any:
    """Causal linear attention over a time-split mesh (module docstring), with or without the
    BASED normalizer and a decay; the result equals :func:`jaxbased.ops.linear_attention` with
    the same arguments (``[B, T, H, Dv]`` in ``v.dtype``). ``layout`` comes from
    :func:`sequence_layout` for ``(B, T, G)``: heads are split over ``tensor`` only with whole
    groups per shard.

    With ``log_decay`` (``[H]`` per head, or ``[B, T, H]`` per step, as RetNet, TransNormerLLM
    and SSD use it) each shard's final state and total log decay ``Λ`` go through
    :func:`exclusive_decayed_prefix`, and token ``i`` of a slice reads the incoming state
    decayed by ``exp(G_i)``, ``G_i`` the cumulative log decay of the slice up to ``i``:
    ``n_i += exp(G_i) phi(q_i) S_in``. Without ``normalize`` no ones column is appended.

    ``return_state`` (prefill): also return the state after the last token, a
    :class:`~jaxbased.ops.linear_attention.LinearAttentionState` (float32) replicated over
    ``sequence``: the last shard's incoming state (decayed by its ``exp(Λ)``) plus its own,
    broadcast by one all-reduce (:func:`jaxbased.ops.sequence_parallel_prefill.last_shard_value`).
    Without ``normalize`` the ones column is appended then too, so that ``z`` (the state's
    ``k_state``) travels with ``S`` in the prefix as one ``[B, H, D', Dv + 1]`` leaf.

    ``use_kernel``: each shard scans its slice with the Pallas kernel
    (``pallas_kernels.linear_attention``, chunks of ``kernel_chunk_size``; interpreted on CPU)
    instead of the XLA ``algorithm``; the prefix and the corrections stay XLA."""
    from jaxbased.ops._common import compute_dtype
    from jaxbased.ops.feature_maps import get_feature_map
    from jaxbased.ops.linear_attention import LinearAttentionState, linear_attention
    from jaxbased.ops.sequence_parallel_prefill import last_shard_value

    dtype = compute_dtype(q, k, v)
    value_dim = v.shape[3]
    phi = get_feature_map(feature_map)
    per_step_decay = log_decay is not None and log_decay.ndim == 3
    # A column of ones appended to the values makes the same scan yield the normalizer z, for
    # the BASED normalizer and for a returned state (whose k_state is z).
    with_ones = normalize or return_state

    def scan_slice(q, k, values, decay):
        """The slice from a zero state: unnormalised outputs and the final ``(S, z)``."""
        if not use_kernel:
            numerator, state = linear_attention(
                q, k, values, feature_map=feature_map, algorithm=algorithm,
                chunk_size=chunk_size, return_state=True, normalize=False,
                implementation="xla", log_decay=decay,
            )  # fmt: skip
            return numerator, (state.kv_state, state.k_state)
        from jaxbased.ops.dispatch import kernel_backend
        from pallas_kernels.linear_attention import linear_attention as kernel

        backend, interpret = kernel_backend()
        if decay is not None and decay.ndim == 1:
            decay = jnp.broadcast_to(decay, values.shape[:3])
        return kernel(
            q, k, values, None, log_decay=decay, normalize=False, feature_map=feature_map,
            chunk_size=kernel_chunk_size, backend=backend, interpret=interpret,
        )  # fmt: skip

    def local(q, k, v, *decay):
        batch, length = v.shape[:2]
        local_groups, local_heads = q.shape[2], v.shape[2]
        # The kernel takes the inputs' own dtype (bfloat16 operands for a bfloat16 model).
        operand_dtype = v.dtype if use_kernel else dtype
        values = v.astype(operand_dtype)
        if with_ones:
            ones = jnp.ones((batch, length, local_heads, 1), operand_dtype)
            values = jnp.concatenate([values, ones], axis=-1)  # [B, L, H, Dv + 1]
        local_decay = decay[0].astype(dtype) if decay else None
        if use_kernel:
            numerator, (kv_state, k_state) = scan_slice(q, k, values, local_decay)
            numerator = numerator.astype(dtype)
        else:
            numerator, (kv_state, k_state) = scan_slice(
                q.astype(dtype), k.astype(dtype), values, local_decay
            )
        del k_state  # z is the ones column's state where it is needed
        state = kv_state
        if local_decay is None:
            incoming = exclusive_prefix_sum(state, layout.shards)  # [B, H, D', Dv']
            weight, own_decay = None, None
        else:
            steps = (
                local_decay
                if per_step_decay
                else jnp.broadcast_to(local_decay, (batch, length, local_heads))
            )
            cumulative = jnp.cumsum(steps, axis=1)  # G_i [B, L, H]
            incoming = exclusive_decayed_prefix(state, cumulative[:, -1], layout.shards)
            weight, own_decay = jnp.exp(cumulative), jnp.exp(cumulative[:, -1])
        per_group = local_heads // local_groups
        grouped = incoming.reshape(batch, local_groups, per_group, *incoming.shape[2:])
        correction = jnp.einsum("blgf,bgrfd->blgrd", phi(q.astype(dtype)), grouped)
        correction = correction.reshape(numerator.shape)
        if weight is not None:
            correction = correction * weight[..., None]
        numerator = numerator + correction
        if normalize:
            y = numerator[..., :value_dim] / (numerator[..., value_dim:] + eps)
        else:
            y = numerator[..., :value_dim]
        y = y.astype(v.dtype)
        if not return_state:
            return y
        final = state + (  # the state after the slice [B, H, D', Dv + 1]
            incoming if own_decay is None else own_decay[..., None, None] * incoming
        )
        return y, last_shard_value((final[..., :value_dim], final[..., value_dim]), layout.shards)

    specs = [layout.spec(4), layout.spec(4), layout.spec(4)]
    operands = [q, k, v]
    if log_decay is not None:
        specs.append(layout.spec(3) if per_step_decay else PartitionSpec(layout.head_axis))
        operands.append(log_decay)
    out_specs: Any = layout.spec(4)
    if return_state:
        state_spec = PartitionSpec(layout.batch_axes, layout.head_axis)
        out_specs = (out_specs, (state_spec, state_spec))
    result = _shard_map(local, tuple(specs), out_specs)(*operands)
    if not return_state:
        return result
    y, (kv_state, k_state) = result
    return y, LinearAttentionState(kv_state, k_state)


def window_attention_sharded(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T H D"],
    v: Float[Array, "B T H Dv"],
    layout: SequenceLayout,
    *,
    window: int,
    scale: float | None,
    block_size: int | None,
    use_kernel: bool = False,
) -> Float[Array, "B T H Dv"]:
    """Sliding-window causal softmax attention over a time-split mesh: each shard attends its
    queries over the previous shard's last ``window - 1`` keys and values (one ``ppermute`` of
    both, concatenated) and its own. Requires ``T / n >= window - 1``. Equals
    :func:`jaxbased.ops.sliding_window_attention` (``[B, T, H, Dv]`` in ``v.dtype``).

    ``use_kernel``: each shard runs the Pallas kernel (``pallas_kernels.window_attention``;
    interpreted on CPU) on ``[halo, own]`` keys with zero queries in front of its own, and
    keeps the outputs of its own ``L`` queries; shard 0, whose halo is empty, runs the kernel
    on its slice alone (a ``lax.cond`` on the shard index)."""
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

    def kernel(q, k, v):
        from jaxbased.ops.dispatch import kernel_backend
        from pallas_kernels.window_attention import window_attention

        backend, interpret = kernel_backend()
        return window_attention(
            q, k, v, window=window, scale=scale, block_size=block_size, backend=backend,
            interpret=interpret,
        )  # fmt: skip

    def kernel_with_history(q, k, v, earlier_keys, earlier_values):
        def with_halo():
            front = jnp.zeros((q.shape[0], history, *q.shape[2:]), q.dtype)
            extended = (
                jnp.concatenate([front, q], axis=1),
                jnp.concatenate([earlier_keys, k], axis=1),
                jnp.concatenate([earlier_values, v], axis=1),
            )
            return kernel(*extended)[:, history:]

        has_earlier = jax.lax.axis_index(SEQUENCE_AXIS) > 0
        return jax.lax.cond(has_earlier, with_halo, lambda: kernel(q, k, v))

    def local(q, k, v):
        if history:
            tail = jnp.concatenate([k[:, -history:], v[:, -history:]], axis=-1)
            received = _shift_to_next(tail, layout.shards)
            earlier = (received[..., :head_dim], received[..., head_dim:])
        else:
            earlier = None
        if use_kernel:
            if earlier is None:
                return kernel(q, k, v)
            return kernel_with_history(q, k, v, *earlier)
        has_earlier = jax.lax.axis_index(SEQUENCE_AXIS) > 0
        return windowed_attention_with_history(
            q, k, v, earlier, has_earlier, window=window, scale=scale, block_size=block_size
        )

    specs = (layout.spec(4), layout.spec(4), layout.spec(4))
    return _shard_map(local, specs, layout.spec(4))(q, k, v)


def short_conv_sharded(
    x: Float[Array, "B T C"],
    weight: Float[Array, "K C"],
    layout: SequenceLayout,
    *,
    return_state: bool = False,
    lengths: Any = None,
) -> Any:
    """Causal depthwise convolution over a time-split mesh: each shard's initial state is the
    previous shard's last ``K - 1`` inputs (one ``ppermute``; zeros on shard 0). Requires
    ``T / n >= K - 1``. Equals :func:`jaxbased.ops.short_conv` with no initial state.

    ``return_state`` (prefill): also the ``[B, K - 1, C]`` inputs before position
    ``lengths[b]`` of each row (``lengths [B]`` int, default ``T``), zeros before the start,
    replicated over ``sequence``: each input is taken by the shard that holds it and summed
    over the axis (:func:`jaxbased.ops.sequence_parallel_prefill.gather_positions`)."""
    from jaxbased.ops.sequence_parallel_prefill import gather_positions
    from jaxbased.ops.short_conv import short_conv

    history = weight.shape[0] - 1
    batch, seq = x.shape[:2]
    length = seq // layout.shards
    if length < history:
        raise ValueError(
            f"sequence shards of {length} tokens (T={seq} over sequence={layout.shards}) "
            f"must hold the convolution's {history} earlier inputs; use sequence <= "
            f"{max(1, seq // history)} or a longer sequence"
        )

    def local(x, weight, *ends):
        if not history:
            y = short_conv(x, weight)
        else:
            earlier = _shift_to_next(x[:, -history:], layout.shards)
            y = short_conv(x, weight, initial_state=earlier)
        if not return_state:
            return y
        positions = ends[0][:, None] - history + jnp.arange(history, dtype=jnp.int32)
        return y, gather_positions(x, positions)

    channels = layout.spec(3)
    weight_spec = PartitionSpec(None, layout.head_axis)
    if not return_state:
        return _shard_map(local, (channels, weight_spec), channels)(x, weight)
    ends = jnp.full((batch,), seq, jnp.int32) if lengths is None else jnp.asarray(lengths)
    state_spec = PartitionSpec(layout.batch_axes, None, layout.head_axis)
    in_specs = (channels, weight_spec, PartitionSpec(layout.batch_axes))
    return _shard_map(local, in_specs, (channels, state_spec))(x, weight, ends.astype(jnp.int32))
