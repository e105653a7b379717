"""BASED linear attention mixer (docs/mixers/based.md): Taylor-feature causal linear attention.

``q = proj_q(x) [B, T, H, F]``, ``k = proj_k(x)``, ``v = proj_v(x) [B, T, H, Dv]``,
``y = out_proj(linear_attention(q, k, v))``; no biases. Decode cache: a
:class:`~jaxbased.ops.LinearAttentionState` (``kv_state [B, H, D', Dv]``, ``k_state [B, H, D']``,
float32), whose size does not depend on the sequence length.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.layers.common import head_output_projection, head_projection, valid_mask
from jaxbased.layers.mixer import (
    MixerConfig,
    MixerContext,
    StateSizeFromCache,
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
class BasedConfig(MixerConfig):
    """The ``based`` mixer.

    Attributes:
      heads: linear-attention heads ``H``; the value head dim is ``d_model / H``.
      feature_dim: query/key dim ``F`` per head before the feature map.
      feature_map: one of ``jaxbased.ops.FEATURE_MAP_NAMES`` (``taylor``: 1 + F + F^2 features).
      eps: added to the normalizer (the reference's 1e-12; based-360m ran with 1e-6).
      algorithm: ``quadratic``, ``chunked`` or ``recurrent`` (see ``jaxbased.ops``).
      chunk_size: chunk of the chunked algorithm and of the kernels.
    """

    heads: int = 16
    feature_dim: int = 16
    feature_map: str = "taylor"
    eps: float = 1e-12
    algorithm: str = "chunked"
    chunk_size: int = 64

    def check(self) -> None:
        require_positive_int(self, "heads", "feature_dim", "chunk_size")
        require_choice(self, "feature_map", FEATURE_MAP_NAMES)
        require_choice(self, "algorithm", ALGORITHMS)
        if isinstance(self.eps, bool) or not self.eps >= 0:
            raise ValueError(f"eps={self.eps!r} must be >= 0")

    def validate(self, context: MixerContext) -> None:
        require_divides("heads", self.heads, "d_model", context.d_model)

    def value_dim(self, d_model: int) -> int:
        """Value head dim ``d_model / heads``."""
        return d_model // self.heads

    @property
    def expanded_dim(self) -> int:
        """Features per head after the feature map (273 for Taylor with F = 16)."""
        return expanded_dim(self.feature_map, self.feature_dim)


class BasedLinearAttention(StateSizeFromCache, nn.Module):
    """Linear attention mixer: ``[B, T, d] -> [B, T, d]``.

    Parameters: ``proj_q``, ``proj_k`` kernels ``[d, H, F]``; ``proj_v`` ``[d, H, Dv]``;
    ``out_proj`` ``[H, Dv, d]``; ``H = config.heads``, ``Dv = d / H``.
    """

    config: BasedConfig
    context: MixerContext

    def setup(self) -> None:
        config, context = self.config, self.context
        heads, value_dim = config.heads, config.value_dim(context.d_model)
        self.proj_q = head_projection(context, heads, config.feature_dim, "feature")
        self.proj_k = head_projection(context, heads, config.feature_dim, "feature")
        self.proj_v = head_projection(context, heads, value_dim, "head_dim")
        self.out_proj = head_output_projection(context, heads, value_dim)

    def _attend(self, x: Array, return_state: bool, lengths: Array | None = None):
        config = self.config
        k, v = self.proj_k(x), self.proj_v(x)
        mask = valid_mask(lengths, x.shape[1])
        if mask is not None:
            k, v = (jnp.where(mask[..., None, None], part, 0) for part in (k, v))
        return linear_attention(
            self.proj_q(x),
            k,
            v,
            feature_map=config.feature_map,
            algorithm=config.algorithm,
            chunk_size=config.chunk_size,
            eps=config.eps,
            return_state=return_state,
            implementation=self.context.implementation,
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
        state = discount_padding(state, x.shape[1] - lengths, self.config.feature_map)
        return self.out_proj(y), state

    def decode_step(
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
            eps=config.eps,
        )
        return self.out_proj(y), cache

    def init_cache(self, batch_size: int, max_len: int) -> LinearAttentionState:
        del max_len
        config = self.config
        return init_linear_attention_state(
            batch_size, config.heads, config.expanded_dim, config.value_dim(self.context.d_model)
        )

    def flops(self, seq_len: int) -> float:
        """Projections, the intra-chunk ``C x C`` work and the state read/update per head."""
        config, d = self.config, self.context.d_model
        heads, features = config.heads, config.feature_dim
        value, expanded = config.value_dim(d), config.expanded_dim
        chunk = min(config.chunk_size, seq_len)
        projections = 2 * d * heads * (2 * features + value) + 2 * heads * value * d
        per_head = 2 * chunk * features + 2 * chunk * value + 4 * expanded * value
        return projections + heads * per_head
