"""SSD, the state-space scan of Mamba-2 (docs/mixers/mamba2.md): a scalar decay per head and step.

Per batch and head, with a state ``h [P, N]``:

    h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t^T,    y_t = h_t c_t

``x [B, T, H, P]``, ``dt [B, T, H]`` (already positive: the layer applies softplus and the bias),
``a [H]`` (negative: ``-exp(A_log)``), ``b, c [B, T, G, N]`` shared by groups of heads (head ``h``
reads group ``h // (H // G)``). The ``D`` skip term and the gate belong to the layer.

Two algorithms compute the same function:

- ``chunked``: SSD is decayed linear attention with the identity feature map and no normalizer,
  ``q = c``, ``k = b``, ``v = dt x``, ``log_decay = dt a``, with one query/key group per
  ``b, c`` group; this calls :func:`jaxbased.ops.linear_attention` (the chunked scan that BASED
  and decay attention use), with its numerically stable segment sums, on the XLA path or the
  Pallas kernel (``implementation``). Either reads ``b`` and ``c`` by group: the ``C . B`` dots
  of a chunk are computed once per group, never repeated per head. Any length works (the tail
  is masked).
- ``recurrent``: ``lax.scan`` token by token, as in decoding.

All arithmetic is in float32 (float64 under x64); ``y`` has the dtype of ``x``; states are
``[B, H, P, N]`` float32. When ``x``, ``b`` and ``c`` share one low-precision dtype (a
bfloat16 or float16 model), ``dt x`` is rounded to it and the chunked scan gets ``c, b, dt x``
in that dtype, so that a kernel multiplies low-precision operands (accumulating in float32).
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
from jaxbased.ops.dispatch import check_implementation, kernel_backend
from jaxbased.ops.linear_attention import LinearAttentionState, linear_attention

ALGORITHMS: tuple[str, ...] = ("chunked", "recurrent")


def _check_shapes(x, dt, a, b, c, token_axes: int) -> tuple[int, int, int, int]:
    """Validate shapes; returns ``(heads, head_dim, groups, state_dim)``.

    ``token_axes`` is 2 for sequences (``[B, T, ...]``) and 1 for one step (``[B, ...]``).
    """
    lead = "[B, T, " if token_axes == 2 else "[B, "
    if x.ndim != token_axes + 2:
        raise ValueError(f"x must be {lead}H, P]; got shape {x.shape}")
    heads, head_dim = x.shape[-2:]
    if dt.shape != x.shape[:-1]:
        raise ValueError(f"dt must be {lead}H] = {x.shape[:-1]}; got shape {dt.shape}")
    if a.shape != (heads,):
        raise ValueError(f"a must be [H] = ({heads},); got shape {a.shape}")
    if b.ndim != token_axes + 2 or b.shape[:token_axes] != x.shape[:token_axes]:
        raise ValueError(
            f"b must be {lead}G, N] with leading dims {x.shape[:token_axes]}; got shape {b.shape}"
        )
    if c.shape != b.shape:
        raise ValueError(f"c must have the shape of b {b.shape}; got shape {c.shape}")
    groups, state_dim = b.shape[-2:]
    if heads % groups:
        raise ValueError(f"b and c have {groups} groups, which must divide the {heads} heads of x")
    check_not_positive("a", a)
    check_not_negative("dt", dt)
    return heads, head_dim, groups, state_dim


def _default_kernel_chunk_size() -> int:
    from pallas_kernels.linear_attention import DEFAULT_CHUNK_SIZE

    return DEFAULT_CHUNK_SIZE[kernel_backend()[0]]


def _operand_dtype(x: Array, b: Array, c: Array, dtype: jnp.dtype) -> jnp.dtype:
    """``x``'s dtype when ``x, b, c`` share one low-precision float dtype, else ``dtype``."""
    low = {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}
    if jnp.dtype(x.dtype) in low and x.dtype == b.dtype == c.dtype:
        return jnp.dtype(x.dtype)
    return dtype


