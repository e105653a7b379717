"""BASED linear attention mixer (SPEC.md §2): Taylor-feature causal linear attention.

``q = proj_q(x) [B, T, H, F]``, ``k = proj_k(x)``, ``v = proj_v(x) [B, T, H, Dv]``,
``y = out_proj(linear_attention(q, k, v))``; no biases. Decode cache: a
:class:`~jaxbased.ops.LinearAttentionState` (``kv_state [B, H, D', Dv]``, ``k_state [B, H, D']``,
float32), whose size does not depend on the sequence length.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.layers.common import Projection
from jaxbased.ops.feature_maps import get_feature_map
from jaxbased.ops.linear_attention import (
    LinearAttentionState,
    init_linear_attention_state,
    linear_attention,
    linear_attention_step,
)


class BasedLinearAttention(nn.Module):
    """Linear attention mixer: ``[B, T, d] -> [B, T, d]``.

    Parameters: ``proj_q``, ``proj_k`` kernels ``[d, H, F]``; ``proj_v`` ``[d, H, Dv]``;
    ``out_proj`` ``[H, Dv, d]``; ``H = linear_attention_heads``, ``Dv = d / H``.
    """

    config: ModelConfig

    def setup(self) -> None:
        config = self.config
        heads, dtype = config.linear_attention_heads, config.compute_dtype
        value_dim = config.linear_attention_value_dim
        self.proj_q = Projection(
            (config.d_model,),
            (heads, config.feature_dim),
            ("embed", "heads", "feature"),
            config.init_std,
            dtype,
        )
        self.proj_k = Projection(
            (config.d_model,),
            (heads, config.feature_dim),
            ("embed", "heads", "feature"),
            config.init_std,
            dtype,
        )
        self.proj_v = Projection(
            (config.d_model,),
            (heads, value_dim),
            ("embed", "heads", "head_dim"),
            config.init_std,
            dtype,
        )
        self.out_proj = Projection(
            (heads, value_dim),
            (config.d_model,),
            ("heads", "head_dim", "embed"),
            config.output_init_std,
            dtype,
        )

    def _attend(self, x: Array, return_state: bool, lengths: Array | None = None):
        config = self.config
        k, v = self.proj_k(x), self.proj_v(x)
        if lengths is not None:
            valid = (jnp.arange(x.shape[1]) < lengths[:, None])[:, :, None, None]
            k, v = jnp.where(valid, k, 0), jnp.where(valid, v, 0)
        return linear_attention(
            self.proj_q(x),
            k,
            v,
            feature_map=config.feature_map,
            algorithm=config.linear_attention_algorithm,
            chunk_size=config.chunk_size,
            eps=config.linear_attention_eps,
            return_state=return_state,
            implementation=config.implementation,
        )

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.out_proj(self._attend(x, return_state=False))

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], LinearAttentionState]:
        """Forward over a prompt; also returns the state after its last token.

        ``lengths [B]``: valid tokens per row of right-padded prompts. Padding enters with
        ``k = v = 0``, so it adds exactly ``0`` to ``kv_state`` and ``phi(0)`` per pad token to
        ``k_state`` (``[1, 0, …, 0]`` for the Taylor maps), which is subtracted: the state is
        that of the valid tokens alone, whatever algorithm or kernel computed it. Valid outputs
        never see the padding (causal).
        """
        del max_len  # the state does not grow with the length
        if lengths is None:
            y, state = self._attend(x, return_state=True)
            return self.out_proj(y), state
        lengths = jnp.asarray(lengths, jnp.int32)
        y, state = self._attend(x, return_state=True, lengths=lengths)
        config = self.config
        phi_zero = get_feature_map(config.feature_map)(
            jnp.zeros((config.feature_dim,), state.k_state.dtype)
        )
        pads = (x.shape[1] - lengths).astype(state.k_state.dtype)
        k_state = state.k_state - pads[:, None, None] * phi_zero
        return self.out_proj(y), LinearAttentionState(state.kv_state, k_state)

    def decode(
        self, x: Float[Array, "B D"], cache: LinearAttentionState, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], LinearAttentionState]:
        """One token per row; ``position`` is unused (no positional information)."""
        del position
        config = self.config
        y, cache = linear_attention_step(
            self.proj_q(x),
            self.proj_k(x),
            self.proj_v(x),
            cache,
            feature_map=config.feature_map,
            eps=config.linear_attention_eps,
        )
        return self.out_proj(y), cache

    def init_cache(self, batch_size: int, max_len: int) -> LinearAttentionState:
        del max_len
        config = self.config
        return init_linear_attention_state(
            batch_size,
            config.linear_attention_heads,
            config.expanded_feature_dim,
            config.linear_attention_value_dim,
        )
