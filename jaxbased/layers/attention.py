"""Softmax attention mixer: sliding window (BASED) or full causal (Transformer++);
see docs/mixers/attention.md.

``q, k, v = qkv_proj(x)`` (one kernel ``[d, 3, H, D]``, rows [Q | K | V] of the reference's
``Wqkv``), rotary on the leading ``rotary_dim`` channels of q and k, causal softmax over the
last ``window`` keys (all keys when ``window`` is None), ``out_proj``; no biases. Decode cache: a
:class:`~jaxbased.ops.KVCache` ring buffer with ``window`` slots (``max_len`` for full attention);
full attention under a Recycled Attention policy keeps a
:class:`~jaxbased.ops.recycled_attention.RecycledKVCache` instead (docs/recycled_attention.md).

EchoAtt (docs/echoatt.md): a full-attention layer that shares an anchor layer's probabilities
(``MixerContext.shares_attention``) has ``v_proj`` and ``out_proj`` only, and a values-only
:class:`~jaxbased.ops.shared_attention.ValueCache`; an anchor returns its probabilities when
asked (``return_probabilities=True``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.layers.common import Projection, head_output_projection, head_projection
from jaxbased.layers.mixer import (
    MixerConfig,
    MixerContext,
    StateSizeFromCache,
    require_divides,
    require_positive,
    require_positive_int,
)
from jaxbased.ops.recycled_attention import (
    RecycledAttentionPolicy,
    RecycledKVCache,
    init_recycled_cache,
    recycled_attention_step,
)
from jaxbased.ops.rotary import apply_rotary
from jaxbased.ops.shared_attention import (
    ValueCache,
    apply_attention_probabilities,
    causal_attention_probabilities,
    fill_value_cache,
    init_value_cache,
    shared_attention_step,
)
from jaxbased.ops.window_attention import (
    KVCache,
    fill_kv_cache,
    init_kv_cache,
    sliding_window_attention,
    sliding_window_attention_step,
)


@dataclasses.dataclass(frozen=True)
class AttentionConfig(MixerConfig):
    """The ``attention`` mixer (full causal softmax attention, Transformer++).

    Attributes:
      heads: attention heads ``H``; the head dim is ``d_model / H``.
      rotary_fraction: rotary rotates the leading ``int(rotary_fraction * head_dim)`` channels
        of each query and key head (0: no rotary).
      rotary_base: the rotary frequency base.
    """

    heads: int = 16
    rotary_fraction: float = 1.0
    rotary_base: float = 10000.0

    @property
    def window(self) -> int | None:
        """Keys a query sees, itself included; ``None``: all earlier keys."""
        return None

    def supports_attention_sharing(self) -> bool:
        """Full attention (``window`` None) can anchor or share EchoAtt probabilities."""
        return self.window is None

    def check(self) -> None:
        require_positive_int(self, "heads")
        require_positive(self, "rotary_base")
        if not 0.0 <= self.rotary_fraction <= 1.0:
            raise ValueError(f"rotary_fraction={self.rotary_fraction!r} must be in [0, 1]")

    def validate(self, context: MixerContext) -> None:
        require_divides("heads", self.heads, "d_model", context.d_model)

    def head_dim(self, d_model: int) -> int:
        """Channels per head: ``d_model / heads``."""
        return d_model // self.heads

    def rotary_dim(self, d_model: int) -> int:
        """Channels of each head that rotary rotates (0: none)."""
        return int(self.rotary_fraction * self.head_dim(d_model))


@dataclasses.dataclass(frozen=True)
class SlidingWindowConfig(AttentionConfig):
    """The ``sliding_window`` mixer: ``attention``'s fields plus the window.

    Attributes:
      window: keys a query sees, itself included (docs/mixers/attention.md#window-counting).
    """

    window: int = 129  # type: ignore[assignment]  # a field here, a property in the base

    def check(self) -> None:
        super().check()
        require_positive_int(self, "window")


class SlidingWindowAttention(StateSizeFromCache, nn.Module):
    """Causal softmax attention over a window of keys: ``[B, T, d] -> [B, T, d]``.

    Attributes:
      config: heads, rotary and ``window`` (``None`` for full causal attention).
      context: model width, dtype, init, implementation.
    """

    config: AttentionConfig
    context: MixerContext

    @property
    def window(self) -> int | None:
        return self.config.window

    @property
    def accepts_recycled_attention(self) -> bool:
        """Whether ``prefill`` takes a Recycled Attention policy: full attention only."""
        return self.config.window is None

    @property
    def shares_attention(self) -> bool:
        """Whether this layer reuses an anchor layer's probabilities (EchoAtt): it then has
        ``v_proj`` instead of ``qkv_proj``, and its cache is a
        :class:`~jaxbased.ops.shared_attention.ValueCache`."""
        return self.context.shares_attention

    def setup(self) -> None:
        config, context = self.config, self.context
        heads, head_dim = config.heads, config.head_dim(context.d_model)
        if self.shares_attention:
            if self.window is not None:
                raise ValueError(f"a sharing layer needs full attention; window={self.window}")
            self.v_proj = head_projection(context, heads, head_dim, "head_dim")
        else:
            self.qkv_proj = Projection(
                (context.d_model,),
                (3, heads, head_dim),
                ("embed", None, "heads", "head_dim"),
                context.init_std,
                context.compute_dtype,
            )
        self.out_proj = head_output_projection(context, heads, head_dim)

    def _require_shared(self, shared_probabilities: Array | None) -> Array:
        if shared_probabilities is None:
            raise ValueError(
                f"layer {self.context.layer_index} shares attention probabilities; pass its "
                "anchor's as shared_probabilities"
            )
        return shared_probabilities

    def _check_anchor(self) -> None:
        if self.window is not None or self.shares_attention:
            raise ValueError(
                "return_probabilities needs a full-attention layer with its own queries and keys"
            )

    def _rotate(self, x: Array, positions: Array) -> Array:
        config = self.config
        rotary_dim = config.rotary_dim(self.context.d_model)
        if rotary_dim == 0:
            return x
        return apply_rotary(x, positions, rotary_dim=rotary_dim, base=config.rotary_base)

    def _attention(self, q: Array, k: Array, v: Array) -> Array:
        return sliding_window_attention(
            q, k, v, window=self.window, implementation=self.context.implementation
        )

    def _project(self, x: Array) -> tuple[Array, Array, Array]:
        q, k, v, _ = self._project_with_raw_query(x)
        return q, k, v

    def _project_with_raw_query(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """Rotated q and k, v, and q before rotary, each ``[B, T, H, D]``."""
        seq = x.shape[1]
        qkv = self.qkv_proj(x)
        positions = jnp.arange(seq, dtype=jnp.int32)
        q = self._rotate(qkv[:, :, 0], positions)
        k = self._rotate(qkv[:, :, 1], positions)
        return q, k, qkv[:, :, 2], qkv[:, :, 0]

    def __call__(
        self,
        x: Float[Array, "B T D"],
        shared_probabilities: Float[Array, "B H T T"] | None = None,
        return_probabilities: bool = False,
    ) -> Float[Array, "B T D"] | tuple[Float[Array, "B T D"], Float[Array, "B H T T"]]:
        """``[B, T, d] -> [B, T, d]``.

        A sharing layer (``context.shares_attention``) needs its anchor's
        ``shared_probabilities [B, H, T, T]`` and outputs ``out_proj(P · v_proj(x))``.
        ``return_probabilities`` (an anchor) computes the float32 probabilities ``P``
        explicitly and returns ``(y, P)``.
        """
        if self.shares_attention:
            probabilities = self._require_shared(shared_probabilities)
            return self.out_proj(apply_attention_probabilities(probabilities, self.v_proj(x)))
        q, k, v = self._project(x)
        if return_probabilities:
            self._check_anchor()
            probabilities = causal_attention_probabilities(q, k)
            return self.out_proj(apply_attention_probabilities(probabilities, v)), probabilities
        return self.out_proj(self._attention(q, k, v))

    def prefill(
        self,
        x: Float[Array, "B T D"],
        max_len: int,
        lengths: Int[Array, " B"] | None = None,
        recycled_attention: RecycledAttentionPolicy | None = None,
        shared_probabilities: Float[Array, "B H T T"] | None = None,
        return_probabilities: bool = False,
    ) -> tuple[Any, ...]:
        """Forward over a prompt at positions ``0 .. T-1``; also returns the filled ring buffer.

        EchoAtt (as in :meth:`__call__`): a sharing layer takes ``shared_probabilities`` and
        returns a :class:`~jaxbased.ops.shared_attention.ValueCache`; with
        ``return_probabilities`` an anchor returns ``(y, cache, P)``.

        ``lengths [B]``: valid tokens per row of right-padded prompts; padding never enters the
        cache (its slots keep position -1), and valid outputs never see it (causal).

        ``recycled_attention`` (full attention only): return a
        :class:`~jaxbased.ops.recycled_attention.RecycledKVCache` whose recycled set comes from
        the attention probabilities of each row's last prompt token.
        """
        if self.shares_attention:
            if recycled_attention is not None:
                raise ValueError("Recycled Attention does not apply to a sharing (EchoAtt) layer")
            probabilities = self._require_shared(shared_probabilities)
            v = self.v_proj(x)
            y = self.out_proj(apply_attention_probabilities(probabilities, v))
            return y, fill_value_cache(v, self._capacity(max_len), lengths)
        q, k, v, raw_q = self._project_with_raw_query(x)
        if return_probabilities:
            self._check_anchor()
            if recycled_attention is not None:
                raise ValueError("Recycled Attention does not apply to an EchoAtt anchor layer")
            probabilities = causal_attention_probabilities(q, k)
            y = self.out_proj(apply_attention_probabilities(probabilities, v))
            return y, fill_kv_cache(k, v, self._capacity(max_len), lengths), probabilities
        y = self.out_proj(self._attention(q, k, v))
        cache = fill_kv_cache(k, v, self._capacity(max_len), lengths)
        if recycled_attention is None:
            return y, cache
        if not self.accepts_recycled_attention:
            raise ValueError(
                f"Recycled Attention needs full attention; this layer has window={self.window}"
            )
        batch, seq = x.shape[:2]
        last = (
            jnp.full((batch,), seq - 1, jnp.int32)
            if lengths is None
            else jnp.asarray(lengths, jnp.int32) - 1
        )
        index = last[:, None, None, None]
        last_q = jnp.take_along_axis(q, index, axis=1)[:, 0]
        last_raw_q = jnp.take_along_axis(raw_q, index, axis=1)[:, 0]
        return y, init_recycled_cache(cache, last_q, last_raw_q, recycled_attention)

    def decode_step(
        self,
        x: Float[Array, "B D"],
        cache: KVCache | RecycledKVCache | ValueCache,
        position: Int[Array, " B"],
        shared_probabilities: Float[Array, "B H S"] | None = None,
        return_probabilities: bool = False,
    ) -> tuple[Any, ...]:
        """One token per row at absolute ``position [B]`` (a full or recycled step when the
        cache is a :class:`~jaxbased.ops.recycled_attention.RecycledKVCache`).

        EchoAtt: a sharing layer takes its anchor's ``shared_probabilities [B, H, S]`` over the
        cache slots; with ``return_probabilities`` an anchor returns ``(y, cache, P)``."""
        if self.shares_attention:
            probabilities = self._require_shared(shared_probabilities)
            y, cache = shared_attention_step(probabilities, self.v_proj(x), cache, position)
            return self.out_proj(y), cache
        qkv = self.qkv_proj(x)  # [B, 3, H, D]
        rows_positions = position[:, None]
        q = self._rotate(qkv[:, None, 0], rows_positions)[:, 0]
        k = self._rotate(qkv[:, None, 1], rows_positions)[:, 0]
        if isinstance(cache, RecycledKVCache):
            y, cache = recycled_attention_step(q, k, qkv[:, 2], qkv[:, 0], cache, position)
            return self.out_proj(y), cache
        if return_probabilities:
            self._check_anchor()
            y, cache, probabilities = sliding_window_attention_step(
                q, k, qkv[:, 2], cache, position, window=None, return_probabilities=True
            )
            return self.out_proj(y), cache, probabilities
        y, cache = sliding_window_attention_step(
            q, k, qkv[:, 2], cache, position, window=self.window
        )
        return self.out_proj(y), cache

    def _capacity(self, max_len: int) -> int:
        if self.window is not None:
            return self.window
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be >= 1 for full attention's KV cache")
        return max_len

    def init_cache(self, batch_size: int, max_len: int) -> KVCache | ValueCache:
        config, context = self.config, self.context
        if self.shares_attention:
            return init_value_cache(
                batch_size,
                self._capacity(max_len),
                config.heads,
                config.head_dim(context.d_model),
                context.compute_dtype,
            )
        return init_kv_cache(
            batch_size,
            self._capacity(max_len),
            config.heads,
            config.head_dim(context.d_model),
            context.compute_dtype,
        )

    def flops(self, seq_len: int) -> float:
        """Projections plus ``q·k`` and ``p·v`` over the average number of keys a causal query
        sees: ``(T + 1) / 2``, at most ``window`` (roughly; exact for ``T >> window``)."""
        d = self.context.d_model
        average_keys = (seq_len + 1) / 2
        if self.window is not None:
            average_keys = min(self.window, average_keys)
        if self.shares_attention:  # the value and output projections, and p·v
            return 2 * d * d + 2 * d * d + 2 * average_keys * d
        return 2 * d * 3 * d + 2 * d * d + 4 * average_keys * d
