"""Sequence-parallel forms of the ops whose outputs depend on earlier tokens.

Under an active mesh (``jax.set_mesh``) whose ``sequence`` axis has ``n > 1`` devices, the
activations ``[B, T, ...]`` are split along time into ``n`` contiguous slices of ``L = T / n``
tokens (shard ``s`` holds tokens ``s L .. (s + 1) L - 1``). Each op below runs inside
``jax.shard_map`` on its slice and passes to its neighbours only what crosses a slice boundary
(docs/sequence_parallelism.md):

- :func:`linear_attention_sharded` (causal linear attention with the BASED normalizer, and the
  decayed, unnormalised form of RetNet, TransNormerLLM and Mamba-2's SSD), in two passes per
  shard. First each shard sums its slice's final state from a zero start,
  ``S = sum_j phi(k_j) ⊗ [v_j, 1]`` ``[B, H, D', Dv + 1]`` (:func:`slice_final_state`: no outputs,
  no intra-chunk work; the column of ones appended to the values makes the normalizer's state
  ``z`` travel with ``S``). The states are combined by an exclusive prefix sum over the axis
  (:func:`exclusive_prefix_sum`: one shift and ``ceil(log2(n - 1))`` doubling steps of
  ``ppermute``), giving ``S_in``, the state of every earlier slice. Then each shard runs the
  unsharded op on its slice from ``initial_state = S_in``: its outputs need no correction, and
  it holds what the unsharded op of ``L`` tokens holds. With a decay the first pass weights key
  ``j`` by ``exp(G_L - G_j)`` (``G`` the slice's cumulative log decay), the prefix is over
  ``(total log decay, state)`` pairs (:func:`exclusive_decayed_prefix`, the same rounds), and
  the scan decays its initial state as the unsharded op does.
- :func:`window_attention_sharded` (sliding-window softmax attention): each shard receives the
  previous shard's last ``window - 1`` keys and values (one ``ppermute``) and attends its
  queries over them and its own keys; shard 0 masks them out.
- :func:`short_conv_sharded` (causal depthwise convolution): each shard receives the previous
  shard's last ``kernel - 1`` inputs (one ``ppermute``) as its initial state; shard 0 receives
  zeros, the unsharded op's initial state.

Every shard computes its part with the XLA algorithms of the unsharded ops, or with their Pallas
kernels (the ops of :data:`SEQUENCE_KERNEL_OPS` under ``implementation="pallas"``, or ``auto``
where the kernel runs); the halos, the slices' states and the prefix are XLA. The functions are
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
#: The ops whose shards also run their Pallas kernel inside the ``shard_map`` (the halos, the
#: slices' states and the prefix stay XLA), and the implementations they accept there.
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


def slice_final_state(
    k: Float[Array, "B L G F"],
    values: Float[Array, "B L H D"],
    log_decay: Float[Array, "B L H"] | None,
    *,
    feature_map: str,
    chunk_size: int,
) -> Float[Array, "B H E D"]:
    """The state a slice reaches from a zero state, ``S = sum_j exp(G_L - G_j) phi(k_j) ⊗ v_j``
    ``[B, H, D', D]`` (``G_j`` the cumulative log decay up to ``j``; without a decay every
    weight is 1), with no outputs and no intra-chunk kernel matrices: one contraction over the
    tokens, in chunks of ``chunk_size`` carried by ``lax.scan`` (the state decayed by each
    chunk's total decay, keys by their decay to the chunk's end, so exponents restart in every
    chunk as in the chunked algorithm). The step is rematerialised, so the backward keeps no
    ``[L, G, D']`` feature maps, only one chunk's at a time. ``k`` ``[B, L, G, F]`` groups the
    ``H`` heads of ``values`` as :func:`jaxbased.ops.linear_attention` does; all in
    ``values.dtype``."""
    from jaxbased.ops.feature_maps import get_feature_map

    phi = get_feature_map(feature_map)
    batch, length, groups = k.shape[:3]
    heads, width = values.shape[2:]
    chunks = -(-length // chunk_size)
    padding = chunks * chunk_size - length

    def to_chunks(x: Array) -> Array:  # [B, L, ...] -> [N, B, C, ...], zeros after the end
        x = jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(batch, chunks, chunk_size, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    @jax.checkpoint
    def step(state, chunk):
        k_chunk, values_chunk, *decay_chunk = chunk
        if decay_chunk:  # padded steps have log decay 0 and zero values: they add nothing
            cumulative = jnp.cumsum(decay_chunk[0], axis=1)  # [B, C, H]
            total = cumulative[:, -1]
            values_chunk = values_chunk * jnp.exp(total[:, None] - cumulative)[..., None]
            state = state * jnp.exp(total)[..., None, None]
        grouped = values_chunk.reshape(batch, chunk_size, groups, heads // groups, width)
        added = jnp.einsum("bcgf,bcgrd->bgrfd", phi(k_chunk), grouped)
        return state + added.reshape(state.shape), None

    features = jax.eval_shape(phi, jax.ShapeDtypeStruct((1, k.shape[3]), values.dtype))
    state = jnp.zeros((batch, heads, features.shape[-1], width), values.dtype)
    inputs = [to_chunks(k.astype(values.dtype)), to_chunks(values)]
    if log_decay is not None:
        inputs.append(to_chunks(log_decay.astype(values.dtype)))
    state, _ = jax.lax.scan(step, state, tuple(inputs))
    return state


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

    Two passes per shard: :func:`slice_final_state` gives the slice's state from a zero start
    (with a column of ones appended to the values where the normalizer ``z`` is needed, so
    that ``S`` and ``z`` travel as one ``[B, H, D', Dv + 1]`` leaf), the exclusive prefix gives
    ``S_in``, and the unsharded op scans the slice from ``initial_state = S_in``. With
    ``log_decay`` (``[H]`` per head, or ``[B, T, H]`` per step, as RetNet, TransNormerLLM and
    SSD use it) the pass weights key ``j`` by ``exp(G_L - G_j)`` and the prefix is
    :func:`exclusive_decayed_prefix` over ``(Λ = G_L, S)``; the scan decays its initial state
    as the unsharded op does.

    ``return_state`` (prefill): also return the state after the last token, a
    :class:`~jaxbased.ops.linear_attention.LinearAttentionState` (float32) replicated over
    ``sequence``: the last shard's scan's final state, broadcast by one all-reduce
    (:func:`jaxbased.ops.sequence_parallel_prefill.last_shard_value`).

    ``use_kernel``: each shard scans its slice with the Pallas kernel
    (``pallas_kernels.linear_attention``, chunks of ``kernel_chunk_size``, from ``S_in``;
    interpreted on CPU) instead of the XLA ``algorithm``; the slice's state and the prefix stay
    XLA."""
    from jaxbased.ops._common import compute_dtype
    from jaxbased.ops.linear_attention import LinearAttentionState, linear_attention
    from jaxbased.ops.sequence_parallel_prefill import last_shard_value

    dtype = compute_dtype(q, k, v)
    value_dim = v.shape[3]
    per_step_decay = log_decay is not None and log_decay.ndim == 3
    # The normalizer's state z rides with S as a ones column where the scan or the returned
    # state reads it.
    with_ones = normalize or return_state

    def scan_slice(q, k, v, decay, initial):
        """The slice's outputs and final ``(S, z)`` from the incoming ``initial`` state."""
        if not use_kernel:
            return linear_attention(
                q, k, v, feature_map=feature_map, algorithm=algorithm, chunk_size=chunk_size,
                eps=eps, initial_state=LinearAttentionState(*initial), return_state=True,
                normalize=normalize, implementation="xla", log_decay=decay,
            )  # fmt: skip
        from jaxbased.ops.dispatch import kernel_backend
        from pallas_kernels.linear_attention import linear_attention as kernel

        backend, interpret = kernel_backend()
        if decay is not None and decay.ndim == 1:
            decay = jnp.broadcast_to(decay, v.shape[:3])
        y, final = kernel(
            q, k, v, initial, log_decay=decay, normalize=normalize, feature_map=feature_map,
            chunk_size=kernel_chunk_size, eps=eps, backend=backend, interpret=interpret,
        )  # fmt: skip
        return y, LinearAttentionState(*final)

    def local(q, k, v, *decay):
        batch, length, local_heads = v.shape[:3]
        values = v.astype(dtype)
        if with_ones:
            ones = jnp.ones((batch, length, local_heads, 1), dtype)
            values = jnp.concatenate([values, ones], axis=-1)  # [B, L, H, Dv + 1]
        local_decay = decay[0].astype(dtype) if decay else None
        steps = None
        if local_decay is not None:
            steps = (
                local_decay
                if per_step_decay
                else jnp.broadcast_to(local_decay, (batch, length, local_heads))
            )
        state = slice_final_state(
            k, values, steps, feature_map=feature_map, chunk_size=chunk_size
        )  # [B, H, D', Dv']
        if steps is None:
            incoming = exclusive_prefix_sum(state, layout.shards)
        else:
            incoming = exclusive_decayed_prefix(state, jnp.sum(steps, axis=1), layout.shards)
        if with_ones:
            initial = (incoming[..., :value_dim], incoming[..., value_dim])
        else:
            initial = (incoming, jnp.zeros(incoming.shape[:3], incoming.dtype))
        y, final = scan_slice(q, k, v, local_decay, initial)
        if not return_state:
            return y
        return y, last_shard_value((final.kv_state, final.k_state), layout.shards)

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
