"""Causal linear attention with a feature map and the BASED normalizer (docs/mixers/based.md).

    y_i = sum_{j<=i} K(q_i, k_j) v_j / (sum_{j<=i} K(q_i, k_j) + eps),   K(q, k) = phi(q) . phi(k)

With an optional decay ``a_t = exp(log_decay_t)`` (fixed per head, or per step and head, as in
RetNet / Lightning Attention and SSD), per batch and head:

    S_t = a_t S_{t-1} + phi(k_t) v_t^T,   z_t = a_t z_{t-1} + phi(k_t),
    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)     (or phi(q_t)^T S_t with normalize=False)

so that ``K_ij`` is weighted by ``exp(G_i - G_j)`` with ``G`` the cumulative sum of log decays.

Three algorithms compute the same function:

- ``quadratic``: the masked ``T x T`` kernel matrix; O(T^2) time and memory.
- ``chunked``: chunks of ``chunk_size`` tokens; inside a chunk the kernel comes from raw
  ``F``-dimensional dots (``1 + s + s^2/2`` for the Taylor maps), across chunks an fp32 state of
  expanded features ``S = sum phi(k) ⊗ v`` and ``z = sum phi(k)`` is carried by ``lax.scan``;
  O(T) time and memory. With a decay, ``G`` restarts in every chunk; the intra-chunk weights
  ``exp(G_i - G_j)`` are masked to ``-inf`` above the diagonal before ``exp`` (so ``exp`` only
  sees non-positive numbers), the carried state is decayed by the chunk's total decay and keys
  are weighted by their decay to the chunk's end.
- ``recurrent``: the state updated token by token (add the token, then read), as in decoding.

``implementation`` picks who computes the chunked algorithm (see :mod:`jaxbased.ops.dispatch`):
the XLA ``lax.scan`` here, or the fused Pallas kernel of ``pallas_kernels.linear_attention``
(every feature map; its features and state stay on chip).

Arrays are batch-major: ``q, k [B, T, H, F]``, ``v [B, T, H, Dv]``. All arithmetic is in float32
(or float64 under x64); the output has the dtype of ``v``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from jaxbased.ops import linear_attention_xla as xla
from jaxbased.ops._common import (
    check_algorithm,
    check_chunk_size,
    check_not_positive,
    compute_dtype,
)
from jaxbased.ops.dispatch import (
    KernelRequest,
    KernelTarget,
    check_implementation,
    head_spec,
    kernel_backend,
    mesh_partition,
    shard_kernel,
    token_spec,
    use_pallas,
)
from jaxbased.ops.feature_maps import (
    check_feature_map,
    expanded_dim,
    feature_dim_of,
    get_feature_map,
)
from jaxbased.ops.kernel_check import compare_with_reference
from jaxbased.ops.sequence_parallel import (
    check_sequence_implementation,
    linear_attention_sharded,
    sequence_layout,
)

ALGORITHMS: tuple[str, ...] = ("chunked", "quadratic", "recurrent")
DEFAULT_EPS = 1e-12


class LinearAttentionState(NamedTuple):
    """Recurrent state of causal linear attention, float32.

    kv_state: ``[B, H, D', Dv]``, the sum of ``phi(k_j) ⊗ v_j``.
    k_state: ``[B, H, D']``, the sum of ``phi(k_j)`` (the normalizer).
    """

    kv_state: Float[Array, "B H D Dv"]
    k_state: Float[Array, "B H D"]


def init_linear_attention_state(
    batch_size: int, num_heads: int, expanded_dim: int, value_dim: int, dtype=jnp.float32
) -> LinearAttentionState:
    """An all-zero state (nothing seen yet)."""
    return LinearAttentionState(
        kv_state=jnp.zeros((batch_size, num_heads, expanded_dim, value_dim), dtype),
        k_state=jnp.zeros((batch_size, num_heads, expanded_dim), dtype),
    )


def _check_inputs(q: Array, k: Array, v: Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "q, k, v must be [batch, seq, heads, dim]; got shapes "
            f"q={q.shape}, k={k.shape}, v={v.shape}"
        )
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape; got q={q.shape}, k={k.shape}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must share batch and seq with q; got q={q.shape}, v={v.shape}")
    if v.shape[2] % q.shape[2]:
        raise ValueError(
            f"q and k have {q.shape[2]} groups, which must divide the {v.shape[2]} heads of v; "
            f"got q={q.shape}, v={v.shape}"
        )


def _grouped(x: Array, groups: int) -> Array:
    """``[B, H, ...] -> [B, G, H / G, ...]`` (head ``h = g (H / G) + r``)."""
    return x.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])


def _ungrouped(x: Array) -> Array:
    """The inverse of :func:`_grouped`."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def discount_padding(
    state: LinearAttentionState, pad_counts: Int[Array, " B"], feature_map: str
) -> LinearAttentionState:
    """The state of right-padded prompts with the padding's share of the normalizer removed.

    Right padding enters the scan with ``k = v = 0`` (and no decay): each pad token adds
    ``phi(0) ⊗ 0 = 0`` to ``kv_state`` but ``phi(0)`` to ``k_state`` (``[1, 0, …, 0]`` for the
    Taylor maps, ones for ``elu``, zeros for ``relu`` and ``identity``). This returns

        kv_state,  k_state - pad_counts[:, None, None] * phi(0)

    with ``phi(0)`` the feature map of a zero vector of the state's input size ``F`` (inferred
    from its ``D'`` features), in the state's dtype: the state of the valid tokens alone.

    Args:
      state: ``kv_state [B, H, D', Dv]``, ``k_state [B, H, D']`` after the padded prompts.
      pad_counts: ``[B]`` pad tokens per row (any numeric dtype; cast to the state's).
      feature_map: the map that built the state (one of ``FEATURE_MAP_NAMES``).

    Returns:
      The :class:`LinearAttentionState` with the same shapes and dtypes; ``kv_state`` is
      returned as is.
    """
    check_feature_map(feature_map)
    dtype = state.k_state.dtype
    feature_dim = feature_dim_of(feature_map, state.k_state.shape[-1])
    phi_zero = get_feature_map(feature_map)(jnp.zeros((feature_dim,), dtype))
    pads = jnp.asarray(pad_counts).astype(dtype)
    return LinearAttentionState(state.kv_state, state.k_state - pads[:, None, None] * phi_zero)


def _state_or_zeros(
    state: LinearAttentionState | None,
    batch: int,
    heads: int,
    expanded: int,
    value_dim: int,
    dtype: jnp.dtype,
) -> LinearAttentionState:
    if state is None:
        return init_linear_attention_state(batch, heads, expanded, value_dim, dtype)
    expected_kv = (batch, heads, expanded, value_dim)
    if state.kv_state.shape != expected_kv or state.k_state.shape != expected_kv[:3]:
        raise ValueError(
            f"initial_state has kv_state {state.kv_state.shape} and k_state "
            f"{state.k_state.shape}; expected {expected_kv} and {expected_kv[:3]}"
        )
    return LinearAttentionState(state.kv_state.astype(dtype), state.k_state.astype(dtype))


def _check_log_decay(log_decay: Array, allowed: dict[str, tuple[int, ...]]) -> Array:
    log_decay = jnp.asarray(log_decay)
    if log_decay.shape not in allowed.values():
        choices = " or ".join(f"{name}={shape}" for name, shape in allowed.items())
        raise ValueError(f"log_decay has shape {log_decay.shape}; allowed: {choices}")
    if not jnp.issubdtype(log_decay.dtype, jnp.floating):
        raise ValueError(f"log_decay must be floating point; got dtype {log_decay.dtype}")
    check_not_positive("log_decay", log_decay)
    return log_decay


def linear_attention(
    q: Float[Array, "B T G F"],
    k: Float[Array, "B T G F"],
    v: Float[Array, "B T H Dv"],
    *,
    feature_map: str = "taylor",
    algorithm: str = "chunked",
    chunk_size: int = 64,
    eps: float = DEFAULT_EPS,
    initial_state: LinearAttentionState | None = None,
    return_state: bool = False,
    implementation: str = "auto",
    log_decay: Float[Array, " H"] | Float[Array, "B T H"] | None = None,
    normalize: bool = True,
    kernel_chunk_size: int | None = None,
) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], LinearAttentionState]:
    """Causal linear attention ``y_i = sum_{j<=i} K_ij v_j / (sum_{j<=i} K_ij + eps)``.

    With ``log_decay``, ``K_ij`` is weighted by ``a_{j+1} ... a_i`` (``a_t = exp(log_decay_t)``):
    ``S_t = a_t S_{t-1} + phi(k_t) v_t^T``, ``z_t = a_t z_{t-1} + phi(k_t)``,
    ``y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)``; the initial state decays too.

    Args:
      q: ``[B, T, G, F]`` queries before the feature map, one per group of heads: ``G``
        divides ``H`` and head ``h`` reads group ``h // (H / G)`` (``G = H``: one per head,
        BASED; ``G < H``: SSD's ``c`` shared by a group). Per-group work (the features, the
        ``q . k`` dots) is done once per group, never repeated per head.
      k: ``[B, T, G, F]`` keys before the feature map, grouped like ``q``.
      v: ``[B, T, H, Dv]`` values.
      feature_map: one of ``taylor``, ``taylor_symmetric``, ``elu``, ``relu``, ``identity``.
      algorithm: ``chunked`` (O(T), default), ``quadratic`` or ``recurrent``; all agree.
      chunk_size: tokens per chunk for ``chunked``; any length works (the tail is masked).
      eps: added to the denominator (1e-12 as in the reference's quadratic path).
      initial_state: state to continue from (keys and values seen before ``q[:, 0]``).
      return_state: also return the state after the last token (for prefill).
      implementation: ``auto``, ``xla`` (the reference) or ``pallas`` (the kernel; interpreted
        on CPU); see :mod:`jaxbased.ops.dispatch` (``auto`` uses a kernel only on a device,
        after it has passed its check). The kernel computes the ``chunked`` algorithm for every
        feature map, in float32 with bfloat16 (GPU: also float16) matmul operands when q, k, v
        all have that dtype, with or without decay and normalizer (a per-head ``[H]`` decay is
        broadcast to ``[B, T, H]`` for it).
      log_decay: None (no decay), ``[H]`` (one decay per head) or ``[B, T, H]`` (per step and
        head); values <= 0 (checked when concrete).
      normalize: divide by ``phi(q_t)^T z_t + eps`` (the BASED normalizer); False returns
        ``phi(q_t)^T S_t`` (SSD, RetNet). The state holds ``z`` either way.
      kernel_chunk_size: tokens per chunk of the kernel (None: ``chunk_size``). The chunk only
        tiles the computation, so the two may differ (SSD keeps 256 for XLA and the kernels'
        own default).

    Returns:
      ``y [B, T, H, Dv]`` in ``v.dtype``, and the final :class:`LinearAttentionState` (float32)
      when ``return_state`` is set.
    """
    _check_inputs(q, k, v)
    check_feature_map(feature_map)
    check_algorithm(algorithm, ALGORITHMS)
    check_chunk_size(chunk_size)
    if kernel_chunk_size is None:
        kernel_chunk_size = chunk_size
    check_chunk_size(kernel_chunk_size)
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0")
    check_implementation(implementation)
    batch, seq, groups, feature_dim = q.shape
    heads = v.shape[2]
    if log_decay is not None:
        log_decay = _check_log_decay(log_decay, {"[H]": (heads,), "[B, T, H]": (batch, seq, heads)})
    # A time-split mesh: the sequence-parallel form from a zero state (with or without decay,
    # normalizer and returned state, per shard by XLA or the kernel); a prefill continuing from
    # an initial state runs below and XLA places the data.
    layout = sequence_layout(batch, seq, groups)
    if layout is not None and initial_state is None:
        check_sequence_implementation("linear_attention", implementation)
        local = [layout.local_struct(x) for x in (q, k, v)]  # what one shard's kernel sees
        unsupported = _kernel_unsupported(
            *local, feature_map, algorithm, kernel_chunk_size, log_decay, normalize
        )
        use_kernel = implementation != "xla" and use_pallas(
            implementation, unsupported, _kernel_request(q, feature_map)
        )
        return linear_attention_sharded(
            q, k, v, layout, feature_map=feature_map, algorithm=algorithm,
            chunk_size=chunk_size, eps=eps, log_decay=log_decay, normalize=normalize,
            return_state=return_state, use_kernel=use_kernel,
            kernel_chunk_size=kernel_chunk_size,
        )  # fmt: skip
    if implementation != "xla" and use_pallas(
        implementation,
        _kernel_unsupported(
            q, k, v, feature_map, algorithm, kernel_chunk_size, log_decay, normalize
        ),
        _kernel_request(q, feature_map),
    ):
        out, final = _pallas(
            q, k, v, feature_map, kernel_chunk_size, eps, initial_state, log_decay, normalize
        )
        return (out, final) if return_state else out

    dtype = compute_dtype(q, k, v)
    expanded = expanded_dim(feature_map, feature_dim)
    state = _state_or_zeros(initial_state, batch, heads, expanded, v.shape[-1], dtype)
    state = (state.kv_state, state.k_state)
    # q, k: [B, T, G, F] -> [B, G, T, F]; v: [B, T, H, Dv] -> [B, H, T, Dv].
    qh, kh, vh = (jnp.swapaxes(x, 1, 2).astype(dtype) for x in (q, k, v))
    decay = None  # [B, H, T]
    if log_decay is not None:
        decay = log_decay.astype(dtype)
        decay = (
            jnp.broadcast_to(decay[None, :, None], (batch, heads, seq))
            if decay.ndim == 1
            else jnp.swapaxes(decay, 1, 2)
        )

    if algorithm == "recurrent":
        out, final = xla.recurrent(qh, kh, vh, feature_map, eps, state, decay, normalize)
    else:
        # Per-head arrays split as [B, G, H / G, ...] (head h = g (H / G) + r).
        state = tuple(_grouped(part, groups) for part in state)
        vh = _grouped(vh, groups)
        decay = None if decay is None else _grouped(decay, groups)
        if algorithm == "quadratic":
            out, final = xla.quadratic(qh, kh, vh, feature_map, eps, state, decay, normalize)
        else:
            out, final = xla.chunked(
                qh, kh, vh, feature_map, eps, state, chunk_size, decay, normalize
            )
        out, final = _ungrouped(out), tuple(_ungrouped(part) for part in final)

    out = jnp.swapaxes(out, 1, 2).astype(v.dtype)
    final = LinearAttentionState(*final)
    return (out, final) if return_state else out


