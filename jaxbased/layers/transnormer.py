"""TransNormerLLM's gated linear attention (Lightning Attention's layer); see
docs/mixers/transnormer.md.

    q, k, v, u = qkvu_proj(x)                              ([B, T, H, e] each, no bias)
    q, k = silu(q), silu(k)                                 no 1/sqrt(e) scale
    LRPE layers: q, k <- [q cos(theta t), q sin(theta t)]   (key dim 2e: the state doubles)
    S_t = lambda_{h,l} S_{t-1} + k_t v_tᵀ,  o_t = q_tᵀ S_t      no denominator
    y = out_proj(srmsnorm(concat_h o) * u)                 one weightless norm over all heads

The decays are fixed, per head ``h`` and layer ``l`` of ``L``, from ALiBi's slopes as the
released code computes them: ``lambda_{h,l} = exp(-m_h (1 - l / (L - 1) + 1e-5))`` with
``m_h = 2^(-8 (h + 1) / H)`` (and ALiBi's interleave for ``H`` not a power of 2). The lowest
layer forgets fastest; the top layer barely decays. The layer's index is a run-time input
(:data:`~jaxbased.layers.mixer.TAKES_LAYER_INDEX`), so the decays are computed by array ops and
the layers share one scanned body; an LRPE layer has other parameter and state shapes, so its
config's ``layer_variant`` sets it apart.

The attention runs on ``jaxbased.ops.linear_attention`` with the identity feature map, a
per-head ``log_decay`` and ``normalize=False``: the chunked decayed scan, never the
``lambda^{±t}`` factorisation. Decode cache: a :class:`~jaxbased.ops.LinearAttentionState`
(``kv_state [B, H, Dk, e]``, ``Dk = 2e`` in an LRPE layer, ``e`` elsewhere; ``k_state`` is
carried but unused without the normalizer). LRPE reads each row's absolute ``position``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxbased.layers.common import (
    Projection,
    head_output_projection,
    logical_param,
    simple_rms_normalize,
    valid_mask,
)
from jaxbased.layers.mixer import (
    MixerConfig,
    MixerContext,
    StateSizeFromCache,
    require_choice,
    require_divides,
    require_positive_int,
)
from jaxbased.ops.linear_attention import (
    ALGORITHMS,
    LinearAttentionState,
    discount_padding,
    init_linear_attention_state,
    linear_attention,
    linear_attention_step,
)

#: The base of LRPE's initial frequencies, ``theta_j = base^(-2 j / (H e))``.
LRPE_BASE = 10000.0
#: Added to ``1 - l / (L - 1)`` so that the top layer keeps a (tiny) decay, as released.
TOP_LAYER_DECAY_OFFSET = 1e-5


@dataclasses.dataclass(frozen=True)
class TransNormerConfig(MixerConfig):
    """The ``transnormer`` mixer.

    Attributes:
      heads: heads ``H``; the head dim is ``e = hidden_dim / H``.
      hidden_dim: width of q, k, v and u (None: ``d_model``, as every released config).
      lrpe_layers: layers (0-based) with LRPE-d (the released models: the first only).
      algorithm: ``chunked``, ``quadratic`` or ``recurrent`` (the same function).
      chunk_size: chunk of the chunked algorithm.
    """

    heads: int = 8
    hidden_dim: int | None = None
    lrpe_layers: tuple[int, ...] = (0,)
    algorithm: str = "chunked"
    chunk_size: int = 64

    def check(self) -> None:
        require_positive_int(self, "heads", "chunk_size")
        require_positive_int(self, "hidden_dim", optional=True)
        require_choice(self, "algorithm", ALGORITHMS)
        layers = self.lrpe_layers
        if isinstance(layers, str) or not isinstance(layers, tuple | list):
            raise ValueError(f"lrpe_layers={layers!r} must be a sequence of layer indices")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(f"lrpe_layers={layers!r} must hold integers >= 0")
        object.__setattr__(self, "lrpe_layers", tuple(sorted(set(layers))))

    def validate(self, context: MixerContext) -> None:
        hidden = self.width(context.d_model)
        require_divides("heads", self.heads, "hidden_dim", hidden)
        outside = [i for i in self.lrpe_layers if i >= context.num_layers]
        if outside:
            raise ValueError(
                f"lrpe_layers={self.lrpe_layers} has layers {outside} outside "
                f"0..{context.num_layers - 1}"
            )

    def layer_variant(self, layer_index: int, num_layers: int) -> Hashable:
        """LRPE layers have a ``theta`` parameter and twice the key dim: ``True`` for them."""
        del num_layers
        return layer_index in self.lrpe_layers

    def width(self, d_model: int) -> int:
        """Width of q, k, v and u: ``hidden_dim`` or ``d_model``."""
        return self.hidden_dim if self.hidden_dim is not None else d_model

    def head_dim(self, d_model: int) -> int:
        """``e = width / heads``."""
        return self.width(d_model) // self.heads

    def key_dim(self, d_model: int, layer_index: int) -> int:
        """Key dim of the state: ``2 e`` in an LRPE layer, ``e`` elsewhere."""
        return self.head_dim(d_model) * (2 if layer_index in self.lrpe_layers else 1)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's head slopes (float64): ``2^(-8 (h + 1) / H)`` for a power of 2; otherwise the
    slopes of the power of 2 below ``H``, then every other slope of twice that power."""
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} must be >= 1")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return np.asarray(power_of_two(num_heads))
    below = 2 ** math.floor(math.log2(num_heads))
    extra = alibi_slopes(2 * below)[0::2][: num_heads - below]
    return np.concatenate([power_of_two(below), extra])


