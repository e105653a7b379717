"""One selective-scan kernel call: its static parameters and the kernels' array layouts.

Kernel layout (both backends): batch-major token rows, channels on lanes:
``u, delta [B, T_pad, Dp]``, ``b, c [B, T_pad, Np]``, ``a^T [Np, Dp]`` float32, states
``[B, Np, Dp]`` float32 (``[B, D, N]`` transposed), and the forward's checkpoints, the state
before every chunk, ``[B, N_chunks * Np, Dp]`` float32. Padding is exact: padded tokens have
``delta = u = b = c = 0`` (no decay, no input, no read), padded channels and state entries
``a = 0`` and zero inputs, so they stay zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels._common import pad_axis


@dataclasses.dataclass(frozen=True)
class ScanCall:
    """Compile-time parameters of one call.

    Attributes:
      seq_len: ``T``; chunk_size: ``C`` (tokens unrolled per step); num_chunks: ``ceil(T / C)``.
      channels: ``D``; padded_channels: ``Dp``; channel_block: ``BD`` channels per program.
      state_dim: ``N``; padded_state: ``Np``.
      has_initial_state: whether the call has an initial state.
      interpret: False, True, or a ``pltpu.InterpretParams`` (TPU).
      num_warps: Triton warps per program (GPU).
    """

    seq_len: int
    chunk_size: int
    num_chunks: int
    channels: int
    padded_channels: int
    channel_block: int
    state_dim: int
    padded_state: int
    has_initial_state: bool
    interpret: Any
    num_warps: int = 4

    @property
    def padded_seq(self) -> int:
        return self.num_chunks * self.chunk_size

    @property
    def channel_blocks(self) -> int:
        return self.padded_channels // self.channel_block

    def tokens_to_kernel(self, x: jax.Array, width: int) -> jax.Array:
        """``[B, T, X] -> [B, T_pad, width]`` zero padded (dtype kept)."""
        return pad_axis(pad_axis(x, 1, self.padded_seq), 2, width)

    def tokens_from_kernel(self, x: jax.Array, width: int, dtype) -> jax.Array:
        """``[B, T_pad, X_pad] -> [B, T, width]`` in ``dtype``."""
        return x[:, : self.seq_len, :width].astype(dtype)

    def a_to_kernel(self, a: jax.Array) -> jax.Array:
        """``a [D, N] -> a^T [Np, Dp]`` float32."""
        padded = pad_axis(a.astype(jnp.float32), 0, self.padded_channels)
        return jnp.swapaxes(pad_axis(padded, 1, self.padded_state), 0, 1)

    def state_to_kernel(self, state: jax.Array) -> jax.Array:
        """``[B, D, N] -> [B, Np, Dp]`` float32."""
        state = jnp.swapaxes(state.astype(jnp.float32), 1, 2)
        return pad_axis(pad_axis(state, 1, self.padded_state), 2, self.padded_channels)

    def state_from_kernel(self, state: jax.Array) -> jax.Array:
        """``[B, Np, Dp] -> [B, D, N]``."""
        return jnp.swapaxes(state[:, : self.state_dim, : self.channels], 1, 2)


class Residuals(NamedTuple):
    """What the forward keeps for the backward kernel (kernel layouts): the padded inputs,
    ``a^T``, and the state before every chunk."""

    u: jax.Array
    delta: jax.Array
    b: jax.Array
    c: jax.Array
    a_t: jax.Array
    checkpoints: jax.Array