def _kernel_unsupported(
    q, k, v, feature_map, algorithm, chunk_size, log_decay=None, normalize=True
) -> str | None:
    from pallas_kernels.linear_attention import unsupported_reason

    if algorithm != "chunked":
        return f"the kernel computes algorithm='chunked', not {algorithm!r}"
    backend, _ = kernel_backend()
    decay_dtypes = () if log_decay is None else (log_decay.dtype,)
    return unsupported_reason(
        q.shape,
        v.shape,
        feature_map=feature_map,
        chunk_size=chunk_size,
        backend=backend,
        dtypes=(q.dtype, k.dtype, v.dtype, *decay_dtypes),
    )


def _kernel_request(q: Array, feature_map: str) -> KernelRequest:
    dtype = jnp.dtype(q.dtype)
    return KernelRequest(
        "linear_attention", dtype, functools.partial(_probe, feature_map, dtype), feature_map
    )


def _probe(feature_map: str, dtype: jnp.dtype, target: KernelTarget) -> None:
    """The kernel on ``target`` against the XLA path, forward and gradients, on a small problem
    of its class: 40 tokens (two chunks of 16 and a tail), one group of two heads, ``F = 8``,
    ``Dv = 32``, a decay per step, an initial state, normalized (positive queries and keys keep
    the normalizer of every map away from zero)."""
    from pallas_kernels.linear_attention import linear_attention as pallas_linear_attention

    rng = np.random.default_rng(0)
    q, k = (rng.uniform(0.1, 1.0, size=(1, 40, 1, 8)).astype(dtype) for _ in range(2))
    v = rng.normal(size=(1, 40, 2, 32)).astype(dtype)
    log_decay = np.log(rng.uniform(0.7, 1.0, size=(1, 40, 2))).astype(np.float32)
    expanded = expanded_dim(feature_map, 8)
    kv_state = (0.1 * rng.normal(size=(1, 2, expanded, 32))).astype(np.float32)
    k_state = rng.uniform(0.0, 1.0, size=(1, 2, expanded)).astype(np.float32)

    def kernel(q, k, v, log_decay, kv_state, k_state):
        return pallas_linear_attention(
            q, k, v, (kv_state, k_state), log_decay=log_decay, feature_map=feature_map,
            chunk_size=16, backend=target.backend, interpret=target.interpret,
        )  # fmt: skip

    def reference(q, k, v, log_decay, kv_state, k_state):
        y, final = linear_attention(
            q, k, v, feature_map=feature_map, chunk_size=16, log_decay=log_decay,
            initial_state=LinearAttentionState(kv_state, k_state), return_state=True,
            implementation="xla",
        )  # fmt: skip
        return y, (final.kv_state, final.k_state)

    inputs = (q, k, v, log_decay, kv_state, k_state)
    compare_with_reference(kernel, reference, inputs, dtype.name)


