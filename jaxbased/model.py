"""The language model (docs/model.md): embedding, pre-norm blocks following a layer pattern,
final RMSNorm, head tied to the embedding.

    h = mixer(norm1(x)); x = x + h; h = mlp(norm2(x)); x = x + h;  logits = final_norm(x) · Eᵀ

The residual stream ``x`` is float32; mixers and MLPs run in ``config.dtype``. Logits are float32
over the padded vocabulary (``config.padded_vocab_size`` columns, as in the reference).

Generation: ``prefill(tokens, max_len)`` runs the parallel forms and returns every layer's cache;
``decode_step(tokens, cache)`` consumes one token per row. ``init_cache`` builds an empty cache
from the config alone (no parameters needed).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.layers.common import make_norm, normal_init
from jaxbased.layers.mixer import Mixer
from jaxbased.layers.mlp import GatedMLP
from jaxbased.layers.registry import MIXERS, build_mixer
from jaxbased.ops.dispatch import constrain_batch

#: A layer's decode cache: an instance of its mixer's registered ``cache_type``.
LayerCache = Any


@flax.struct.dataclass
class ModelCache:
    """Decoding state of the whole model.

    layers: one cache per layer, of its mixer's registered cache type
      (``jaxbased.layers.registry.MIXERS[name].cache_type``).
    positions: ``[B]`` int32, the position the next token of each row takes.
    """

    layers: tuple[LayerCache, ...]
    positions: Int[Array, " B"]


def layer_mixer(config: ModelConfig, name: str, **kwargs: Any) -> Mixer:
    """The mixer module of a layer named ``name`` in ``config.layer_pattern`` (``kwargs`` go to
    the module, e.g. ``parent=None`` for an unbound one that only counts or builds caches)."""
    return build_mixer(name, getattr(config, name), config.mixer_context, **kwargs)


class Block(nn.Module):
    """Pre-norm block: mixer then (if ``config.use_mlp``) gated MLP, each added to the float32
    residual."""

    config: ModelConfig
    mixer_name: str

    def setup(self) -> None:
        config = self.config
        self.norm1 = make_norm(config.norm, config.d_model, config.norm_eps, config.compute_dtype)
        self.mixer = layer_mixer(config, self.mixer_name)
        if config.use_mlp:
            self.norm2 = make_norm(
                config.norm, config.d_model, config.norm_eps, config.compute_dtype
            )
            self.mlp = GatedMLP(config.mlp, config.mixer_context)

    def _mlp(self, x: Array) -> Array:
        if not self.config.use_mlp:
            return x
        return x + self.mlp(self.norm2(x)).astype(x.dtype)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self._mlp(x + self.mixer(self.norm1(x)).astype(x.dtype))

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Array, LayerCache]:
        h, cache = self.mixer.prefill(self.norm1(x), max_len, lengths)
        return self._mlp(x + h.astype(x.dtype)), cache

    def decode_step(
        self, x: Float[Array, "B D"], cache: LayerCache, position: Int[Array, " B"]
    ) -> tuple[Array, LayerCache]:
        h, cache = self.mixer.decode_step(self.norm1(x), cache, position)
        return self._mlp(x + h.astype(x.dtype)), cache


class LanguageModel(nn.Module):
    """BASED / Transformer++ language model: ``tokens [B, T] -> logits [B, T, V]`` (float32)."""

    config: ModelConfig

    def setup(self) -> None:
        config = self.config
        self.embedding = self.param(
            "embedding",
            normal_init(config.init_std, ("vocab", "embed")),
            (config.padded_vocab_size, config.d_model),
            jnp.float32,
        )
        self.layers = [Block(config, name_) for name_ in config.layer_pattern]
        residual_dtype = jnp.promote_types(config.compute_dtype, jnp.float32)
        self.final_norm = make_norm(config.norm, config.d_model, config.norm_eps, residual_dtype)

    def _embed(self, tokens: Array) -> Array:
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integers; got dtype {tokens.dtype}")
        residual_dtype = jnp.promote_types(self.config.compute_dtype, jnp.float32)
        return jnp.take(self.embedding, tokens, axis=0).astype(residual_dtype)

    def _logits(self, x: Array) -> Array:
        return jnp.einsum("...d,vd->...v", self.final_norm(x), self.embedding)

    def _hidden(self, tokens: Array) -> Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}")
        x = constrain_batch(self._embed(tokens))
        for block in self.layers:
            x = constrain_batch(block(x))
        return x

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
        """Logits for every position of ``tokens [B, T]``."""
        return self._logits(self._hidden(tokens))

    def logits_at(
        self, tokens: Int[Array, "B T"], positions: Int[Array, "B P"]
    ) -> Float[Array, "B P V"]:
        """Logits at ``positions [B, P]`` of each row only, ``self(tokens)[b, positions[b, p]]``,
        without the head's ``[B, T, V]`` work elsewhere (MQAR's answers, a last token).

        Call it as ``model.apply(variables, tokens, positions, method="logits_at")``.
        """
        if positions.ndim != 2 or positions.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"positions must be [batch, count] with batch {tokens.shape[0]}; got shape "
                f"{positions.shape}"
            )
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise TypeError(f"positions must be integers; got dtype {positions.dtype}")
        x = self._hidden(tokens)
        return self._logits(jnp.take_along_axis(x, positions[:, :, None], axis=1))

    def prefill(
        self,
        tokens: Int[Array, "B T"],
        max_len: int,
        lengths: Int[Array, " B"] | None = None,
        last_logits_only: bool = False,
    ) -> tuple[Float[Array, "B T V"] | Float[Array, "B V"], ModelCache]:
        """Forward over prompts ``[B, T]`` and the caches after them.

        ``max_len`` is the total length (prompt + generated) that full-attention layers must hold;
        other layers' caches do not depend on it.

        ``lengths [B]`` (int): prompts of different lengths, right-padded to ``T``; row ``b`` is
        valid at positions ``< lengths[b]`` (``1 <= lengths[b] <= T``, not checked under jit).
        Valid logits never see the padding (the model is causal), every layer's cache holds only
        the valid tokens, and ``cache.positions = lengths``. Default: every row has ``T`` tokens.

        ``last_logits_only``: return only each row's logits at its last valid position, ``[B, V]``
        (skips the ``[B, T, V]`` head, which dominates memory for long prompts).
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}")
        batch, seq = tokens.shape
        if max_len < seq:
            raise ValueError(f"max_len={max_len} is shorter than the prompt length {seq}")
        if lengths is not None:
            lengths = jnp.asarray(lengths, jnp.int32)
            if lengths.shape != (batch,):
                raise ValueError(f"lengths must be [batch]={batch}; got shape {lengths.shape}")
        x = self._embed(tokens)
        caches = []
        for block in self.layers:
            x, cache = block.prefill(x, max_len, lengths)
            caches.append(cache)
        positions = jnp.full((batch,), seq, jnp.int32) if lengths is None else lengths
        if last_logits_only:
            x = jnp.take_along_axis(x, (positions - 1)[:, None, None], axis=1)[:, 0]
        return self._logits(x), ModelCache(layers=tuple(caches), positions=positions)

    def decode_step(
        self, tokens: Int[Array, " B"], cache: ModelCache
    ) -> tuple[Float[Array, "B V"], ModelCache]:
        """Feed one token per row at ``cache.positions``; return its logits and the new cache."""
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be [batch]; got shape {tokens.shape}")
        x = self._embed(tokens)
        new_caches = []
        for block, layer_cache in zip(self.layers, cache.layers, strict=True):
            x, layer_cache = block.decode_step(x, layer_cache, cache.positions)
            new_caches.append(layer_cache)
        return self._logits(x), ModelCache(tuple(new_caches), cache.positions + 1)

    def init_cache(self, batch_size: int, max_len: int) -> ModelCache:
        """An empty cache (position 0) for ``batch_size`` rows of up to ``max_len`` tokens.

        Works on an unbound module: it reads only the config.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        config = self.config
        layers = tuple(
            layer_mixer(config, name, parent=None).init_cache(batch_size, max_len)
            for name in config.layer_pattern
        )
        for name, layer in zip(config.layer_pattern, layers, strict=True):
            if not isinstance(layer, MIXERS[name].cache_type):  # a mixer that broke its contract
                raise TypeError(
                    f"mixer {name!r} built a {type(layer).__name__} cache; its registry entry "
                    f"names {MIXERS[name].cache_type.__name__}"
                )
        return ModelCache(layers=layers, positions=jnp.zeros((batch_size,), jnp.int32))


def count_parameters(params: Any) -> int:
    """Number of scalars in a parameter pytree (boxed or not, arrays or ShapeDtypeStructs)."""
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
    total = 0
    for leaf in leaves:
        size = 1
        for dim in leaf.shape:
            size *= dim
        total += size
    return total