def _step(x_t, dt_t, a, b_t, c_t, state):
    # x_t [B, H, P], dt_t [B, H], a [H], b_t, c_t [B, G, N] (read by group), state
    # [B, H, P, N]: heads split as [B, G, H / G, ...].
    batch, heads, head_dim = x_t.shape
    groups = b_t.shape[1]
    grouped = (batch, groups, heads // groups)
    decay = jnp.exp(dt_t * a).reshape(grouped)
    inputs = (dt_t[..., None] * x_t).reshape(*grouped, head_dim)
    state = state.reshape(*grouped, *state.shape[2:])
    state = decay[..., None, None] * state + inputs[..., None] * b_t[:, :, None, None, :]
    y = jnp.einsum("bgrpn,bgn->bgrp", state, c_t)
    return y.reshape(x_t.shape), state.reshape(batch, heads, *state.shape[3:])


def ssd(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    a: Float[Array, " H"],
    b: Float[Array, "B T G N"],
    c: Float[Array, "B T G N"],
    *,
    chunk_size: int = 256,
    algorithm: str = "chunked",
    initial_state: Float[Array, "B H P N"] | None = None,
    return_state: bool = False,
    implementation: str = "auto",
    kernel_chunk_size: int | None = None,
) -> Float[Array, "B T H P"] | tuple[Float[Array, "B T H P"], Float[Array, "B H P N"]]:
    """Mamba-2's scan ``h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t^T``, ``y_t = h_t c_t``.

    Args:
      x: ``[B, T, H, P]`` inputs (heads of ``P`` channels).
      dt: ``[B, T, H]`` step sizes, >= 0 (after softplus).
      a: ``[H]`` per-head rates, <= 0 (``-exp(A_log)``).
      b: ``[B, T, G, N]`` input projection; ``G`` divides ``H``.
      c: ``[B, T, G, N]`` output projection.
      chunk_size: tokens per chunk of the ``chunked`` algorithm.
      algorithm: ``chunked`` (default; the decayed linear-attention scan) or ``recurrent``.
      initial_state: ``[B, H, P, N]`` state to continue from.
      return_state: also return the state after the last token.
      implementation: who computes the ``chunked`` algorithm: ``auto``, ``xla`` or ``pallas``
        (the linear-attention kernel with the identity map; see
        :func:`jaxbased.ops.linear_attention`). ``recurrent`` is always XLA.
      kernel_chunk_size: the kernel's chunk (None: its default for the platform, 64 on TPU
        and 16 on GPU, where Mamba-2's ``N = 128`` state compiles without register spills;
        ``chunk_size`` tiles the XLA scan).

    Returns:
      ``y [B, T, H, P]`` in ``x.dtype``, and the final state ``[B, H, P, N]`` (float32) when
      ``return_state`` is set. Values of ``a`` and ``dt`` are checked when concrete.
    """
    check_algorithm(algorithm, ALGORITHMS)
    check_implementation(implementation)
    check_chunk_size(chunk_size)
    heads, head_dim, _, state_dim = _check_shapes(x, dt, a, b, c, token_axes=2)
    batch = x.shape[0]
    dtype = compute_dtype(x, dt, a, b, c)
    state = initial_state_or_zeros(
        initial_state, "[B, H, P, N]", (batch, heads, head_dim, state_dim), dtype
    )
    x_, dt_, a_ = (jnp.asarray(arr, dtype) for arr in (x, dt, a))

    if algorithm == "chunked":
        # The linear-attention state is [B, H, N, P] (keys x values); ours is [B, H, P, N].
        # From a zero state none is passed: that form (training's forward, and a prefill
        # returning its state) also runs sequence-parallel on a time-split mesh.
        stateless = initial_state is None and not return_state
        carried = (
            None
            if initial_state is None
            else LinearAttentionState(
                jnp.swapaxes(state, -1, -2), jnp.zeros((batch, heads, state_dim), dtype)
            )
        )
        operand_dtype = _operand_dtype(x, b, c, dtype)
        attended = linear_attention(
            jnp.asarray(c, operand_dtype),
            jnp.asarray(b, operand_dtype),
            (dt_[..., None] * x_).astype(operand_dtype),
            feature_map="identity",
            chunk_size=chunk_size,
            initial_state=carried,
            return_state=not stateless,
            implementation=implementation,
            log_decay=dt_ * a_,
            normalize=False,
            kernel_chunk_size=kernel_chunk_size or _default_kernel_chunk_size(),
        )
        if stateless:
            y, final_state = attended, None
        else:
            y, final = attended
            final_state = jnp.swapaxes(final.kv_state, -1, -2)
    else:

        def step(carry, token):
            y_t, carry = _step(*token[:2], a_, *token[2:], carry)
            return carry, y_t

        b_, c_ = (jnp.asarray(arr, dtype) for arr in (b, c))
        tokens = tuple(jnp.moveaxis(arr, 1, 0) for arr in (x_, dt_, b_, c_))
        final_state, y = jax.lax.scan(step, state, tokens)
        y = jnp.moveaxis(y, 0, 1)
    y = y.astype(x.dtype)
    return (y, final_state) if return_state else y


def ssd_step(
    x: Float[Array, "B H P"],
    dt: Float[Array, "B H"],
    a: Float[Array, " H"],
    b: Float[Array, "B G N"],
    c: Float[Array, "B G N"],
    state: Float[Array, "B H P N"],
) -> tuple[Float[Array, "B H P"], Float[Array, "B H P N"]]:
    """One decoding step of :func:`ssd`: decay the state, add ``dt x b^T``, read it with ``c``.

    Returns ``y [B, H, P]`` (dtype of ``x``) and the new state (dtype of ``state``).
    """
    heads, head_dim, _, state_dim = _check_shapes(x, dt, a, b, c, token_axes=1)
    check_shape("state", state, "[B, H, P, N]", (x.shape[0], heads, head_dim, state_dim))
    dtype = compute_dtype(x, dt, a, b, c, state)
    y, new_state = _step(
        x.astype(dtype),
        dt.astype(dtype),
        a.astype(dtype),
        b.astype(dtype),
        c.astype(dtype),
        state.astype(dtype),
    )
    return y.astype(x.dtype), new_state.astype(state.dtype)