def _pallas(q, k, v, feature_map, chunk_size, eps, initial_state, log_decay, normalize):
    from pallas_kernels.linear_attention import linear_attention as pallas_linear_attention

    backend, interpret = kernel_backend()
    batch, seq, groups, feature_dim = q.shape
    heads = v.shape[2]
    if initial_state is not None:
        # Same shape check (and message) as the XLA path.
        expanded = expanded_dim(feature_map, feature_dim)
        initial_state = _state_or_zeros(
            initial_state, batch, heads, expanded, v.shape[-1], jnp.float32
        )
        initial_state = (initial_state.kv_state, initial_state.k_state)

    # The kernel takes a decay per step and head: a fixed per-head decay [H] is broadcast.
    decay = () if log_decay is None else (jnp.broadcast_to(log_decay, (batch, seq, heads)),)

    def kernel(q, k, v, *rest):
        log_decay = rest[0] if decay else None
        state = rest[len(decay) :]
        return pallas_linear_attention(
            q,
            k,
            v,
            state or None,
            log_decay=log_decay,
            normalize=normalize,
            feature_map=feature_map,
            chunk_size=chunk_size,
            eps=eps,
            backend=backend,
            interpret=interpret,
        )

    # Heads are split over the tensor axis only where the groups are too (each shard then holds
    # whole groups with their heads).
    partition = mesh_partition(batch, groups)
    tokens, decay_spec, state_specs = None, None, (None, None)
    if partition is not None:
        tokens = token_spec(partition)
        decay_spec = PartitionSpec(*tuple(tokens)[:3])  # [B, T, H], split like the tokens
        state_specs = (head_spec(partition, 4), head_spec(partition, 3))
    state = () if initial_state is None else initial_state
    in_specs = (
        tokens,
        tokens,
        tokens,
        *((decay_spec,) if decay else ()),
        *(state_specs if state else ()),
    )
    out, (kv_state, k_state) = shard_kernel(kernel, partition, in_specs, (tokens, state_specs))(
        q, k, v, *decay, *state
    )
    return out, LinearAttentionState(kv_state, k_state)


