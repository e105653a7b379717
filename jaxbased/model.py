"""The language model (docs/model.md): embedding, pre-norm blocks following a layer pattern,
final RMSNorm, head tied to the embedding.

    h = mixer(norm1(x)); x = x + h; h = mlp(norm2(x)); x = x + h;  logits = final_norm(x) · Eᵀ

The residual stream ``x`` is float32; mixers and MLPs run in ``config.dtype``. Logits are float32
over the padded vocabulary (``config.padded_vocab_size`` columns, as in the reference).

Generation: ``prefill(tokens, max_len)`` runs the parallel forms and returns every layer's cache;
``decode_step(tokens, cache)`` consumes one token per row. ``init_cache`` builds an empty cache
from the config alone (no parameters needed).

``config.remat`` wraps every block in ``nn.remat`` with the policy of ``REMAT_POLICY``;
``config.scan_layers`` runs the pattern's repeating unit under ``nn.scan``
(:mod:`jaxbased.layer_layout`: stacked parameters, and caches stacked per unit position).

Each block knows its layer index: statically (``MixerContext.layer_index``, what may shape a
layer's parameters) and at run time, passed to the mixers that take it
(``jaxbased.layers.mixer.takes_layer_index``); under the scan the run-time index is a scanned
input, so layers whose constants depend on their index still share one body
(docs/model.md#layer-index).

EchoAtt (``config.attention_sharing``, docs/echoatt.md): an anchor block also returns its
attention probabilities, and the layer loop hands them to the blocks that share them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.layer_layout import LAYER_AXIS, ScanPlan, scan_plan
from jaxbased.layers.common import make_norm, normal_init
from jaxbased.layers.mixer import (
    METRICS_COLLECTION,
    Mixer,
    accepts_recycled_attention,
    takes_layer_index,
)
from jaxbased.layers.mlp import GatedMLP
from jaxbased.layers.registry import MIXERS, build_mixer
from jaxbased.ops.dispatch import constrain_batch
from jaxbased.ops.recycled_attention import RecycledAttentionPolicy
from jaxbased.ops.shared_attention import ValueCache

#: A layer's decode cache: an instance of its mixer's registered ``cache_type``.
LayerCache = Any


@flax.struct.dataclass
class ModelCache:
    """Decoding state of the whole model.

    layers: one cache per layer, of its mixer's registered cache type
      (``jaxbased.layers.registry.MIXERS[name].cache_type``). A scanned model
      (``config.scan_layers``) has one cache per head layer, then one per position of its
      repeating unit, every leaf stacked ``[repeats, ...]`` over the unit's repeats, then one
      per remainder layer. A layer that shares an anchor's attention probabilities
      (EchoAtt, ``config.attention_sharing``) holds a
      :class:`~jaxbased.ops.shared_attention.ValueCache` (values only). Under a Recycled
      Attention policy (``prefill(...,
      recycled_attention=...)``) full-attention layers hold a
      :class:`~jaxbased.ops.recycled_attention.RecycledKVCache` instead.
    positions: ``[B]`` int32, the position the next token of each row takes.
    """

    layers: tuple[LayerCache, ...]
    positions: Int[Array, " B"]


def layer_mixer(config: ModelConfig, name: str, layer_index: int = 0, **kwargs: Any) -> Mixer:
    """The mixer module of layer ``layer_index``, named ``name`` in ``config.layer_pattern``
    (``kwargs`` go to the module, e.g. ``parent=None`` for an unbound one that only counts or
    builds caches)."""
    return build_mixer(name, getattr(config, name), config.layer_context(layer_index), **kwargs)


class Block(nn.Module):
    """Pre-norm block: mixer then (if ``config.use_mlp``) gated MLP, each added to the float32
    residual.

    ``layer_index`` is the static index its mixer is built for; each method also takes the
    run-time index (default: the static one), passed on to a mixer that takes it.
    """

    config: ModelConfig
    mixer_name: str
    layer_index: int = 0

    def setup(self) -> None:
        config = self.config
        self.norm1 = make_norm(config.norm, config.d_model, config.norm_eps, config.compute_dtype)
        self.mixer = layer_mixer(config, self.mixer_name, self.layer_index)
        if config.use_mlp:
            self.norm2 = make_norm(
                config.norm, config.d_model, config.norm_eps, config.compute_dtype
            )
            self.mlp = GatedMLP(config.mlp, config.mixer_context)

    def _mlp(self, x: Array) -> Array:
        if not self.config.use_mlp:
            return x
        return x + self.mlp(self.norm2(x)).astype(x.dtype)

    def _index(self, layer_index: Array | int | None) -> dict[str, Array]:
        """``{"layer_index": index}`` for a mixer that takes it, else nothing."""
        if not takes_layer_index(self.mixer):
            return {}
        index = self.layer_index if layer_index is None else layer_index
        return {"layer_index": jnp.asarray(index, jnp.int32)}

    def _add(self, x: Array, h: Array) -> Array:
        """The residual add of the mixer's output, then ``config.residual_activation``."""
        x = x + h.astype(x.dtype)
        return jax.nn.silu(x) if self.config.residual_activation == "silu" else x

    @property
    def is_attention_anchor(self) -> bool:
        """EchoAtt: a later layer reuses this layer's attention probabilities, so every method
        also returns them (last)."""
        return self.layer_index in self.config.anchor_layers

    def _sharing(self, shared_probabilities: Array | None) -> dict[str, Any]:
        """The EchoAtt keyword arguments of this layer's mixer."""
        if self.layer_index in self.config.attention_anchors:
            return {"shared_probabilities": shared_probabilities}
        if self.is_attention_anchor:
            return {"return_probabilities": True}
        return {}

    def __call__(
        self,
        x: Float[Array, "B T D"],
        layer_index: Array | int | None = None,
        shared_probabilities: Float[Array, "B H T T"] | None = None,
    ) -> Float[Array, "B T D"] | tuple[Float[Array, "B T D"], Float[Array, "B H T T"]]:
        """The block's output; an EchoAtt anchor also returns its attention probabilities
        ``[B, H, T, T]``, a sharing layer takes its anchor's as ``shared_probabilities``."""
        extra = self._index(layer_index) | self._sharing(shared_probabilities)
        out = self.mixer(self.norm1(x), **extra)
        if self.is_attention_anchor:
            h, probabilities = out
            return self._mlp(self._add(x, h)), probabilities
        return self._mlp(self._add(x, out))

    @property
    def has_attention_map(self) -> bool:
        """Whether this layer attends by causal softmax probabilities over all earlier tokens
        (its own, or an anchor's when it shares): what
        :meth:`with_attention_probabilities` returns."""
        return getattr(self.config, self.mixer_name).supports_attention_sharing()

    def with_attention_probabilities(
        self,
        x: Float[Array, "B T D"],
        shared_probabilities: Float[Array, "B H T T"] | None = None,
    ) -> tuple[Float[Array, "B T D"], Float[Array, "B H T T"] | None]:
        """The block's output and the attention probabilities ``[B, H, T, T]`` (float32) its
        mixer applied: computed for a full-attention layer, the anchor's for a sharing one,
        None for other mixers (EchoAtt's similarity analysis, docs/echoatt.md)."""
        extra = self._index(None)
        if self.layer_index in self.config.attention_anchors:
            h = self.mixer(self.norm1(x), shared_probabilities=shared_probabilities, **extra)
            probabilities = shared_probabilities
        elif self.has_attention_map:
            h, probabilities = self.mixer(self.norm1(x), return_probabilities=True, **extra)
        else:
            h, probabilities = self.mixer(self.norm1(x), **extra), None
        return self._mlp(self._add(x, h)), probabilities

    def prefill(
        self,
        x: Float[Array, "B T D"],
        max_len: int,
        lengths: Int[Array, " B"] | None = None,
        layer_index: Array | int | None = None,
        recycled_attention: RecycledAttentionPolicy | None = None,
        shared_probabilities: Float[Array, "B H T T"] | None = None,
    ) -> tuple[Any, ...]:
        """``(x, cache)`` (and an EchoAtt anchor's probabilities last). ``recycled_attention``
        goes to a mixer that accepts it (full attention); others ignore it."""
        extra = self._index(layer_index) | self._sharing(shared_probabilities)
        if recycled_attention is not None and accepts_recycled_attention(self.mixer):
            extra["recycled_attention"] = recycled_attention
        h, cache, *probabilities = self.mixer.prefill(self.norm1(x), max_len, lengths, **extra)
        return (self._mlp(self._add(x, h)), cache, *probabilities)

    def decode_step(
        self,
        x: Float[Array, "B D"],
        cache: LayerCache,
        position: Int[Array, " B"],
        layer_index: Array | int | None = None,
        shared_probabilities: Float[Array, "B H S"] | None = None,
    ) -> tuple[Any, ...]:
        """``(x, cache)`` (and an EchoAtt anchor's probabilities over its cache slots last)."""
        extra = self._index(layer_index) | self._sharing(shared_probabilities)
        h, cache, *probabilities = self.mixer.decode_step(self.norm1(x), cache, position, **extra)
        return (self._mlp(self._add(x, h)), cache, *probabilities)