def layer_log_decays(
    num_heads: int, layer_index: Int[Array, ""] | int, num_layers: int
) -> Float[Array, " H"]:
    """``log lambda_{h,l} = -m_h (1 - l / (L - 1) + 1e-5)``, float32 ``[H]`` (all < 0).

    ``layer_index`` may be traced (a scanned layer). A one-layer model (``L = 1``, where the
    released formula divides by zero) takes ``l / (L - 1) = 0``: its layer is the lowest.
    """
    slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
    depth = jnp.asarray(layer_index, jnp.float32) / max(num_layers - 1, 1)
    return -slopes * (1.0 - depth + TOP_LAYER_DECAY_OFFSET)


def lrpe_theta_init(num_heads: int, head_dim: int) -> np.ndarray:
    """LRPE's initial frequencies ``[H, e]``: ``base^(-2 j / (H e))`` for ``j = h e + i``, so
    every head starts on its own band."""
    total = num_heads * head_dim
    return (LRPE_BASE ** (-2.0 * np.arange(total) / total)).reshape(num_heads, head_dim)


def apply_lrpe(
    x: Float[Array, "B T H e"], theta: Float[Array, "H e"], positions: Int[Array, "B T"]
) -> Float[Array, "B T H 2e"]:
    """``[x cos(theta t), x sin(theta t)]``: ``lrpe(q_t) . lrpe(k_s) = sum_i q_i k_i
    cos(theta_i (t - s))``. Angles in float32 or wider; the result has ``x``'s dtype."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    angles = positions.astype(dtype)[:, :, None, None] * theta.astype(dtype)  # [B, T, H, e]
    wide = x.astype(dtype)
    return jnp.concatenate([wide * jnp.cos(angles), wide * jnp.sin(angles)], axis=-1).astype(
        x.dtype
    )


class TransNormerAttention(StateSizeFromCache, nn.Module):
    """TransNormerLLM's token mixer: ``[B, T, d] -> [B, T, d]``.

    Parameters (``H`` heads, ``e`` head dim, ``n = H e``): ``qkvu_proj`` kernel
    ``[d, 4, H, e]`` (rows q, k, v, u of the released ``qkvu_proj``), ``out_proj`` ``[H, e, d]``,
    and in an LRPE layer ``lrpe_theta [H, e]``; no biases, no norm weights.
    """

    config: TransNormerConfig
    context: MixerContext

    takes_layer_index: ClassVar[bool] = True

    @property
    def uses_lrpe(self) -> bool:
        return self.context.layer_index in self.config.lrpe_layers

    def setup(self) -> None:
        config, context = self.config, self.context
        heads, head_dim = config.heads, config.head_dim(context.d_model)
        self.qkvu_proj = Projection(
            (context.d_model,),
            (4, heads, head_dim),
            ("embed", None, "heads", "head_dim"),
            context.init_std,
            context.compute_dtype,
        )
        self.out_proj = head_output_projection(context, heads, head_dim)
        if self.uses_lrpe:
            theta = lrpe_theta_init(heads, head_dim)
            self.lrpe_theta = logical_param(
                self,
                "lrpe_theta",
                lambda key, shape, dtype=jnp.float32: jnp.asarray(theta, dtype),
                ("heads", "head_dim"),
                (heads, head_dim),
            )

    def _log_decay(self, layer_index: Array | None) -> Array:
        index = self.context.layer_index if layer_index is None else layer_index
        return layer_log_decays(self.config.heads, index, self.context.num_layers)

    def _project(self, x: Array, positions: Array) -> tuple[Array, Array, Array, Array]:
        """``x [B, T, d]`` at ``positions [B, T]`` -> q, k (activated, LRPE'd), v, u."""
        qkvu = self.qkvu_proj(x)
        q, k = jax.nn.silu(qkvu[..., 0, :, :]), jax.nn.silu(qkvu[..., 1, :, :])
        if self.uses_lrpe:
            q = apply_lrpe(q, self.lrpe_theta, positions)
            k = apply_lrpe(k, self.lrpe_theta, positions)
        return q, k, qkvu[..., 2, :, :], qkvu[..., 3, :, :]

    def _output(self, attended: Array, u: Array) -> Array:
        """``out_proj(srmsnorm(o over all heads) * u)``; ``attended, u [..., H, e]``."""
        shape = attended.shape
        flat = attended.reshape(*shape[:-2], shape[-2] * shape[-1])
        normed = simple_rms_normalize(flat, self.context.norm_eps).reshape(shape)
        return self.out_proj(normed.astype(u.dtype) * u)

    def _attend(self, x: Array, lengths: Array | None, layer_index: Array | None, state: bool):
        batch, seq = x.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        q, k, v, u = self._project(x, positions)
        log_decay = self._log_decay(layer_index)
        mask = valid_mask(lengths, seq)
        if mask is not None:
            # Padding enters with k = v = 0 and no decay: the state stays the valid tokens'.
            k, v = (jnp.where(mask[..., None, None], part, 0) for part in (k, v))
            log_decay = jnp.where(mask[..., None], log_decay, 0.0)
        result = linear_attention(
            q,
            k,
            v,
            feature_map="identity",
            algorithm=self.config.algorithm,
            chunk_size=self.config.chunk_size,
            return_state=state,
            implementation=self.context.implementation,
            log_decay=log_decay,
            normalize=False,
        )
        return result, u

    def __call__(
        self, x: Float[Array, "B T D"], layer_index: Int[Array, ""] | None = None
    ) -> Float[Array, "B T D"]:
        attended, u = self._attend(x, None, layer_index, state=False)
        return self._output(attended, u)

    def prefill(
        self,
        x: Float[Array, "B T D"],
        max_len: int,
        lengths: Int[Array, " B"] | None = None,
        layer_index: Int[Array, ""] | None = None,
    ) -> tuple[Float[Array, "B T D"], LinearAttentionState]:
        """Forward over prompts at positions ``0 .. T-1``; also the state after each row's last
        valid token (``lengths``: padding neither decays nor enters it)."""
        del max_len  # the state does not grow
        (attended, state), u = self._attend(x, lengths, layer_index, state=True)
        if lengths is not None:
            pads = x.shape[1] - jnp.asarray(lengths, jnp.int32)
            state = discount_padding(state, pads, "identity")
        return self._output(attended, u), state

    def decode_step(
        self,
        x: Float[Array, "B D"],
        cache: LinearAttentionState,
        position: Int[Array, " B"],
        layer_index: Int[Array, ""] | None = None,
    ) -> tuple[Float[Array, "B D"], LinearAttentionState]:
        """One token per row at absolute ``position [B]`` (LRPE's angle)."""
        positions = jnp.asarray(position, jnp.int32)[:, None]
        q, k, v, u = self._project(x[:, None], positions)
        attended, cache = linear_attention_step(
            q[:, 0],
            k[:, 0],
            v[:, 0],
            cache,
            feature_map="identity",
            log_decay=self._log_decay(layer_index),
            normalize=False,
        )
        return self._output(attended, u[:, 0]), cache

    def init_cache(self, batch_size: int, max_len: int) -> LinearAttentionState:
        del max_len
        config, d = self.config, self.context.d_model
        return init_linear_attention_state(
            batch_size,
            config.heads,
            config.key_dim(d, self.context.layer_index),
            config.head_dim(d),
        )

    def flops(self, seq_len: int) -> float:
        """Projections (``d -> 4n``, ``n -> d``) and the chunked scan per head: intra-chunk
        scores and weighted sums, the state read and update."""
        config, d = self.config, self.context.d_model
        width, heads, value = config.width(d), config.heads, config.head_dim(d)
        key = config.key_dim(d, self.context.layer_index)
        chunk = min(config.chunk_size, seq_len)
        per_head = 2 * chunk * key + 2 * chunk * value + 4 * key * value
        return 2 * d * 4 * width + 2 * width * d + heads * per_head
