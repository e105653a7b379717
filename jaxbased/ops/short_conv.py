"""Depthwise causal convolution over time (BaseConv's short conv, docs/mixers/base_conv.md).

    y[t, c] = sum_{j=0}^{K-1} weight[j, c] * x[t - K + 1 + j, c]      (x[<0] = 0, or the state)

The last tap multiplies the current token. ``weight [K, C]`` is the reference's Conv1d weight
``[C, 1, K]`` transposed. The decode state is the last ``K - 1`` raw inputs, oldest first.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.ops.sequence_parallel import sequence_layout, short_conv_sharded


def _check_weight(weight: Array, channels: int) -> int:
    if weight.ndim != 2 or weight.shape[1] != channels:
        raise ValueError(f"weight must be [kernel_size, {channels}]; got {weight.shape}")
    return weight.shape[0]


def init_short_conv_state(
    batch_size: int, kernel_size: int, channels: int, dtype=jnp.float32
) -> Float[Array, "B K1 C"]:
    """Zeros ``[B, K - 1, C]``: no inputs seen yet."""
    if kernel_size < 1:
        raise ValueError(f"kernel_size={kernel_size} must be >= 1")
    return jnp.zeros((batch_size, kernel_size - 1, channels), dtype)


def short_conv(
    x: Float[Array, "B T C"],
    weight: Float[Array, "K C"],
    *,
    initial_state: Float[Array, "B K1 C"] | None = None,
    return_state: bool = False,
    lengths: Int[Array, " B"] | None = None,
) -> Float[Array, "B T C"] | tuple[Float[Array, "B T C"], Float[Array, "B K1 C"]]:
    """Causal depthwise convolution of ``x [B, T, C]`` with ``weight [K, C]``.

    Args:
      initial_state: the ``K - 1`` inputs before ``x[:, 0]`` (default zeros).
      return_state: also return the last ``K - 1`` inputs (for decoding after a prefill).
      lengths: ``[B]`` int, valid tokens per row of a right-padded batch (default ``T``): the
        returned state is then the ``K - 1`` inputs before ``x[b, lengths[b]]``. Outputs at valid
        positions never see the padding (the conv is causal).

    Returns ``y [B, T, C]`` in ``x.dtype`` (accumulated in float32), and the state if asked.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be [batch, seq, channels]; got {x.shape}")
    batch, seq, channels = x.shape
    kernel_size = _check_weight(weight, channels)
    layout = sequence_layout(batch, seq, channels)
    if layout is not None and initial_state is None:
        return short_conv_sharded(x, weight, layout, return_state=return_state, lengths=lengths)
    if initial_state is None:
        initial_state = init_short_conv_state(batch, kernel_size, channels, x.dtype)
    elif initial_state.shape != (batch, kernel_size - 1, channels):
        raise ValueError(
            f"initial_state must be {(batch, kernel_size - 1, channels)}; got {initial_state.shape}"
        )
    dtype = jnp.result_type(jnp.float32, x.dtype, weight.dtype)
    padded = jnp.concatenate([initial_state.astype(x.dtype), x], axis=1).astype(dtype)
    w = weight.astype(dtype)
    y = sum(w[j] * padded[:, j : j + seq] for j in range(kernel_size))
    y = jnp.asarray(y).astype(x.dtype)
    if not return_state:
        return y
    if lengths is None:
        state = padded[:, seq:]
    else:
        # Row b's last K-1 inputs x[b, len-K+1 .. len-1] sit at padded[b, len .. len+K-2].
        index = jnp.asarray(lengths, jnp.int32)[:, None] + jnp.arange(kernel_size - 1)
        state = jnp.take_along_axis(padded, index[:, :, None], axis=1)
    return y, state.astype(initial_state.dtype)


def short_conv_step(
    x: Float[Array, "B C"],
    state: Float[Array, "B K1 C"],
    weight: Float[Array, "K C"],
) -> tuple[Float[Array, "B C"], Float[Array, "B K1 C"]]:
    """One decoding step: ``y = sum_j weight[j] * [state, x][j]``; the oldest input is dropped."""
    if x.ndim != 2:
        raise ValueError(f"x must be [batch, channels]; got {x.shape}")
    kernel_size = _check_weight(weight, x.shape[1])
    if state.shape != (x.shape[0], kernel_size - 1, x.shape[1]):
        raise ValueError(
            f"state must be {(x.shape[0], kernel_size - 1, x.shape[1])}; got {state.shape}"
        )
    dtype = jnp.result_type(jnp.float32, x.dtype, weight.dtype)
    window = jnp.concatenate([state.astype(dtype), x[:, None, :].astype(dtype)], axis=1)
    y = jnp.sum(window * weight.astype(dtype)[None], axis=1)
    return y.astype(x.dtype), window[:, 1:].astype(state.dtype)
