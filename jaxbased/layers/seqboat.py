"""SeqBoat's sparse modular activation layer (Ren et al. 2023): a multi-head EMA over every
token, a router that sends some tokens to a local gated attention unit; see
docs/mixers/seqboat.md.

    mx        = silu(EMA(x) + omega * x)                  (MEGA's damped EMA, N per channel)
    u, hx     = hx_proj(mx)                               (2 router logits, d outputs)
    p         = softmax(u / exp(log_temperature));  active_t = p_1 > p_0;  g_t = max(p) active_t
    packed    = the active tokens in order (stable), at most ``capacity`` of them
    z, r, v   = silu(mx_proj(mx_packed));  q, k = z * scale_{0,1} + offset_{0,1}, rotary at
                their original positions
    a         = softmax attention of each packed query over the last ``window`` packed keys
    h         = h_proj(a * r) scattered back to the active tokens (0 elsewhere), times g
    y         = hx + h

The block adds ``y`` to the residual and applies SiLU to the sum
(``ModelConfig.residual_activation="silu"``); SeqBoat's LM has no MLP (``use_mlp=False``).

Static shapes: the packed sequence has ``capacity = packed_capacity(T)`` slots
(``capacity_fraction`` of ``T`` rounded up to ``capacity_bucket``); active tokens beyond it are
dropped from attention (their ``h`` is 0) and counted in the ``dropped_tokens`` metric; the
``activation_rate`` metric is the share of active tokens (``jaxbased.layers.mixer.report_metric``).

On a mesh whose ``sequence`` axis splits time, the EMA and the packed attention run
sequence-parallel with the same ranks, capacity and window as over the whole row
(docs/sequence_parallelism.md#seqboat).

Decode cache (:class:`SeqBoatCache`): the EMA state and a ring buffer of the last ``window``
active tokens' rotated keys and values.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.layers.common import Projection, logical_param, valid_mask
from jaxbased.layers.mixer import (
    MixerConfig,
    MixerContext,
    StateSizeFromCache,
    report_metric,
    require_choice,
    require_positive,
    require_positive_int,
)
from jaxbased.ops.ema import ema_step, multi_head_ema, multi_head_ema_with_state
from jaxbased.ops.rotary import apply_rotary
from jaxbased.ops.sequence_parallel import SequenceLayout, sequence_layout
from jaxbased.ops.sequence_parallel_prefill import ring_buffer_positions
from jaxbased.ops.sequence_parallel_scan import (
    active_ring_sharded,
    pack_active_sharded,
    packed_window_attention_sharded,
    unpack_sharded,
)
from jaxbased.ops.window_attention import sliding_window_attention

#: ``packed``: attention over the packed active tokens (the layer's algorithm); ``masked``: the
#: same function at full length with a mask over active tokens (O(T^2); a reference).
ATTENTION_ALGORITHMS: tuple[str, ...] = ("packed", "masked")


@dataclasses.dataclass(frozen=True)
class SeqBoatConfig(MixerConfig):
    """The ``seqboat`` mixer.

    Attributes:
      ema_dim: EMA dimensions ``N`` per channel (MEGA's ``ndim``).
      attention_dim: query/key width ``z`` of the single-head attention unit.
      value_dim: value width ``h`` (None: ``2 d``).
      window: active keys a query sees, itself included (the official chunk ``W`` sees
        ``W + 1``).
      capacity_fraction: packed slots as a share of ``T`` (in ``(0, 1]``; 1: no token is ever
        dropped).
      capacity_bucket: the packed length is rounded up to a multiple of this (fewer shapes).
      init_temperature_scale: the router's temperature starts at ``scale * sqrt(d)``.
      rotary_base: rotary frequency base (rotary over all of ``z``).
      ema_chunk_size: chunk of the chunked EMA.
      algorithm: ``packed`` or ``masked`` (:data:`ATTENTION_ALGORITHMS`).
    """

    ema_dim: int = 16
    attention_dim: int = 128
    value_dim: int | None = None
    window: int = 256
    capacity_fraction: float = 1.0
    capacity_bucket: int = 64
    init_temperature_scale: float = 1.0
    rotary_base: float = 10000.0
    ema_chunk_size: int = 64
    algorithm: str = "packed"

    def check(self) -> None:
        require_positive_int(
            self, "ema_dim", "attention_dim", "window", "capacity_bucket", "ema_chunk_size"
        )
        require_positive_int(self, "value_dim", optional=True)
        require_positive(self, "init_temperature_scale", "rotary_base")
        fraction = self.capacity_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise ValueError(f"capacity_fraction={fraction!r} must be a number in (0, 1]")
        if not 0 < fraction <= 1:
            raise ValueError(
                f"capacity_fraction={fraction!r} must be in (0, 1]: a packed capacity of "
                "0 tokens cannot attend"
            )
        if self.attention_dim % 2:
            raise ValueError(f"attention_dim={self.attention_dim} must be even (rotary pairs)")
        require_choice(self, "algorithm", ATTENTION_ALGORITHMS)

    def values(self, d_model: int) -> int:
        """Value width ``h``: ``value_dim`` or ``2 d``."""
        return self.value_dim if self.value_dim is not None else 2 * d_model

    def packed_capacity(self, seq_len: int) -> int:
        """Packed slots for ``T`` tokens: ``ceil(capacity_fraction T)`` rounded up to
        ``capacity_bucket``, at most ``T`` (at least 1)."""
        wanted = math.ceil(self.capacity_fraction * seq_len)
        bucketed = -(-wanted // self.capacity_bucket) * self.capacity_bucket
        return max(1, min(seq_len, bucketed))


@flax.struct.dataclass
class SeqBoatCache:
    """Decode state of a SeqBoat layer.

    ema_state: ``[B, d, N]`` float32, the EMA after the last token.
    keys, values: ``[B, W, z]`` and ``[B, W, h]``, the last ``W = window`` active tokens'
      rotated keys and values; active token of rank ``r`` (0-based) in slot ``r % W``.
    slot_positions: ``[B, W]`` int32, each slot's original position, -1 when empty.
    active_count: ``[B]`` int32, active tokens so far.
    """

    ema_state: Float[Array, "B D N"]
    keys: Float[Array, "B W Z"]
    values: Float[Array, "B W H"]
    slot_positions: Int[Array, "B W"]
    active_count: Int[Array, " B"]


def _beta_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """MEGA's ``beta``: ``N(0, 0.02)`` plus ``+1, -1, +1, ...`` along the EMA dimension."""
    signs = jnp.where(jnp.arange(shape[-1]) % 2 == 0, 1.0, -1.0)
    return (jax.random.normal(key, shape, dtype) * 0.02 + signs).astype(dtype)


class SeqBoat(StateSizeFromCache, nn.Module):
    """SeqBoat's layer: ``[B, T, d] -> [B, T, d]`` (module docstring).

    Parameters: ``ema_delta``, ``ema_alpha``, ``ema_beta``, ``ema_gamma`` ``[d, N]``,
    ``ema_omega [d]``; ``hx_proj`` ``d -> 2 + d``, ``mx_proj`` ``d -> z + 2h``, ``h_proj``
    ``h -> d`` (with biases); ``qk_scale``, ``qk_offset`` ``[2, z]``; ``log_temperature []``.
    """

    config: SeqBoatConfig
    context: MixerContext

    def setup(self) -> None:
        config, context = self.config, self.context
        d, ema_dim, z = context.d_model, config.ema_dim, config.attention_dim
        values = config.values(d)
        dtype = context.compute_dtype

        def truncated(std: float) -> nn.initializers.Initializer:
            return nn.initializers.truncated_normal(stddev=std)

        ema_axes = ("embed", None)
        self.ema_delta = logical_param(self, "ema_delta", truncated(0.2), ema_axes, (d, ema_dim))
        self.ema_alpha = logical_param(self, "ema_alpha", truncated(0.2), ema_axes, (d, ema_dim))
        self.ema_beta = logical_param(self, "ema_beta", _beta_init, ema_axes, (d, ema_dim))
        self.ema_gamma = logical_param(self, "ema_gamma", truncated(1.0), ema_axes, (d, ema_dim))
        self.ema_omega = logical_param(self, "ema_omega", truncated(1.0), ("embed",), (d,))
        self.hx_proj = Projection(
            (d,), (2 + d,), ("embed", None), context.init_std, dtype, True, (None,)
        )
        self.mx_proj = Projection(
            (d,), (z + 2 * values,), ("embed", None), context.init_std, dtype, True, (None,)
        )
        self.h_proj = Projection(
            (values,), (d,), (None, "embed"), context.output_init_std, dtype, True, ("embed",)
        )
        self.qk_scale = logical_param(self, "qk_scale", truncated(0.02), (None, None), (2, z))
        self.qk_offset = logical_param(
            self, "qk_offset", nn.initializers.zeros_init(), (None, None), (2, z)
        )
        start = math.log(config.init_temperature_scale * math.sqrt(d))
        self.log_temperature = logical_param(
            self, "log_temperature", nn.initializers.constant(start), (), ()
        )

    # Pieces ---------------------------------------------------------------------------------
    def _ema_coefficients(self) -> tuple[Array, Array, Array]:
        """``(a, b, w)`` of :mod:`jaxbased.ops.ema`: ``p = sigmoid(delta)``,
        ``a = 1 - p sigmoid(alpha)``, ``b = p beta``, ``w = gamma / sqrt(N)``."""
        p = jax.nn.sigmoid(self.ema_delta)
        decay = 1.0 - p * jax.nn.sigmoid(self.ema_alpha)
        return decay, p * self.ema_beta, self.ema_gamma / math.sqrt(self.config.ema_dim)

    def _mx(self, x: Array, ema: Array) -> Array:
        return jax.nn.silu(ema + self.ema_omega.astype(x.dtype) * x)

    def _route(self, mx: Array) -> tuple[Array, Array, Array]:
        """``hx [..., d]``, ``active [...]`` (bool) and the gate ``g [...]`` (float32 or
        wider)."""
        base = self.hx_proj(mx)
        wide = jnp.promote_types(base.dtype, jnp.float32)
        logits, hx = base[..., :2].astype(wide), base[..., 2:]
        probs = jax.nn.softmax(logits / jnp.exp(self.log_temperature), axis=-1)
        active = probs[..., 1] > probs[..., 0]
        return hx, active, jnp.where(active, probs.max(axis=-1), 0.0)

    def _attention_inputs(self, mx: Array, positions: Array) -> tuple[Array, ...]:
        """``mx [B, L, d]`` at original ``positions [B, L]`` -> rotated ``q, k [B, L, 1, z]``,
        ``v, r [B, L, h]``."""
        config = self.config
        z, values = config.attention_dim, config.values(self.context.d_model)
        zrv = jax.nn.silu(self.mx_proj(mx))
        base, r, v = zrv[..., :z], zrv[..., z : z + values], zrv[..., z + values :]
        scale, offset = self.qk_scale.astype(base.dtype), self.qk_offset.astype(base.dtype)
        q, k = (base * scale[i] + offset[i] for i in (0, 1))
        q, k = (
            apply_rotary(part[:, :, None], positions, base=config.rotary_base) for part in (q, k)
        )
        return q, k, v, r

    def _packed(self, mx: Array, active: Array) -> tuple[Array, Array]:
        """``h [B, T, d]`` (before the gate) over the packed active tokens, and the active tokens
        each row dropped beyond the capacity ``[B]``."""
        batch, seq, d = mx.shape
        capacity = self.config.packed_capacity(seq)
        layout = sequence_layout(batch, seq, 1)
        if layout is not None:
            h = self._packed_sharded(mx, active, layout, capacity)
            return h, jnp.maximum(active.sum(axis=-1) - capacity, 0)
        order = jnp.argsort(jnp.logical_not(active), axis=-1, stable=True)  # active first
        index = order[:, :capacity]  # [B, C] original positions, in order
        count = active.sum(axis=-1)
        kept = jnp.arange(capacity)[None, :] < count[:, None]
        packed = jnp.take_along_axis(mx, index[..., None], axis=1)
        q, k, v, r = self._attention_inputs(packed, index)
        attended = sliding_window_attention(
            q,
            k,
            v[:, :, None],
            window=self.config.window,
            implementation=self.context.implementation,
        )[:, :, 0]
        out = jnp.where(kept[..., None], self.h_proj(attended * r), 0)
        rows = jnp.arange(batch)[:, None]
        h = jnp.zeros((batch, seq, d), out.dtype).at[rows, index].set(out)
        return h, jnp.maximum(count - capacity, 0)

    def _packed_sharded(
        self, mx: Array, active: Array, layout: SequenceLayout, capacity: int
    ) -> Array:
        """:meth:`_packed`'s ``h`` on a time-split mesh: each shard packs its slice's active
        tokens into ``min(L, capacity)`` slots, the projections run on the packed slots where
        they lie, and the attention passes the ranks and the last ``window - 1`` keys and values
        across slices (:mod:`jaxbased.ops.sequence_parallel_scan`; under
        ``implementation="pallas"`` each shard attends with the window kernel)."""
        seq = mx.shape[1]
        slots = min(seq // layout.shards, capacity)
        packed, positions, index, counts = pack_active_sharded(mx, active, layout, slots)
        q, k, v, r = self._attention_inputs(packed, positions)
        attended, kept = packed_window_attention_sharded(
            q, k, v[:, :, None], counts, layout, window=self.config.window, capacity=capacity,
            implementation=self.context.implementation,
        )  # fmt: skip
        out = jnp.where(kept[..., None], self.h_proj(attended[:, :, 0] * r), 0)
        return unpack_sharded(out, index, layout, seq)

    def _masked(self, mx: Array, active: Array) -> Array:
        """The same ``h`` at full length: active query ``t`` attends the active keys ``s <= t``
        with ``rank_t - rank_s < window`` (inactive queries see only themselves; discarded)."""
        batch, seq, _ = mx.shape
        positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        q, k, v, r = self._attention_inputs(mx, positions)
        rank = jnp.cumsum(active, axis=-1) - 1
        causal = positions[:, :, None] >= positions[:, None, :]
        near = rank[:, :, None] - rank[:, None, :] < self.config.window
        mask = active[:, :, None] & active[:, None, :] & causal & near
        mask |= jnp.eye(seq, dtype=bool)[None] & ~active[:, :, None]
        dtype = jnp.promote_types(q.dtype, jnp.float32)
        scores = jnp.einsum("bqz,bkz->bqk", q[:, :, 0], k[:, :, 0]).astype(dtype)
        scores = scores * self.config.attention_dim**-0.5
        weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        attended = jnp.einsum("bqk,bkh->bqh", weights, v.astype(dtype)).astype(v.dtype)
        return jnp.where(active[..., None], self.h_proj(attended * r), 0)

    def _forward(self, x: Array, lengths: Array | None, state_positions: Array | None = None):
        """``(y, mx, active, ema_state)``: the layer's output ``[B, T, d]``, the EMA-mixed
        input, the routed tokens ``[B, T]`` and, with ``state_positions [B]``, the EMA state
        after those tokens ``[B, d, N]`` (else None)."""
        batch, seq, _ = x.shape
        decay, input_scale, output_scale = self._ema_coefficients()
        chunk_size = self.config.ema_chunk_size
        if state_positions is None:
            ema = multi_head_ema(x, decay, input_scale, output_scale, chunk_size=chunk_size)
            ema_state = None
        else:
            ema, ema_state = multi_head_ema_with_state(
                x, decay, input_scale, output_scale, state_positions, chunk_size=chunk_size
            )
        mx = self._mx(x, ema)
        hx, active, gate = self._route(mx)
        valid = valid_mask(lengths, seq)
        if valid is not None:
            active, gate = active & valid, jnp.where(valid, gate, 0.0)
        tokens = jnp.float32(batch * seq) if valid is None else valid.sum().astype(jnp.float32)
        report_metric(self, "activation_rate", active.sum() / tokens)
        if self.config.algorithm == "packed":
            h, dropped = self._packed(mx, active)
            report_metric(self, "dropped_tokens", dropped.sum() / tokens)
        else:
            h = self._masked(mx, active)
        y = hx + (h * gate[..., None].astype(h.dtype)).astype(hx.dtype)
        return y, mx, active, ema_state

    # The Mixer protocol ---------------------------------------------------------------------
    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self._forward(x, None)[0]

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], SeqBoatCache]:
        """Forward over prompts; the cache holds the EMA state after each row's last valid
        token and its last ``window`` active tokens (padding is never active). On a time-split
        mesh the prefill is the sequence-parallel forward; the EMA state comes from the shard
        holding each row's last token and the ring's tokens from the shards holding them, the
        cache replicated over ``sequence`` (docs/sequence_parallelism.md#prefill)."""
        del max_len  # the cache does not grow
        batch, seq, _ = x.shape
        lengths = (
            jnp.full((batch,), seq, jnp.int32)
            if lengths is None
            else jnp.asarray(lengths, jnp.int32)
        )
        y, mx, active, ema_state = self._forward(x, lengths, state_positions=lengths - 1)
        window = self.config.window
        layout = sequence_layout(batch, seq, 1)
        if layout is not None:  # each slot's token taken where it lies
            ring_mx, positions, count = active_ring_sharded(mx, active, layout, window)
            filled = positions >= 0
        else:
            order = jnp.argsort(jnp.logical_not(active), axis=-1, stable=True)
            count = active.sum(axis=-1).astype(jnp.int32)
            ranks = ring_buffer_positions(count, window)  # rank held by each slot, < 0: empty
            filled = ranks >= 0
            positions = jnp.take_along_axis(order, jnp.clip(ranks, 0, seq - 1), axis=1)
            ring_mx = jnp.take_along_axis(mx, positions[..., None], axis=1)
        _, k, v, _ = self._attention_inputs(ring_mx, positions)
        cache = SeqBoatCache(
            ema_state=ema_state.astype(jnp.float32),
            keys=jnp.where(filled[..., None], k[:, :, 0], 0).astype(self.context.compute_dtype),
            values=jnp.where(filled[..., None], v, 0).astype(self.context.compute_dtype),
            slot_positions=jnp.where(filled, positions, -1).astype(jnp.int32),
            active_count=count,
        )
        return y, cache

    def decode_step(
        self, x: Float[Array, "B D"], cache: SeqBoatCache, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], SeqBoatCache]:
        """One token per row at ``position [B]``: the EMA step, the router, and for an active
        token the ring write and its attention over the ring."""
        config = self.config
        window = cache.slot_positions.shape[1]
        if window < config.window:
            raise ValueError(
                f"window={config.window} is longer than the cache's ring of {window} slots"
            )
        decay, input_scale, output_scale = self._ema_coefficients()
        ema, ema_state = ema_step(x, cache.ema_state, decay, input_scale, output_scale)
        mx = self._mx(x, ema)
        hx, active, gate = self._route(mx)
        position = jnp.asarray(position, jnp.int32)
        q, k, v, r = self._attention_inputs(mx[:, None], position[:, None])
        rows = jnp.arange(x.shape[0])
        slot = cache.active_count % window

        def write(ring: Array, new: Array) -> Array:
            old = ring[rows, slot]
            chosen = jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
            return ring.at[rows, slot].set(chosen.astype(ring.dtype))

        keys = write(cache.keys, k[:, 0, 0])
        values = write(cache.values, v[:, 0])
        slot_positions = write(cache.slot_positions, position)
        mask = slot_positions >= 0
        dtype = jnp.promote_types(q.dtype, jnp.float32)
        scores = jnp.einsum("bz,bwz->bw", q[:, 0, 0], keys).astype(dtype)
        scores = scores * config.attention_dim**-0.5
        weights = jnp.where(mask, jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), -1), 0.0)
        attended = jnp.einsum("bw,bwh->bh", weights, values.astype(dtype)).astype(v.dtype)
        h = self.h_proj(attended * r[:, 0]) * gate[:, None].astype(hx.dtype)
        y = hx + jnp.where(active[:, None], h, 0).astype(hx.dtype)
        cache = SeqBoatCache(
            ema_state=ema_state,
            keys=keys,
            values=values,
            slot_positions=slot_positions,
            active_count=cache.active_count + active.astype(jnp.int32),
        )
        return y, cache

    def init_cache(self, batch_size: int, max_len: int) -> SeqBoatCache:
        del max_len
        config, d = self.config, self.context.d_model
        dtype = self.context.compute_dtype
        window = config.window
        return SeqBoatCache(
            ema_state=jnp.zeros((batch_size, d, config.ema_dim), jnp.float32),
            keys=jnp.zeros((batch_size, window, config.attention_dim), dtype),
            values=jnp.zeros((batch_size, window, config.values(d)), dtype),
            slot_positions=jnp.full((batch_size, window), -1, jnp.int32),
            active_count=jnp.zeros((batch_size,), jnp.int32),
        )

    def flops(self, seq_len: int) -> float:
        """Per token: the chunked EMA (``2 d C`` Toeplitz, ``4 d N`` state read and write), the
        router projection, and for the packed share ``C(T) / T`` of tokens the attention unit's
        projections and ``q·k``, ``p·v`` over ``min(window, T)`` keys."""
        config, d = self.config, self.context.d_model
        z, values = config.attention_dim, config.values(d)
        chunk = min(config.ema_chunk_size, seq_len)
        ema = 2 * d * chunk + 4 * d * config.ema_dim
        router = 2 * d * (2 + d)
        share = config.packed_capacity(seq_len) / seq_len
        keys = min(config.window, seq_len)
        unit = 2 * d * (z + 2 * values) + 2 * values * d + 2 * keys * (z + values)
        return ema + router + share * unit
