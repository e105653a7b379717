"""The per-chunk math of the selective-scan kernels on loaded tiles, shared by TPU and GPU.

The state of one batch row and block of ``BD`` channels is ``h [Np, BD]`` float32: the ``N``
state entries on sublanes (rows), channels on lanes, so that a token's ``delta_t, u_t``
``[1, BD]`` are rows of their ``[T, D]`` arrays and only ``b_t, c_t`` (``[1, Np]`` rows) turn
into columns (:func:`pallas_kernels._common.row_to_column`). Per token

    decay_t = exp(delta_t * a^T)                 [Np, BD]
    h_t = decay_t * h_{t-1} + b_t^T (delta_t * u_t)
    y_t = sum_n h_t[n, :] c_t[n]                 [1, BD]

and backward, with ``dh`` the cotangent of ``h_t`` (later tokens and the final state):

    dh += c_t^T dy_t;   dc_t = sum_d h_t dy_t;   dw = sum_n dh b_t^T   (w_t = delta_t u_t)
    db_t = sum_d dh w_t;   g = dh * h_{t-1} * decay_t;   d delta_t = sum_n g a^T + dw u_t
    da^T += g delta_t;   du_t = dw delta_t;   dh <- dh * decay_t   (the cotangent of h_{t-1})

A chunk's tokens are unrolled (``C`` is static); its rows are read and written through
callbacks, so that each backend loads them its own way (TPU: slices of the chunk's blocks;
GPU: rows of the whole sequence at the chunk's offset). The backward replays the chunk forward
from its first state (a checkpoint the forward wrote) and keeps its ``C + 1`` states on chip.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels._common import column_to_row, row_to_column

#: ``read(name, t)``: row ``t`` of the chunk of input ``name`` (``u``, ``delta``, ``b``, ``c``,
#: ``dy``) as a ``[1, X]`` value.
Read = Callable[[str, int], jax.Array]
#: ``write(name, t, row)``: store ``row [1, X]`` as row ``t`` of output ``name``.
Write = Callable[[str, int, jax.Array], None]


def _token_inputs(read: Read, t: int, a_t: jax.Array):
    u = read("u", t).astype(jnp.float32)
    delta = read("delta", t).astype(jnp.float32)
    b = row_to_column(read("b", t).astype(jnp.float32))
    return u, delta, b, jnp.exp(delta * a_t)


def chunk_forward(h: jax.Array, a_t: jax.Array, chunk_size: int, read: Read, write: Write):
    """Scan one chunk: ``h [Np, BD]`` before it, ``a_t [Np, BD]`` (``a`` transposed); writes
    ``y`` rows and returns ``h`` after the chunk."""
    for t in range(chunk_size):
        u, delta, b, decay = _token_inputs(read, t, a_t)
        h = decay * h + b * (delta * u)
        c = row_to_column(read("c", t).astype(jnp.float32))
        write("y", t, jnp.sum(h * c, axis=0, keepdims=True))
    return h


def chunk_backward(
    h_start: jax.Array,
    dh: jax.Array,
    da_t: jax.Array,
    a_t: jax.Array,
    chunk_size: int,
    read: Read,
    write: Write,
) -> tuple[jax.Array, jax.Array]:
    """One chunk of the reverse scan.

    ``h_start [Np, BD]``: the state before the chunk (the forward's checkpoint); ``dh``: the
    cotangent of the state after it; ``da_t [Np, BD]``: the running cotangent of ``a^T``.
    Writes the ``du``, ``ddelta`` ``[1, BD]`` and ``db``, ``dc`` ``[1, Np]`` rows (``db, dc``
    are this channel block's share, summed over blocks by the caller). Returns ``(dh, da_t)``
    before the chunk.
    """
    states, inputs = [h_start], []
    for t in range(chunk_size):  # replay the chunk, keeping its states
        u, delta, b, decay = _token_inputs(read, t, a_t)
        inputs.append((u, delta, b, decay))
        states.append(decay * states[-1] + b * (delta * u))
    for t in reversed(range(chunk_size)):
        u, delta, b, decay = inputs[t]
        dy = read("dy", t).astype(jnp.float32)
        c = row_to_column(read("c", t).astype(jnp.float32))
        dh = dh + c * dy
        write("dc", t, column_to_row(jnp.sum(states[t + 1] * dy, axis=1, keepdims=True)))
        dw = jnp.sum(dh * b, axis=0, keepdims=True)
        write("db", t, column_to_row(jnp.sum(dh * (delta * u), axis=1, keepdims=True)))
        scaled = dh * states[t] * decay
        write("ddelta", t, jnp.sum(scaled * a_t, axis=0, keepdims=True) + dw * u)
        write("du", t, dw * delta)
        da_t = da_t + scaled * delta
        dh = dh * decay
    return dh, da_t
