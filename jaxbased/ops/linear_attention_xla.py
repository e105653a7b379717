"""The XLA reference algorithms of causal linear attention, on group-major arrays.

:func:`jaxbased.ops.linear_attention` lays its inputs out head-major and grouped before calling
these: queries and keys once per group of heads, ``q, k [B, G, T, F]``; values, outputs, decays
and states per head, split as ``[B, G, R, ...]`` with ``R = H / G`` heads per group (head
``h = g R + r``). Everything per group (the feature maps ``phi(q), phi(k)``, the kernel
matrix ``phi(q) phi(k)^T``, for SSD the ``C . B`` dots) is computed once for the group, never
repeated per head; only what differs per head (the decay weights, the values, the states) is.

The state is a pair ``(kv [B, G, R, D', Dv], z [B, G, R, D'])`` in the compute dtype (per head,
``[B, H, ...]``, for the token-by-token algorithm).

- :func:`quadratic`: the masked ``T x T`` kernel matrix.
- :func:`chunked`: chunks of ``chunk_size`` tokens, intra-chunk kernel matrices and a carried
  state (``lax.scan``); with a decay, ``G`` restarts in every chunk and the intra-chunk weights
  ``exp(G_i - G_j)`` are masked to ``-inf`` above the diagonal before ``exp``.
- :func:`recurrent` and :func:`step`: token by token (decay, add, read), as in decoding; these
  keep the per-head layout ``[B, H, ...]`` of the decode state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxbased.ops.feature_maps import (
    TAYLOR_FEATURE_MAPS,
    get_feature_map,
    taylor_kernel_from_dots,
)

#: ``(kv_state, k_state)``: ``[B, G, R, D', Dv]`` and ``[B, G, R, D']`` for the chunked and
#: quadratic algorithms, ``[B, H, D', Dv]`` and ``[B, H, D']`` for the recurrent one and the step.
State = tuple[Float[Array, "..."], Float[Array, "..."]]


def _decay_weights(log_decay: Array) -> tuple[Array, Array, Array, Array]:
    """Decay factors of one block of steps from its log decays ``[B, G, R, C]`` (all <= 0).

    With ``G_i`` the cumulative sum of log decays inside the block, returns
    ``exp(G_i - G_j)`` for ``j <= i`` (0 above the diagonal) ``[B, G, R, C, C]``, the decay of
    the incoming state at each step ``exp(G_i)`` ``[B, G, R, C]``, each key's decay to the
    block's end ``exp(G_C - G_j)`` ``[B, G, R, C]`` and the block's total decay ``exp(G_C)``
    ``[B, G, R]``. The differences are masked to ``-inf`` above the diagonal before ``exp``:
    every exponent is <= 0.
    """
    size = log_decay.shape[-1]
    cumulative = jnp.cumsum(log_decay, axis=-1)
    differences = cumulative[..., :, None] - cumulative[..., None, :]
    causal = jnp.tril(jnp.ones((size, size), bool))
    pairwise = jnp.exp(jnp.where(causal, differences, -jnp.inf))
    total = cumulative[..., -1]
    return pairwise, jnp.exp(cumulative), jnp.exp(total[..., None] - cumulative), jnp.exp(total)


def _decay_and_add(state: State, decay: Array | None, kv_added: Array, k_added: Array) -> State:
    """``S' = a S + kv_added``, ``z' = a z + k_added``: the state decayed by ``a = decay``
    (``[B, G, R]`` or ``[B, H]``; skipped when None), then the new keys and values added."""
    kv_state, k_state = state
    if decay is not None:
        kv_state = decay[..., None, None] * kv_state
        k_state = decay[..., None] * k_state
    return kv_state + kv_added, k_state + k_added


def _attend_block(kernel, phi_q, phi_k, v, state, eps, log_decay, normalize):
    """Outputs of one block of tokens and the state after it, from its causal kernel matrix.

    ``kernel [B, G, C, C]`` (``phi(q_i) . phi(k_j)`` per group, zero above the diagonal and on
    masked keys), ``phi_q, phi_k [B, G, C, D']``, ``v [B, G, R, C, Dv]``, ``state`` the state
    before the block, ``log_decay`` None or ``[B, G, R, C]``. With a decay the kernel is
    weighted by ``exp(G_i - G_j)`` per head, the state read by query ``i`` by ``exp(G_i)`` and
    key ``j`` enters the new state weighted by ``exp(G_C - G_j)``. Returns
    ``y [B, G, R, C, Dv]`` and the new state.
    """
    kv_state, k_state = state
    if log_decay is None:
        numerator = jnp.einsum("bgij,bgrjd->bgrid", kernel, v)
        numerator = numerator + jnp.einsum("bgif,bgrfd->bgrid", phi_q, kv_state)
        denominator = jnp.sum(kernel, axis=-1)[:, :, None]
        denominator = denominator + jnp.einsum("bgif,bgrf->bgri", phi_q, k_state)
        kv_added = jnp.einsum("bgjf,bgrjd->bgrfd", phi_k, v)
        k_added = jnp.broadcast_to(jnp.sum(phi_k, axis=2)[:, :, None], k_state.shape)
        state_decay = None
    else:
        pairwise, query_decay, key_decay, state_decay = _decay_weights(log_decay)
        weighted = kernel[:, :, None] * pairwise  # [B, G, R, C, C]: per head
        numerator = jnp.einsum("bgrij,bgrjd->bgrid", weighted, v)
        denominator = jnp.sum(weighted, axis=-1)
        denominator = denominator + query_decay * jnp.einsum("bgif,bgrf->bgri", phi_q, k_state)
        k_added = jnp.einsum("bgjf,bgrj->bgrf", phi_k, key_decay)
        # Each head weighs its queries and keys by its own decays: fold the weights into
        # whichever of phi [C, D'] and the values [C, Dv] is narrower (the products are what
        # the backward keeps).
        if phi_k.shape[-1] <= v.shape[-1]:
            read_q = phi_q[:, :, None] * query_decay[..., None]
            numerator = numerator + jnp.einsum("bgrif,bgrfd->bgrid", read_q, kv_state)
            weighted_keys = phi_k[:, :, None] * key_decay[..., None]
            kv_added = jnp.einsum("bgrjf,bgrjd->bgrfd", weighted_keys, v)
        else:
            state_read = jnp.einsum("bgif,bgrfd->bgrid", phi_q, kv_state)
            numerator = numerator + query_decay[..., None] * state_read
            kv_added = jnp.einsum("bgjf,bgrjd->bgrfd", phi_k, key_decay[..., None] * v)
    if normalize:
        numerator = numerator / (denominator + eps)[..., None]
    return numerator, _decay_and_add(state, state_decay, kv_added, k_added)


def quadratic(q, k, v, feature_map, eps, state, log_decay=None, normalize=True):
    """``q, k [B, G, T, F]``, ``v [B, G, R, T, Dv]``, ``log_decay`` None or ``[B, G, R, T]``:
    ``(y [B, G, R, T, Dv], final state)`` from the whole masked ``T x T`` kernel matrix."""
    phi = get_feature_map(feature_map)
    phi_q, phi_k = phi(q), phi(k)
    seq = q.shape[2]
    kernel = jnp.einsum("bgif,bgjf->bgij", phi_q, phi_k)
    kernel = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), kernel, 0.0)
    return _attend_block(kernel, phi_q, phi_k, v, state, eps, log_decay, normalize)


def chunked(q, k, v, feature_map, eps, state, chunk_size, log_decay=None, normalize=True):
    """Like :func:`quadratic`, in chunks of ``chunk_size`` tokens carried by ``lax.scan`` (any
    ``T``; the tail chunk is padded and its padding masked)."""
    batch, groups, seq, feature_dim = q.shape
    heads_per_group = v.shape[2]
    num_chunks = -(-seq // chunk_size)
    padded = num_chunks * chunk_size

    def pad_tokens(x: Array, axis: int) -> Array:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, padded - seq)
        return jnp.pad(x, widths)

    def to_chunks(x: Array, axis: int) -> Array:  # token axis -> [N, ..., C, ...]
        x = pad_tokens(x, axis)
        x = x.reshape(*x.shape[:axis], num_chunks, chunk_size, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    valid = (jnp.arange(padded) < seq).reshape(num_chunks, chunk_size)
    chunked_decay = ()
    if log_decay is not None:
        # Padded steps do not decay (log decay 0), so the final state is that of the last token.
        chunked_decay = (to_chunks(log_decay, 3),)

    phi = get_feature_map(feature_map)
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    use_raw_dots = feature_map in TAYLOR_FEATURE_MAPS

    def step(carry: State, chunk):
        q_c, k_c, v_c, valid_c, *log_decay_c = chunk
        phi_q = phi(q_c)
        phi_k = phi(k_c) * valid_c[:, None].astype(q_c.dtype)
        if use_raw_dots:
            dots = jnp.einsum("bgif,bgjf->bgij", q_c, k_c)
            kernel = taylor_kernel_from_dots(dots, feature_dim)
        else:
            kernel = jnp.einsum("bgif,bgjf->bgij", phi_q, phi_k)
        kernel = jnp.where(causal & valid_c[None, :], kernel, 0.0)
        chunk_log_decay = log_decay_c[0] if log_decay_c else None
        out, new_carry = _attend_block(
            kernel, phi_q, phi_k, v_c, carry, eps, chunk_log_decay, normalize
        )
        return new_carry, out

    if log_decay is not None:
        # Every head has its own decay weights exp(G_i - G_j) [C, C] per chunk: the backward
        # recomputes each chunk instead of keeping them for all chunks and heads.
        step = jax.checkpoint(step)
    chunks = (to_chunks(q, 2), to_chunks(k, 2), to_chunks(v, 3), valid, *chunked_decay)
    final, out = jax.lax.scan(step, state, chunks)  # out [N, B, G, R, C, Dv]
    out = jnp.moveaxis(out, 0, 3).reshape(batch, groups, heads_per_group, padded, v.shape[-1])
    return out[:, :, :, :seq], final


def recurrent(q, k, v, feature_map, eps, state, log_decay=None, normalize=True):
    """Token by token (:func:`step` under ``lax.scan``), in the per-head layout of
    :func:`step`: ``q, k [B, G, T, F]``, ``v [B, H, T, Dv]``, the state ``[B, H, ...]``,
    ``log_decay`` None or ``[B, H, T]``; returns ``y [B, H, T, Dv]`` and the final state."""

    def scan_step(carry: State, token):
        q_t, k_t, v_t, *log_decay_t = token
        decay = jnp.exp(log_decay_t[0]) if log_decay_t else None
        out, new_carry = step(q_t, k_t, v_t, carry, feature_map, eps, decay, normalize)
        return new_carry, out

    tokens = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v))
    if log_decay is not None:
        tokens = (*tokens, jnp.moveaxis(log_decay, 2, 0))
    final, out = jax.lax.scan(scan_step, state, tokens)
    return jnp.moveaxis(out, 0, 2), final


def step(q_t, k_t, v_t, state, feature_map, eps, decay=None, normalize=True):
    """One token: ``q_t, k_t [B, G, F]``, ``v_t [B, H, Dv]``, the state
    ``(kv [B, H, D', Dv], z [B, H, D'])`` (per head: this is the decode step, whose state
    layout must not change), ``decay`` None or ``a_t [B, H]``. Decays the state, adds the token,
    then reads it: ``(y_t [B, H, Dv], new state)``. The token's group features are broadcast to
    the group's heads (``[B, H, D']``, small next to the state)."""
    phi = get_feature_map(feature_map)
    phi_q, phi_k = phi(q_t), phi(k_t)
    heads_per_group = v_t.shape[1] // q_t.shape[1]
    if heads_per_group > 1:
        phi_q, phi_k = (jnp.repeat(x, heads_per_group, axis=1) for x in (phi_q, phi_k))
    kv_state, k_state = _decay_and_add(state, decay, phi_k[..., :, None] * v_t[..., None, :], phi_k)
    numerator = jnp.einsum("bhf,bhfd->bhd", phi_q, kv_state)
    if not normalize:
        return numerator, (kv_state, k_state)
    denominator = jnp.einsum("bhf,bhf->bh", phi_q, k_state)
    return numerator / (denominator + eps)[..., None], (kv_state, k_state)