def linear_attention_step(
    q: Float[Array, "B G F"],
    k: Float[Array, "B G F"],
    v: Float[Array, "B H Dv"],
    state: LinearAttentionState,
    *,
    feature_map: str = "taylor",
    eps: float = DEFAULT_EPS,
    log_decay: Float[Array, " H"] | Float[Array, "B H"] | None = None,
    normalize: bool = True,
) -> tuple[Float[Array, "B H Dv"], LinearAttentionState]:
    """One decoding step: decay the state by ``a = exp(log_decay)`` (if given), add
    ``phi(k) ⊗ v`` (and ``phi(k)``), then read it with ``phi(q)`` (normalized unless
    ``normalize=False``).

    ``q, k [B, G, F]`` (``G`` groups of heads, as in :func:`linear_attention`; ``G = H``: one per
    head), ``v [B, H, Dv]``. ``log_decay``: None, ``[H]`` or ``[B, H]``, values <= 0. Returns
    the output ``[B, H, Dv]`` (dtype of ``v``) and the new state (dtype of the state).
    """
    check_feature_map(feature_map)
    if (
        q.ndim != 3
        or q.shape != k.shape
        or v.ndim != 3
        or v.shape[0] != q.shape[0]
        or v.shape[1] % q.shape[1]
    ):
        raise ValueError(
            f"q, k must be [batch, groups, F] and v [batch, heads, Dv] with groups dividing "
            f"heads; got q={q.shape}, k={k.shape}, v={v.shape}"
        )
    dtype = compute_dtype(q, k, v, state.kv_state)
    batch, heads = v.shape[:2]
    decay = None
    if log_decay is not None:
        log_decay = _check_log_decay(log_decay, {"[H]": (heads,), "[B, H]": (batch, heads)})
        decay = jnp.broadcast_to(jnp.exp(log_decay.astype(dtype)), (batch, heads))
    out, (kv_state, k_state) = xla.step(
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
        (state.kv_state.astype(dtype), state.k_state.astype(dtype)),
        feature_map,
        eps,
        decay,
        normalize,
    )
    new_state = LinearAttentionState(
        kv_state.astype(state.kv_state.dtype), k_state.astype(state.k_state.dtype)
    )
    return out.astype(v.dtype), new_state
