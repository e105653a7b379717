"""Decay linear attention (RetNet's retention; SPEC.md §2 "decay linear attention").

    q = proj_q(x), k = proj_k(x) / sqrt(Dk), v = proj_v(x)          ([B, T, H, Dk|Dk|Dv])
    S_t = gamma_h S_{t-1} + phi(k_t) v_tᵀ,  o_t = phi(q_t)ᵀ S_t          (no normalizer)
    y = out_proj(silu(proj_gate(x)) * rmsnorm_per_head(o))

The decay is fixed per head, RetNet's schedule (Sun et al. 2023, "Retentive Network", §2.2
multi-scale retention): ``gamma_h = 1 - 2^(-5 - h)`` for ``h = 0 .. H-1``, so head 0 forgets
over ~32 tokens and later heads over ever longer spans. The per-head RMSNorm plays RetNet's
GroupNorm (with a learned weight, ones at init); it makes the output invariant to any per-token,
per-head scale, so RetNet's extra scalings of the parallel form are not needed. RetNet's xPos
rotation of q and k is not used (the decay alone carries position). The feature map ``phi`` is
``decay_feature_map`` (identity by default, as RetNet / TransNormerLLM's Lightning Attention);
the output gate is optional (``decay_output_gate``). Both algorithms and the decode step are
``jaxbased.ops.linear_attention`` with ``log_decay`` and ``normalize=False``: the same chunked
scan as BASED.

Decode cache: a :class:`~jaxbased.ops.LinearAttentionState` (``kv_state [B, H, D', Dv]``,
``k_state [B, H, D']``, float32; ``k_state`` is carried but unused without the normalizer).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.layers.common import Projection
from jaxbased.layers.mamba import valid_mask
from jaxbased.ops.feature_maps import expanded_dim, get_feature_map
from jaxbased.ops.linear_attention import (
    LinearAttentionState,
    init_linear_attention_state,
    linear_attention,
    linear_attention_step,
)


def retnet_log_decays(num_heads: int) -> np.ndarray:
    """``log(1 - 2^(-5 - h))`` for ``h = 0 .. num_heads - 1`` (float32, all < 0)."""
    return np.log1p(-np.exp2(-5.0 - np.arange(num_heads, dtype=np.float64))).astype(np.float32)


class DecayLinearAttention(nn.Module):
    """Retention with a fixed decay per head: ``[B, T, d] -> [B, T, d]``.

    Parameters (``H = decay_attention_heads``, ``Dk = decay_head_key_dim``, ``Dv = d / H``):
    ``proj_q``, ``proj_k`` kernels ``[d, H, Dk]``; ``proj_v`` ``[d, H, Dv]``; ``proj_gate``
    ``[d, H, Dv]`` (when ``decay_output_gate``); ``norm_weight [H, Dv]``; ``out_proj``
    ``[H, Dv, d]``; no biases.
    """

    config: ModelConfig

    def setup(self) -> None:
        config = self.config
        heads, dtype = config.decay_attention_heads, config.compute_dtype
        key_dim, value_dim = config.decay_head_key_dim, config.decay_value_dim

        def projection(width: int, last_axis: str) -> Projection:
            return Projection(
                (config.d_model,),
                (heads, width),
                ("embed", "heads", last_axis),
                config.init_std,
                dtype,
            )

        self.proj_q = projection(key_dim, "feature")
        self.proj_k = projection(key_dim, "feature")
        self.proj_v = projection(value_dim, "head_dim")
        if config.decay_output_gate:
            self.proj_gate = projection(value_dim, "head_dim")
        self.norm_weight = self.param(
            "norm_weight",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("heads", "head_dim")),
            (heads, value_dim),
            jnp.float32,
        )
        self.out_proj = Projection(
            (heads, value_dim),
            (config.d_model,),
            ("heads", "head_dim", "embed"),
            config.output_init_std,
            dtype,
        )

    def _log_decay(self) -> Array:
        return jnp.asarray(retnet_log_decays(self.config.decay_attention_heads))

    def _qkv(self, x: Array) -> tuple[Array, Array, Array]:
        key_dim = self.config.decay_head_key_dim
        return self.proj_q(x), self.proj_k(x) * key_dim**-0.5, self.proj_v(x)

    def _output(self, x: Array, attended: Array) -> Array:
        """``x [..., d]``, ``attended [..., H, Dv]`` -> ``out_proj(gate * rmsnorm(attended))``."""
        config = self.config
        wide = attended.astype(jnp.promote_types(attended.dtype, jnp.float32))
        normed = wide * jax.lax.rsqrt(
            jnp.mean(wide * wide, axis=-1, keepdims=True) + config.norm_eps
        )
        normed = (normed * self.norm_weight).astype(attended.dtype)
        if config.decay_output_gate:
            normed = normed * jax.nn.silu(self.proj_gate(x))
        return self.out_proj(normed)

    def _attend(self, x: Array, lengths: Array | None, return_state: bool):
        config = self.config
        q, k, v = self._qkv(x)
        log_decay = self._log_decay()
        mask = valid_mask(lengths, x.shape[1])
        if mask is not None:
            # Padding enters with k = v = 0 and no decay: the state stays that of the valid
            # tokens (up to phi(0) in the unused k_state, removed in prefill).
            k, v = (jnp.where(mask[..., None, None], part, 0) for part in (k, v))
            log_decay = jnp.where(mask[..., None], log_decay, 0.0)
        return linear_attention(
            q,
            k,
            v,
            feature_map=config.decay_feature_map,
            algorithm=config.linear_attention_algorithm,
            chunk_size=config.chunk_size,
            return_state=return_state,
            implementation=config.implementation,
            log_decay=log_decay,
            normalize=False,
        )

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self._output(x, self._attend(x, None, return_state=False))

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], LinearAttentionState]:
        """Forward over a prompt; also returns the state after its last (valid) token.

        ``lengths [B]``: valid tokens per row of right-padded prompts; padding neither decays
        nor enters the state.
        """
        del max_len  # the state does not grow with the length
        attended, state = self._attend(x, lengths, return_state=True)
        if lengths is not None:
            config = self.config
            phi_zero = get_feature_map(config.decay_feature_map)(
                jnp.zeros((config.decay_head_key_dim,), state.k_state.dtype)
            )
            pads = (x.shape[1] - jnp.asarray(lengths, jnp.int32)).astype(state.k_state.dtype)
            state = LinearAttentionState(
                state.kv_state, state.k_state - pads[:, None, None] * phi_zero
            )
        return self._output(x, attended), state

    def decode(
        self, x: Float[Array, "B D"], cache: LinearAttentionState, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], LinearAttentionState]:
        """One token per row; ``position`` is unused (the decay is relative)."""
        del position
        q, k, v = self._qkv(x)
        attended, cache = linear_attention_step(
            q,
            k,
            v,
            cache,
            feature_map=self.config.decay_feature_map,
            log_decay=self._log_decay(),
            normalize=False,
        )
        return self._output(x, attended), cache

    def init_cache(self, batch_size: int, max_len: int) -> LinearAttentionState:
        del max_len
        config = self.config
        return init_linear_attention_state(
            batch_size,
            config.decay_attention_heads,
            expanded_dim(config.decay_feature_map, config.decay_head_key_dim),
            config.decay_value_dim,
        )
