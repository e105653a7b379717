"""Decay linear attention (RetNet's retention; docs/mixers/decay_attention.md).

    q = proj_q(x), k = proj_k(x) / sqrt(Dk), v = proj_v(x)          ([B, T, H, Dk|Dk|Dv])
    S_t = gamma_h S_{t-1} + phi(k_t) v_tᵀ,  o_t = phi(q_t)ᵀ S_t          (no normalizer)
    y = out_proj(silu(proj_gate(x)) * rmsnorm_per_head(o))

The decay is fixed per head, RetNet's schedule (Sun et al. 2023, "Retentive Network", §2.2
multi-scale retention): ``gamma_h = 1 - 2^(-5 - h)`` for ``h = 0 .. H-1``, so head 0 forgets
over ~32 tokens and later heads over ever longer spans. The per-head RMSNorm plays RetNet's
GroupNorm (with a learned weight, ones at init); it makes the output invariant to any per-token,
per-head scale, so RetNet's extra scalings of the parallel form are not needed. RetNet's xPos
rotation of q and k is not used (the decay alone carries position). The feature map ``phi`` is
``feature_map`` (identity by default, as RetNet / TransNormerLLM's Lightning Attention);
the output gate is optional (``output_gate``). Both algorithms and the decode step are
``jaxbased.ops.linear_attention`` with ``log_decay`` and ``normalize=False``: the same chunked
scan as BASED.

Decode cache: a :class:`~jaxbased.ops.LinearAttentionState` (``kv_state [B, H, D', Dv]``,
``k_state [B, H, D']``, float32; ``k_state`` is carried but unused without the normalizer).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxbased.layers.common import (
    head_output_projection,
    head_projection,
    logical_param,
    rms_normalize,
    valid_mask,
)
from jaxbased.layers.mixer import (
    MixerConfig,
    MixerContext,
    StateSizeFromCache,
    require_bool,
    require_choice,
    require_divides,
    require_positive_int,
)
from jaxbased.ops.feature_maps import FEATURE_MAP_NAMES, expanded_dim
from jaxbased.ops.linear_attention import (
    ALGORITHMS,
    LinearAttentionState,
    discount_padding,
    init_linear_attention_state,
    linear_attention,
    linear_attention_step,
)


@dataclasses.dataclass(frozen=True)
class DecayAttentionConfig(MixerConfig):
    """The ``decay_attention`` mixer.

    Attributes:
      heads: heads ``H``; the value head dim is ``d_model / H``.
      key_dim: query/key dim per head (None: the value head dim).
      feature_map: feature map of q and k (``identity`` as RetNet).
      output_gate: multiply the normalised output by ``silu(proj_gate(x))``.
      algorithm: ``quadratic``, ``chunked`` or ``recurrent``.
      chunk_size: chunk of the chunked algorithm and of the kernels.
    """

    heads: int = 16
    key_dim: int | None = None
    feature_map: str = "identity"
    output_gate: bool = True
    algorithm: str = "chunked"
    chunk_size: int = 64

    def check(self) -> None:
        require_positive_int(self, "heads", "chunk_size")
        require_positive_int(self, "key_dim", optional=True)
        require_choice(self, "feature_map", FEATURE_MAP_NAMES)
        require_choice(self, "algorithm", ALGORITHMS)
        require_bool(self, "output_gate")

    def validate(self, context: MixerContext) -> None:
        require_divides("heads", self.heads, "d_model", context.d_model)

    def value_dim(self, d_model: int) -> int:
        """Value head dim: ``d_model / heads``."""
        return d_model // self.heads

    def head_key_dim(self, d_model: int) -> int:
        """Query/key dim per head: ``key_dim`` or the value head dim."""
        return self.key_dim if self.key_dim is not None else self.value_dim(d_model)

    def expanded_dim(self, d_model: int) -> int:
        """Features per head after the feature map."""
        return expanded_dim(self.feature_map, self.head_key_dim(d_model))


def retnet_log_decays(num_heads: int) -> np.ndarray:
    """``log(1 - 2^(-5 - h))`` for ``h = 0 .. num_heads - 1`` (float32, all < 0)."""
    return np.log1p(-np.exp2(-5.0 - np.arange(num_heads, dtype=np.float64))).astype(np.float32)


class DecayLinearAttention(StateSizeFromCache, nn.Module):
    """Retention with a fixed decay per head: ``[B, T, d] -> [B, T, d]``.

    Parameters (``H = heads``, ``Dk = head_key_dim``, ``Dv = d / H``): ``proj_q``, ``proj_k``
    kernels ``[d, H, Dk]``; ``proj_v`` ``[d, H, Dv]``; ``proj_gate`` ``[d, H, Dv]`` (when
    ``output_gate``); ``norm_weight [H, Dv]``; ``out_proj`` ``[H, Dv, d]``; no biases.
    """

    config: DecayAttentionConfig
    context: MixerContext

    def setup(self) -> None:
        config, context = self.config, self.context
        heads = config.heads
        key_dim, value_dim = config.head_key_dim(context.d_model), config.value_dim(context.d_model)
        self.proj_q = head_projection(context, heads, key_dim, "feature")
        self.proj_k = head_projection(context, heads, key_dim, "feature")
        self.proj_v = head_projection(context, heads, value_dim, "head_dim")
        if config.output_gate:
            self.proj_gate = head_projection(context, heads, value_dim, "head_dim")
        self.norm_weight = logical_param(
            self,
            "norm_weight",
            nn.initializers.ones_init(),
            ("heads", "head_dim"),
            (heads, value_dim),
        )
        self.out_proj = head_output_projection(context, heads, value_dim)

    def _log_decay(self) -> Array:
        return jnp.asarray(retnet_log_decays(self.config.heads))

    def _qkv(self, x: Array) -> tuple[Array, Array, Array]:
        key_dim = self.config.head_key_dim(self.context.d_model)
        return self.proj_q(x), self.proj_k(x) * key_dim**-0.5, self.proj_v(x)

    def _output(self, x: Array, attended: Array) -> Array:
        """``x [..., d]``, ``attended [..., H, Dv]`` -> ``out_proj(gate * rmsnorm(attended))``."""
        normed = rms_normalize(attended, self.context.norm_eps)
        normed = (normed * self.norm_weight).astype(attended.dtype)
        if self.config.output_gate:
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
            feature_map=config.feature_map,
            algorithm=config.algorithm,
            chunk_size=config.chunk_size,
            return_state=return_state,
            implementation=self.context.implementation,
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
            pads = x.shape[1] - jnp.asarray(lengths, jnp.int32)
            state = discount_padding(state, pads, self.config.feature_map)
        return self._output(x, attended), state

    def decode_step(
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
            feature_map=self.config.feature_map,
            log_decay=self._log_decay(),
            normalize=False,
        )
        return self._output(x, attended), cache

    def init_cache(self, batch_size: int, max_len: int) -> LinearAttentionState:
        del max_len
        config, d = self.config, self.context.d_model
        return init_linear_attention_state(
            batch_size, config.heads, config.expanded_dim(d), config.value_dim(d)
        )

    def flops(self, seq_len: int) -> float:
        """Projections and the chunked scan as BASED: intra-chunk dots and weighted sums, the
        state read and update per head."""
        config, d = self.config, self.context.d_model
        heads, key_dim, value = config.heads, config.head_key_dim(d), config.value_dim(d)
        expanded = config.expanded_dim(d)
        chunk = min(config.chunk_size, seq_len)
        value_projections = 2 if config.output_gate else 1
        projections = 2 * d * heads * (2 * key_dim + value_projections * value)
        projections += 2 * heads * value * d
        per_head = 2 * chunk * expanded + 2 * chunk * value + 4 * expanded * value
        return projections + heads * per_head
