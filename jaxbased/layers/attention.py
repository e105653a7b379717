"""Softmax attention mixer: sliding window (BASED) or full causal (Transformer++), SPEC.md §2.

``q, k, v = qkv_proj(x)`` (one kernel ``[d, 3, H, D]``, rows [Q | K | V] of the reference's
``Wqkv``), rotary on the leading ``rotary_dim`` channels of q and k, causal softmax over the
last ``window`` keys (all keys when ``window`` is None), ``out_proj``; no biases. Decode cache: a
:class:`~jaxbased.ops.KVCache` ring buffer with ``window`` slots (``max_len`` for full attention).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.layers.common import Projection
from jaxbased.ops.rotary import apply_rotary
from jaxbased.ops.window_attention import (
    KVCache,
    fill_kv_cache,
    init_kv_cache,
    sliding_window_attention,
    sliding_window_attention_step,
)


class SlidingWindowAttention(nn.Module):
    """Causal softmax attention over a window of keys: ``[B, T, d] -> [B, T, d]``.

    Attributes:
      config: model config (heads, rotary, dtype).
      window: keys seen per query, itself included; ``None`` for full causal attention.
    """

    config: ModelConfig
    window: int | None

    def setup(self) -> None:
        config = self.config
        heads, head_dim = config.attention_heads, config.attention_head_dim
        self.qkv_proj = Projection(
            (config.d_model,),
            (3, heads, head_dim),
            ("embed", None, "heads", "head_dim"),
            config.init_std,
            config.compute_dtype,
        )
        self.out_proj = Projection(
            (heads, head_dim),
            (config.d_model,),
            ("heads", "head_dim", "embed"),
            config.output_init_std,
            config.compute_dtype,
        )

    def _rotate(self, x: Array, positions: Array) -> Array:
        config = self.config
        if config.rotary_dim == 0:
            return x
        return apply_rotary(x, positions, rotary_dim=config.rotary_dim, base=config.rotary_base)

    def _attention(self, q: Array, k: Array, v: Array) -> Array:
        return sliding_window_attention(
            q, k, v, window=self.window, implementation=self.config.implementation
        )

    def _project(self, x: Array) -> tuple[Array, Array, Array]:
        seq = x.shape[1]
        qkv = self.qkv_proj(x)
        positions = jnp.arange(seq, dtype=jnp.int32)
        q = self._rotate(qkv[:, :, 0], positions)
        k = self._rotate(qkv[:, :, 1], positions)
        return q, k, qkv[:, :, 2]

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        q, k, v = self._project(x)
        return self.out_proj(self._attention(q, k, v))

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], KVCache]:
        """Forward over a prompt at positions ``0 .. T-1``; also returns the filled ring buffer.

        ``lengths [B]``: valid tokens per row of right-padded prompts; padding never enters the
        cache (its slots keep position -1), and valid outputs never see it (causal).
        """
        q, k, v = self._project(x)
        y = self.out_proj(self._attention(q, k, v))
        return y, fill_kv_cache(k, v, self._capacity(max_len), lengths)

    def decode(
        self, x: Float[Array, "B D"], cache: KVCache, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], KVCache]:
        """One token per row at absolute ``position [B]``."""
        qkv = self.qkv_proj(x)  # [B, 3, H, D]
        rows_positions = position[:, None]
        q = self._rotate(qkv[:, None, 0], rows_positions)[:, 0]
        k = self._rotate(qkv[:, None, 1], rows_positions)[:, 0]
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

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        config = self.config
        return init_kv_cache(
            batch_size,
            self._capacity(max_len),
            config.attention_heads,
            config.attention_head_dim,
            config.compute_dtype,
        )