#: ``config.remat`` -> the ``jax.checkpoint`` policy of each block (None: no remat). ``minimal``
#: saves the outputs of matmuls without batch dimensions (every projection: QKV, output, MLP,
#: in/out projections of the state-space mixers) and recomputes the elementwise work, the
#: batched matmuls (attention scores, the mixers' chunk states and their products) and norms;
#: ``full`` saves nothing inside a block, only its input.
REMAT_POLICY: dict[str, Any] = {
    "none": None,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def block_class(config: ModelConfig, *, scanned: bool) -> type[Block]:
    """``Block``, wrapped in ``nn.remat`` with the policy of ``config.remat`` (only its
    ``__call__``: prefill and decoding keep no activations for a backward pass). ``scanned``
    blocks run inside ``nn.scan``, which already keeps XLA from merging the recomputation with
    the forward (so ``prevent_cse`` is off there)."""
    policy = REMAT_POLICY[config.remat]
    if policy is None:
        return Block
    return nn.remat(Block, policy=policy, prevent_cse=not scanned)


class RepeatedUnit(nn.Module):
    """The blocks of one repeat of a scanned model's unit (``block_0``, ``block_1``, ...), run
    in order; :class:`LanguageModel` scans it ``plan.repeats`` times.

    ``first_layer`` is the layer index of the first repeat's ``block_0`` (static: it builds the
    blocks); each method takes the repeat's own first layer index (a scanned int32 scalar), and
    block ``j`` runs as layer ``first + j``.
    """

    config: ModelConfig
    unit: tuple[str, ...]
    first_layer: int = 0

    def setup(self) -> None:
        block = block_class(self.config, scanned=True)
        self.block = [
            block(self.config, name, self.first_layer + j) for j, name in enumerate(self.unit)
        ]

    def __call__(self, x: Float[Array, "B T D"], first: Array) -> Float[Array, "B T D"]:
        for j, block in enumerate(self.block):
            x = constrain_batch(block(x, first + j))
        return x

    def prefill(
        self,
        x: Float[Array, "B T D"],
        max_len: int,
        lengths: Int[Array, " B"] | None,
        first: Array,
        recycled_attention: RecycledAttentionPolicy | None = None,
    ) -> tuple[Array, tuple[LayerCache, ...]]:
        caches = []
        for j, block in enumerate(self.block):
            x, cache = block.prefill(x, max_len, lengths, first + j, recycled_attention)
            x = constrain_batch(x)
            caches.append(cache)
        return x, tuple(caches)

    def decode_step(
        self,
        x: Float[Array, "B D"],
        caches: tuple[LayerCache, ...],
        position: Int[Array, " B"],
        first: Array,
    ) -> tuple[Array, tuple[LayerCache, ...]]:
        new_caches = []
        for j, (block, cache) in enumerate(zip(self.block, caches, strict=True)):
            x, cache = block.decode_step(x, cache, position, first + j)
            new_caches.append(cache)
        return x, tuple(new_caches)


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
        plan = scan_plan(config)
        scanned = range(0) if plan is None else plan.scanned_range
        if plan is not None:  # named layer_layout.SCANNED_LAYERS
            self.scanned_layers = RepeatedUnit(config, plan.unit, plan.start)
        block = block_class(config, scanned=False)
        # A dict named by layer index keeps the unrolled names ``layers_{i}`` (flax names a
        # dict attribute's modules ``{attribute}_{key}``).
        self.layers = {
            str(index): block(config, config.layer_pattern[index], index)
            for index in range(config.num_layers)
            if index not in scanned
        }
        residual_dtype = jnp.promote_types(config.compute_dtype, jnp.float32)
        self.final_norm = make_norm(config.norm, config.d_model, config.norm_eps, residual_dtype)

    def _embed(self, tokens: Array) -> Array:
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integers; got dtype {tokens.dtype}")
        residual_dtype = jnp.promote_types(self.config.compute_dtype, jnp.float32)
        x = jnp.take(self.embedding, tokens, axis=0).astype(residual_dtype)
        if self.config.scale_embedding:
            x = x * jnp.asarray(self.config.d_model**0.5, residual_dtype)
        return x

    def _logits(self, x: Array) -> Array:
        return jnp.einsum("...d,vd->...v", self.final_norm(x), self.embedding)

    @property
    def _plan(self) -> ScanPlan | None:
        return scan_plan(self.config)

    def _unrolled_blocks(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The blocks that run unrolled before and after the scanned ones (all of them before,
        for an unrolled model)."""
        plan = self._plan
        start = self.config.num_layers if plan is None else plan.start
        blocks = [(int(key), self.layers[key]) for key in sorted(self.layers, key=int)]
        return (
            [block for index, block in blocks if index < start],
            [block for index, block in blocks if index >= start],
        )

    def _scan_unit(self, body: Any, carry: Array, xs: Any) -> tuple[Array, Any]:
        """``nn.scan`` of ``body(unit, carry, (first, xs_row)) -> (carry, ys_row)`` over the
        unit's repeats, its parameters stacked on a leading ``layers`` axis; ``first`` is the
        repeat's first layer index (int32)."""
        plan = self._plan
        scan = nn.scan(
            body,
            variable_axes={"params": 0, METRICS_COLLECTION: 0},
            split_rngs={"params": True},
            length=plan.repeats,
            metadata_params={nn.PARTITION_NAME: LAYER_AXIS},
        )
        firsts = plan.start + len(plan.unit) * jnp.arange(plan.repeats, dtype=jnp.int32)
        return scan(self.scanned_layers, carry, (firsts, xs))

    def _anchor_input(self, block: nn.Module, probabilities: dict[int, Array]) -> Array | None:
        """EchoAtt: the probabilities of ``block``'s anchor layer (None: it does not share)."""
        anchor = self.config.attention_anchors.get(block.layer_index)
        return None if anchor is None else probabilities[anchor]

    def _hidden(self, tokens: Array, block_outputs: list[Array] | None = None) -> Array:
        """The residual stream after the last block ``[B, T, D]``; each unrolled block's
        output is appended to ``block_outputs`` when given."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}")
        x = constrain_batch(self._embed(tokens))
        head, tail = self._unrolled_blocks()
        probabilities: dict[int, Array] = {}  # EchoAtt: anchor layer -> its probabilities

        def run(block: nn.Module, x: Array) -> Array:
            out = block(x, None, self._anchor_input(block, probabilities))
            if block.is_attention_anchor:
                out, probabilities[block.layer_index] = out
            out = constrain_batch(out)
            if block_outputs is not None:
                block_outputs.append(out)
            return out

        for block in head:
            x = run(block, x)
        if self._plan is not None:
            if block_outputs is not None:
                raise ValueError("block outputs need an unrolled model (scan_layers=False)")
            x, _ = self._scan_unit(lambda unit, x, xs: (unit(x, xs[0]), None), x, None)
        for block in tail:
            x = run(block, x)
        return x

    def attention_probabilities(
        self, tokens: Int[Array, "B T"]
    ) -> tuple[Float[Array, "B H T T"], ...]:
        """The causal softmax probabilities ``[B, H, T, T]`` (float32) of every layer that has
        them (``config.attention_map_layers``, in order); unrolled models only. EchoAtt's
        similarity analysis (docs/echoatt.md).

        Call it as ``model.apply(variables, tokens, method="attention_probabilities")``.
        """
        if self._plan is not None:
            raise ValueError("attention_probabilities needs an unrolled model (scan_layers=False)")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}")
        x = self._embed(tokens)
        head, _ = self._unrolled_blocks()
        probabilities: dict[int, Array] = {}
        maps = []
        for block in head:
            x, block_map = block.with_attention_probabilities(
                x, self._anchor_input(block, probabilities)
            )
            if block_map is not None:
                probabilities[block.layer_index] = block_map
                maps.append(block_map)
        return tuple(maps)

    def with_block_outputs(
        self, tokens: Int[Array, "B T"]
    ) -> tuple[Float[Array, "B T V"], tuple[Float[Array, "B T D"], ...]]:
        """Logits ``[B, T, V]`` and every block's output (the residual stream after layer
        ``i``, ``[B, T, D]`` float32, one per layer); unrolled models only. Used by
        distillation (docs/echoatt.md).

        Call it as ``model.apply(variables, tokens, method="with_block_outputs")``.
        """
        block_outputs: list[Array] = []
        x = self._hidden(tokens, block_outputs)
        return self._logits(x), tuple(block_outputs)

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
        recycled_attention: RecycledAttentionPolicy | None = None,
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

        ``recycled_attention``: full-attention layers decode under this Recycled Attention
        policy; their caches are then
        :class:`~jaxbased.ops.recycled_attention.RecycledKVCache` (docs/recycled_attention.md).
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
        # Under a time-split mesh (``sequence`` > 1 dividing T) the prompt stays split over
        # time at every block boundary, as in training, and every mixer's prefill runs its
        # sequence-parallel form; the caches come out replicated over ``sequence``, equal to an
        # unsharded prefill's (docs/sequence_parallelism.md#prefill).
        x = constrain_batch(self._embed(tokens))
        caches = []
        head, tail = self._unrolled_blocks()
        policy = recycled_attention
        if policy is not None and self.config.attention_sharing:
            raise ValueError(
                "recycled_attention does not combine with attention_sharing (EchoAtt); decode "
                "this model without a Recycled Attention policy"
            )
        probabilities: dict[int, Array] = {}  # EchoAtt: anchor layer -> its probabilities

        def run(block: nn.Module, x: Array) -> Array:
            x, cache, *anchor = block.prefill(
                x,
                max_len,
                lengths,
                recycled_attention=policy,
                shared_probabilities=self._anchor_input(block, probabilities),
            )
            if anchor:
                probabilities[block.layer_index] = anchor[0]
            caches.append(cache)
            return constrain_batch(x)

        for block in head:
            x = run(block, x)
        if self._plan is not None:
            x, unit_caches = self._scan_unit(
                lambda unit, x, xs: unit.prefill(x, max_len, lengths, xs[0], policy), x, None
            )
            caches.extend(unit_caches)
        for block in tail:
            x = run(block, x)
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
        layer_caches = list(cache.layers)
        head, tail = self._unrolled_blocks()
        probabilities: dict[int, Array] = {}  # EchoAtt: anchor layer -> [B, H, S]

        def run(block: nn.Module, x: Array, layer_cache: LayerCache) -> Array:
            x, layer_cache, *anchor = block.decode_step(
                x,
                layer_cache,
                cache.positions,
                shared_probabilities=self._anchor_input(block, probabilities),
            )
            if anchor:
                probabilities[block.layer_index] = anchor[0]
            new_caches.append(layer_cache)
            return x

        for block, layer_cache in zip(head, layer_caches[: len(head)], strict=True):
            x = run(block, x, layer_cache)
        layer_caches = layer_caches[len(head) :]
        if self._plan is not None:
            period = len(self._plan.unit)
            unit_caches, layer_caches = tuple(layer_caches[:period]), layer_caches[period:]
            x, unit_caches = self._scan_unit(
                lambda unit, x, xs: unit.decode_step(x, xs[1], cache.positions, xs[0]),
                x,
                unit_caches,
            )
            new_caches.extend(unit_caches)
        for block, layer_cache in zip(tail, layer_caches, strict=True):
            x = run(block, x, layer_cache)
        return self._logits(x), ModelCache(tuple(new_caches), cache.positions + 1)

    def init_cache(self, batch_size: int, max_len: int) -> ModelCache:
        """An empty cache (position 0) for ``batch_size`` rows of up to ``max_len`` tokens.

        Works on an unbound module: it reads only the config.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        config = self.config
        layers = tuple(
            layer_mixer(config, name, index, parent=None).init_cache(batch_size, max_len)
            for index, name in enumerate(config.layer_pattern)
        )
        sharing = config.attention_anchors
        for index, (name, layer) in enumerate(zip(config.layer_pattern, layers, strict=True)):
            if index in sharing and isinstance(layer, ValueCache):  # EchoAtt: values only
                continue
            if not isinstance(layer, MIXERS[name].cache_type):  # a mixer that broke its contract
                raise TypeError(
                    f"mixer {name!r} built a {type(layer).__name__} cache; its registry entry "
                    f"names {MIXERS[name].cache_type.__name__}"
                )
        plan = scan_plan(config)
        if plan is not None:  # the unit's caches stacked over its repeats
            period, start = len(plan.unit), plan.start
            stacked = tuple(
                jax.tree.map(lambda leaf: jnp.repeat(leaf[None], plan.repeats, axis=0), layer)
                for layer in layers[start : start + period]
            )
            layers = layers[:start] + stacked + layers[start + plan.scanned_layers :]
        return ModelCache(layers=layers, positions=jnp.zeros((batch_size,), jnp.int32))


def mixer_metrics(config: ModelConfig, collection: Any) -> dict[str, Array]:
    """The scalars mixers reported (``jaxbased.layers.mixer.report_metric``) in the
    ``METRICS_COLLECTION`` of an apply with ``mutable=[METRICS_COLLECTION]``, one per layer:
    ``{"mixer/layer{i}/{name}": value}`` (a scanned unit's stacked values split by repeat)."""
    metrics: dict[str, Array] = {}
    plan = scan_plan(config)
    for top, subtree in dict(collection or {}).items():
        if top == "scanned_layers":
            for block, values in subtree.items():
                position = int(block.rsplit("_", 1)[1])
                for name, value in values.get("mixer", {}).items():
                    for repeat in range(plan.repeats):
                        layer = plan.unit_layer(repeat, position)
                        metrics[f"mixer/layer{layer}/{name}"] = value[repeat]
        elif top.startswith("layers_"):
            for name, value in subtree.get("mixer", {}).items():
                metrics[f"mixer/layer{top.split('_', 1)[1]}/{name}"] = value
    return dict(sorted(metrics.items()))


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
