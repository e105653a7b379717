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

All arithmetic is in float32 (float64 under x64); ``y`` has the dtype of ``u``; states are
``[B, D, N]`` float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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

    Returns:
      ``y [B, T, D]`` in ``u.dtype``, and the final state ``[B, D, N]`` (float32) when
      ``return_state`` is set. Values of ``a`` and ``delta`` are checked when concrete.
    """
    check_algorithm(algorithm, ALGORITHMS)
    check_chunk_size(chunk_size)
    channels, state_dim = _check_shapes(u, delta, a, b, c, token_axes=2)
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
