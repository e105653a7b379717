"""Multi-dimensional damped exponential moving average (MEGA's EMA), chunked, with its one-step
recurrence (docs/mixers/seqboat.md#multi-head-ema).

Per channel ``c`` and EMA dimension ``n`` (``N`` of them), with ``decay = a in (0, 1)``,
``input_scale = b`` and ``output_scale = w``, all ``[D, N]``:

    h_t[c, n] = a[c, n] h_{t-1}[c, n] + b[c, n] x_t[c]          (state ``[B, D, N]``, float32)
    y_t[c]    = sum_n w[c, n] h_t[c, n]

i.e. a causal convolution of ``x`` with the kernel ``k[c, tau] = sum_n w b a^tau``, without any
truncation. The chunked algorithm splits ``T`` into chunks of ``C`` tokens: inside a chunk the
convolution is a ``C x C`` Toeplitz product per channel (built from ``k[c, 0 .. C-1]``), and a
``lax.scan`` over chunks carries the state, read as ``w a^(i+1) h`` by the chunk's token ``i``
and updated as ``a^C h + sum_j a^(C-1-j) b x_j``. Every power of ``a`` has a non-negative
exponent, so nothing overflows. Work ``O(T D (C + N))``, memory ``O(T D + D C^2)``.

On a mesh whose ``sequence`` axis splits time, the EMA from a zero state without chunk states
runs sequence-parallel (:func:`jaxbased.ops.sequence_parallel_scan.ema_sharded`), and so does
:func:`multi_head_ema_with_state` (a prefill's outputs and its state after each row's last
token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.ops.sequence_parallel import sequence_layout


def _powers(log_decay: Array, exponents: Array) -> Array:
    """``a^e`` for ``log_decay [D, N]`` and integer ``exponents [L] >= 0``: ``[D, N, L]``."""
    return jnp.exp(log_decay[..., None] * exponents.astype(log_decay.dtype))


def _check(x: Array, decay: Array, input_scale: Array, output_scale: Array) -> None:
    if x.ndim != 3:
        raise ValueError(f"x must be [batch, seq, channels]; got shape {x.shape}")
    shape = (x.shape[-1], decay.shape[-1])
    for name, value in (
        ("decay", decay),
        ("input_scale", input_scale),
        ("output_scale", output_scale),
    ):
        if value.shape != shape:
            raise ValueError(f"{name} must be [channels, ema_dim]={list(shape)}; got {value.shape}")


def multi_head_ema(
    x: Float[Array, "B T D"],
    decay: Float[Array, "D N"],
    input_scale: Float[Array, "D N"],
    output_scale: Float[Array, "D N"],
    *,
    chunk_size: int = 64,
    initial_state: Float[Array, "B D N"] | None = None,
    return_chunk_states: bool = False,
) -> Float[Array, "B T D"] | tuple[Float[Array, "B T D"], Float[Array, "K B D N"]]:
    """The EMA of the module docstring over ``x [B, T, D]``.

    Args:
      x: the inputs, any float dtype (computed in float32 or wider).
      decay: ``a``, each in ``(0, 1)``.
      input_scale: ``b``.
      output_scale: ``w``.
      chunk_size: tokens per chunk ``C``.
      initial_state: the state before ``x[:, 0]`` (default zeros).
      return_chunk_states: also return the state before each chunk, ``[K, B, D, N]`` for the
        ``K = ceil(T / C)`` chunks (:func:`ema_state_at` reads any token's state from them).

    Returns ``y [B, T, D]`` in ``x.dtype`` (and the chunk states, float32 or wider).
    """
    _check(x, decay, input_scale, output_scale)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    batch, seq, channels = x.shape
    # A time-split mesh: the sequence-parallel form from a zero state (training's forward).
    layout = sequence_layout(batch, seq, 1)
    if layout is not None and initial_state is None and not return_chunk_states:
        from jaxbased.ops.sequence_parallel_scan import ema_sharded

        return ema_sharded(x, decay, input_scale, output_scale, layout, chunk_size=chunk_size)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    log_decay = jnp.log(decay.astype(dtype))
    b, w = input_scale.astype(dtype), output_scale.astype(dtype)
    chunk = min(chunk_size, seq)
    chunks = -(-seq // chunk)
    padded = jnp.pad(x.astype(dtype), ((0, 0), (0, chunks * chunk - seq), (0, 0)))
    blocks = jnp.moveaxis(padded.reshape(batch, chunks, chunk, channels), 1, 0)  # [K, B, C, D]

    offsets = jnp.arange(chunk)
    kernel = jnp.einsum("dn,dnl->dl", w * b, _powers(log_decay, offsets))  # k[c, tau]
    lag = offsets[:, None] - offsets[None, :]
    toeplitz = jnp.where(lag >= 0, kernel[:, jnp.clip(lag, 0, chunk - 1)], 0.0)  # [D, C, C]
    read = w[..., None] * _powers(log_decay, offsets + 1)  # [D, N, C]: token i reads w a^(i+1) h
    write = b[..., None] * _powers(log_decay, chunk - 1 - offsets)  # [D, N, C]
    carry_decay = jnp.exp(log_decay * chunk)  # [D, N]

    def step(state: Array, block: Array) -> tuple[Array, tuple[Array, Array]]:
        y = jnp.einsum("dij,bjd->bid", toeplitz, block) + jnp.einsum("dni,bdn->bid", read, state)
        new_state = carry_decay * state + jnp.einsum("dnj,bjd->bdn", write, block)
        return new_state, (y, state)

    state = (
        jnp.zeros((batch, channels, decay.shape[-1]), dtype)
        if initial_state is None
        else initial_state.astype(dtype)
    )
    _, (ys, starts) = jax.lax.scan(step, state, blocks)
    y = jnp.moveaxis(ys, 0, 1).reshape(batch, chunks * chunk, channels)[:, :seq].astype(x.dtype)
    return (y, starts) if return_chunk_states else y


def ema_state_at(
    x: Float[Array, "B T D"],
    chunk_states: Float[Array, "K B D N"],
    decay: Float[Array, "D N"],
    input_scale: Float[Array, "D N"],
    positions: Int[Array, " B"],
    *,
    chunk_size: int,
) -> Float[Array, "B D N"]:
    """The state ``h_t`` after token ``t = positions[b]`` of each row (``0 <= t < T``), from the
    chunk states of :func:`multi_head_ema` over the same ``x`` and ``chunk_size``: the state
    before ``t``'s chunk, decayed to ``t``, plus that chunk's tokens up to ``t``. Right-padded
    rows take their last valid position: the padding never enters."""
    seq = x.shape[1]
    dtype = chunk_states.dtype
    chunk = min(chunk_size, seq)
    positions = jnp.asarray(positions, jnp.int32)
    index, offset = positions // chunk, positions % chunk
    start = jnp.take_along_axis(
        jnp.moveaxis(chunk_states, 0, 1), index[:, None, None, None], axis=1
    )[:, 0]  # [B, D, N]
    padded = jnp.pad(x.astype(dtype), ((0, 0), (0, (seq // chunk + 1) * chunk - seq), (0, 0)))
    taken = jax.vmap(lambda row, first: jax.lax.dynamic_slice_in_dim(row, first, chunk, 0))(
        padded, index * chunk
    )  # [B, C, D]
    log_decay = jnp.log(decay.astype(dtype))
    lags = offset[:, None] - jnp.arange(chunk)[None, :]  # [B, C]: t - s inside the chunk
    weights = jnp.where(
        (lags >= 0)[:, None, None, :],
        jnp.exp(log_decay[None, ..., None] * jnp.maximum(lags, 0)[:, None, None, :].astype(dtype)),
        0.0,
    )  # [B, D, N, C]
    carried = jnp.exp(log_decay[None] * (offset + 1)[:, None, None].astype(dtype)) * start
    return carried + input_scale.astype(dtype)[None] * jnp.einsum("bdnc,bcd->bdn", weights, taken)


def multi_head_ema_with_state(
    x: Float[Array, "B T D"],
    decay: Float[Array, "D N"],
    input_scale: Float[Array, "D N"],
    output_scale: Float[Array, "D N"],
    positions: Int[Array, " B"],
    *,
    chunk_size: int = 64,
) -> tuple[Float[Array, "B T D"], Float[Array, "B D N"]]:
    """:func:`multi_head_ema` from a zero state and the state after token ``positions[b]`` of
    each row (:func:`ema_state_at`; float32 or wider): a prefill's outputs and decode state. On
    a time-split mesh both come from the sequence-parallel EMA, the state replicated over
    ``sequence`` (:func:`jaxbased.ops.sequence_parallel_scan.ema_sharded`)."""
    _check(x, decay, input_scale, output_scale)
    layout = sequence_layout(x.shape[0], x.shape[1], 1)
    if layout is not None:
        from jaxbased.ops.sequence_parallel_scan import ema_sharded

        return ema_sharded(
            x, decay, input_scale, output_scale, layout, chunk_size=chunk_size,
            state_positions=positions,
        )  # fmt: skip
    y, chunk_states = multi_head_ema(
        x, decay, input_scale, output_scale, chunk_size=chunk_size, return_chunk_states=True
    )
    state = ema_state_at(x, chunk_states, decay, input_scale, positions, chunk_size=chunk_size)
    return y, state


def ema_step(
    x: Float[Array, "B D"],
    state: Float[Array, "B D N"],
    decay: Float[Array, "D N"],
    input_scale: Float[Array, "D N"],
    output_scale: Float[Array, "D N"],
) -> tuple[Float[Array, "B D"], Float[Array, "B D N"]]:
    """One token: ``h = a h + b x``, ``y = sum_n w h``. Returns ``y`` in ``x.dtype`` and the
    new state (the state's dtype)."""
    dtype = state.dtype
    state = decay.astype(dtype) * state + input_scale.astype(dtype) * x.astype(dtype)[..., None]
    y = jnp.einsum("dn,bdn->bd", output_scale.astype(dtype), state)
    return y.astype(x.dtype), state
