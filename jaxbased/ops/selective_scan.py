"""The selective scan of Mamba-1: a diagonal state per channel, decays per channel and step.

Per batch, with a state ``h [D, N]``:

    h_t = exp(delta_t[:, None] * a) * h_{t-1} + (delta_t * u_t)[:, None] * b_t[None, :]
    y_t = h_t @ c_t

``u, delta [B, T, D]`` (``delta`` already positive: the layer applies softplus), ``a [D, N]``
(negative: ``-exp(A_log)``), ``b, c [B, T, N]``. The ``D`` skip term and the gate belong to the
layer.

Algorithms (all compute the same function):

- ``sequential``: ``lax.scan`` token by token (the reference, as in decoding).
- ``chunked`` (default): chunks of ``chunk_size`` tokens; inside a chunk an associative scan
  over ``(decay, input)`` pairs, across chunks the state carried by ``lax.scan``. Each chunk is
  rematerialized in the backward pass, so memory is ``O(B * chunk * D * N)`` plus one
  ``[B, D, N]`` state per chunk, never ``O(B * T * D * N)``.
- ``associative``: one ``lax.associative_scan`` over the whole sequence (``O(B * T * D * N)``
  memory, ``O(log T)`` depth).

``implementation`` picks who computes ``chunked``: the XLA scan above, or the Pallas kernel of
``pallas_kernels.selective_scan`` (the state of a block of channels on chip for the whole
sequence, chunks of 16 (TPU) or 8 (GPU) tokens unrolled, a checkpoint per chunk for the
backward; its own chunk, not ``chunk_size``, which is the XLA scan's); see
:mod:`jaxbased.ops.dispatch`.

On a mesh whose ``sequence`` axis splits time, a scan from a zero state without a returned
state (training's forward) runs sequence-parallel
(:func:`jaxbased.ops.sequence_parallel_scan.selective_scan_sharded`).

All arithmetic is in float32 (float64 under x64); ``y`` has the dtype of ``u``; states are
``[B, D, N]`` float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float

from jaxbased.ops._common import (
    check_algorithm,
    check_chunk_size,
    check_not_negative,
    check_not_positive,
    check_shape,
    compute_dtype,
    initial_state_or_zeros,
)
from jaxbased.ops.dispatch import (
    KernelRequest,
    KernelTarget,
    check_implementation,
    kernel_target,
    mesh_partition,
    shard_kernel,
    use_pallas,
)
from jaxbased.ops.kernel_check import compare_with_reference
from jaxbased.ops.sequence_parallel import check_sequence_implementation, sequence_layout
from jaxbased.ops.sequence_parallel_scan import selective_scan_sharded

ALGORITHMS: tuple[str, ...] = ("chunked", "sequential", "associative")


def _check_shapes(u, delta, a, b, c, token_axes: int) -> tuple[int, int]:
    """Validate shapes; returns ``(channels, state_dim)``. ``token_axes`` is 2 for sequences
    (``[B, T, ...]``) and 1 for one step (``[B, ...]``)."""
    lead = "[B, T, " if token_axes == 2 else "[B, "
    if u.ndim != token_axes + 1:
        raise ValueError(f"u must be {lead}D]; got shape {u.shape}")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {u.shape}; got shape {delta.shape}")
    channels = u.shape[-1]
    if a.ndim != 2 or a.shape[0] != channels:
        raise ValueError(f"a must be [D, N] with D = {channels}; got shape {a.shape}")
    state_dim = a.shape[1]
    expected = (*u.shape[:-1], state_dim)
    if b.shape != expected:
        raise ValueError(f"b must be {lead}N] = {expected}; got shape {b.shape}")
    if c.shape != expected:
        raise ValueError(f"c must be {lead}N] = {expected}; got shape {c.shape}")
    check_not_positive("a", a)
    check_not_negative("delta", delta)
    return channels, state_dim


def _combine(earlier, later):
    # Composition of two affine maps h -> decay * h + input (earlier applied first).
    earlier_decay, earlier_input = earlier
    later_decay, later_input = later
    return earlier_decay * later_decay, later_decay * earlier_input + later_input


def _scan_block(state, u, delta, a, b, c):
    """One block of tokens by an associative scan: state [B, D, N]; u, delta [B, C, D];
    b, c [B, C, N]. Returns the state after the block and y [B, C, D]."""
    decay = jnp.exp(delta[..., None] * a)  # [B, C, D, N]
    inputs = (delta * u)[..., None] * b[:, :, None, :]
    # Fold the incoming state into the first token: h_1 = a_1 h_0 + x_1.
    inputs = inputs.at[:, 0].add(decay[:, 0] * state)
    _, states = jax.lax.associative_scan(_combine, (decay, inputs), axis=1)
    return states[:, -1], jnp.einsum("bcdn,bcn->bcd", states, c)


def _step(u_t, delta_t, a, b_t, c_t, state):
    # u_t, delta_t [B, D]; a [D, N]; b_t, c_t [B, N]; state [B, D, N].
    decay = jnp.exp(delta_t[..., None] * a)
    state = decay * state + (delta_t * u_t)[..., None] * b_t[:, None, :]
    return jnp.einsum("bdn,bn->bd", state, c_t), state


def _sequential(state, u, delta, a, b, c):
    def step(carry, token):
        u_t, delta_t, b_t, c_t = token
        y_t, carry = _step(u_t, delta_t, a, b_t, c_t, carry)
        return carry, y_t

    tokens = tuple(jnp.moveaxis(arr, 1, 0) for arr in (u, delta, b, c))
    final, y = jax.lax.scan(step, state, tokens)
    return final, jnp.moveaxis(y, 0, 1)


def _chunked(state, u, delta, a, b, c, chunk_size):
    batch, seq, channels = u.shape
    num_chunks = -(-seq // chunk_size)
    pad = num_chunks * chunk_size - seq
    # Padded steps have delta = 0: no decay and no input, so the state passes through.
    u, delta, b, c = (jnp.pad(arr, ((0, 0), (0, pad), (0, 0))) for arr in (u, delta, b, c))

    def to_chunks(arr: Array) -> Array:  # [B, T, X] -> [num_chunks, B, C, X]
        return jnp.moveaxis(arr.reshape(batch, num_chunks, chunk_size, arr.shape[-1]), 1, 0)

    block = jax.checkpoint(lambda carry, u, delta, b, c: _scan_block(carry, u, delta, a, b, c))

    def step(carry, chunk):
        return block(carry, *chunk)

    final, y = jax.lax.scan(step, state, tuple(to_chunks(arr) for arr in (u, delta, b, c)))
    y = jnp.moveaxis(y, 0, 1).reshape(batch, num_chunks * chunk_size, channels)[:, :seq]
    return final, y


def selective_scan(
    u: Float[Array, "B T D"],
    delta: Float[Array, "B T D"],
    a: Float[Array, "D N"],
    b: Float[Array, "B T N"],
    c: Float[Array, "B T N"],
    *,
    algorithm: str = "chunked",
    chunk_size: int = 64,
    initial_state: Float[Array, "B D N"] | None = None,
    return_state: bool = False,
    implementation: str = "auto",
) -> Float[Array, "B T D"] | tuple[Float[Array, "B T D"], Float[Array, "B D N"]]:
    """Mamba-1's scan ``h_t = exp(delta_t a) h_{t-1} + delta_t u_t b_t^T``, ``y_t = h_t c_t``.

    Args:
      u: ``[B, T, D]`` inputs.
      delta: ``[B, T, D]`` step sizes, >= 0 (after softplus).
      a: ``[D, N]`` rates, <= 0 (``-exp(A_log)``).
      b: ``[B, T, N]`` input projection (shared by all channels).
      c: ``[B, T, N]`` output projection (shared by all channels).
      algorithm: ``chunked`` (default), ``sequential`` or ``associative``; all agree.
      chunk_size: tokens per chunk of ``chunked``; any length works (the tail is masked).
      initial_state: ``[B, D, N]`` state to continue from.
      return_state: also return the state after the last token.
      implementation: who computes ``chunked``: ``auto``, ``xla`` or ``pallas`` (the kernel;
        interpreted on CPU); the other algorithms are XLA's.

    Returns:
      ``y [B, T, D]`` in ``u.dtype``, and the final state ``[B, D, N]`` (float32) when
      ``return_state`` is set. Values of ``a`` and ``delta`` are checked when concrete.
    """
    check_algorithm(algorithm, ALGORITHMS)
    check_chunk_size(chunk_size)
    check_implementation(implementation)
    channels, state_dim = _check_shapes(u, delta, a, b, c, token_axes=2)
    # A time-split mesh: the sequence-parallel form from a zero state; prefill (an initial or
    # returned state) runs below and XLA places the data.
    layout = sequence_layout(u.shape[0], u.shape[1], channels)
    if layout is not None and initial_state is None and not return_state:
        check_sequence_implementation("selective_scan", implementation)
        return selective_scan_sharded(
            u, delta, a, b, c, layout, algorithm=algorithm, chunk_size=chunk_size
        )
    if implementation != "xla" and use_pallas(
        implementation,
        _kernel_unsupported(u, delta, a, b, c, algorithm),
        _kernel_request(u),
    ):
        y, final = _pallas(u, delta, a, b, c, initial_state)
        return (y, final) if return_state else y
    dtype = compute_dtype(u, delta, a, b, c)
    state = initial_state_or_zeros(
        initial_state, "[B, D, N]", (u.shape[0], channels, state_dim), dtype
    )
    arguments = (state, *(jnp.asarray(arr, dtype) for arr in (u, delta, a, b, c)))

    if algorithm == "sequential":
        final, y = _sequential(*arguments)
    elif algorithm == "associative":
        final, y = _scan_block(*arguments)
    else:
        final, y = _chunked(*arguments, chunk_size)
    y = y.astype(u.dtype)
    return (y, final) if return_state else y


def _kernel_unsupported(u, delta, a, b, c, algorithm) -> str | None:
    from pallas_kernels.selective_scan import unsupported_reason

    if algorithm != "chunked":
        return f"the kernel computes algorithm='chunked', not {algorithm!r}"
    return unsupported_reason(
        u.shape,
        a.shape[1],
        backend=kernel_target().backend,
        chunk_size=None,
        dtypes=tuple(x.dtype for x in (u, delta, a, b, c)),
    )


def _pallas(u, delta, a, b, c, initial_state):
    from pallas_kernels.selective_scan import selective_scan as pallas_selective_scan

    target = kernel_target()
    batch, _, channels = u.shape
    state_dim = a.shape[1]
    state = ()
    if initial_state is not None:
        state = (initial_state_or_zeros(
            initial_state, "[B, D, N]", (batch, channels, state_dim), jnp.float32
        ),)  # fmt: skip

    def kernel(u, delta, a, b, c, *state):
        return pallas_selective_scan(
            u, delta, a, b, c, state[0] if state else None, backend=target.backend,
            interpret=target.interpret,
        )  # fmt: skip

    # Batch over the data axes, channels over tensor (as the layer's conv_channels).
    partition = mesh_partition(batch, channels)
    specs = (None,) * 6
    if partition is not None:
        batch_axes, channel_axis = partition
        channel_spec = PartitionSpec(batch_axes, None, channel_axis)
        state_spec = PartitionSpec(batch_axes, channel_axis, None)
        specs = (
            channel_spec,
            channel_spec,
            PartitionSpec(channel_axis, None),
            PartitionSpec(batch_axes, None, None),
            PartitionSpec(batch_axes, None, None),
            state_spec,
        )
    in_specs = specs[:5] + (specs[5:] if state else ())
    y, final = shard_kernel(kernel, partition, in_specs, (specs[0], specs[5]))(
        u, delta, a, b, c, *state
    )
    return y, final


def _kernel_request(u: Array) -> KernelRequest:
    dtype = jnp.dtype(u.dtype)
    return KernelRequest(
        "selective_scan", dtype, functools.partial(_probe, dtype), float32_on_gpu=True
    )


def _probe(dtype: jnp.dtype, target: KernelTarget) -> None:
    """The kernel on ``target`` against the XLA scan, forward and gradients, on a small problem
    of its class: 20 tokens (whole chunks and a tail), 24 channels, 5 state entries (both
    padded), an initial state."""
    from pallas_kernels.selective_scan import selective_scan as pallas_selective_scan

    rng = np.random.default_rng(0)
    u = rng.normal(size=(1, 20, 24)).astype(dtype)
    delta = rng.uniform(0.01, 0.5, size=(1, 20, 24)).astype(np.float32)
    a = -rng.uniform(0.5, 4.0, size=(24, 5)).astype(np.float32)
    b, c = (rng.normal(size=(1, 20, 5)).astype(dtype) for _ in range(2))
    state = rng.normal(size=(1, 24, 5)).astype(np.float32)

    def kernel(u, delta, a, b, c, state):
        return pallas_selective_scan(
            u, delta, a, b, c, state, backend=target.backend, interpret=target.interpret
        )

    def reference(u, delta, a, b, c, state):
        return selective_scan(
            u, delta, a, b, c, initial_state=state, return_state=True, implementation="xla"
        )

    compare_with_reference(kernel, reference, (u, delta, a, b, c, state), dtype.name)


def selective_scan_step(
    u: Float[Array, "B D"],
    delta: Float[Array, "B D"],
    a: Float[Array, "D N"],
    b: Float[Array, "B N"],
    c: Float[Array, "B N"],
    state: Float[Array, "B D N"],
) -> tuple[Float[Array, "B D"], Float[Array, "B D N"]]:
    """One decoding step of :func:`selective_scan`: decay the state by ``exp(delta a)``, add
    ``delta u b^T``, read it with ``c``.

    Returns ``y [B, D]`` (dtype of ``u``) and the new state (dtype of ``state``).
    """
    channels, state_dim = _check_shapes(u, delta, a, b, c, token_axes=1)
    check_shape("state", state, "[B, D, N]", (u.shape[0], channels, state_dim))
    dtype = compute_dtype(u, delta, a, b, c, state)
    y, new_state = _step(*(jnp.asarray(arr, dtype) for arr in (u, delta, a, b, c, state)))
    return y.astype(u.dtype), new_state.astype(state.dtype)
