"""What every mixer is: its config base class, the model context it reads, and its protocol.

A mixer is one unit (see docs/adding_a_mixer.md): one module under ``jaxbased/layers/`` that holds

- a frozen config dataclass derived from :class:`MixerConfig`, which checks its own fields when
  built and, in :meth:`MixerConfig.validate`, what depends on the model (``d_model``);
- a Flax Linen module with the fields ``config`` (that dataclass) and ``context``
  (:class:`MixerContext`), implementing :class:`Mixer`;
- a registered pytree type for its decode cache;

and one entry in ``jaxbased.layers.registry``. Nothing else names the mixer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, Protocol, Self, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

#: Activation dtypes; ``float64`` (with ``jax_enable_x64``) is for numerical checks.
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True)
class MixerContext:
    """The model-level facts a mixer reads (built by ``ModelConfig.mixer_context``).

    Attributes:
      d_model: width of the residual stream (the mixer's input and output width).
      num_layers: blocks in the model (scales the output projections' init).
      dtype: activation dtype name (``float32``, ``bfloat16`` or ``float64``).
      init_std: standard deviation of linear weights.
      norm_eps: epsilon of the norms inside mixers.
      implementation: ``auto``, ``xla`` or ``pallas`` for the ops with kernels.
      layer_index: the layer this mixer is built for (0-based). Static: it may shape the
        parameters or the cache (with a matching :meth:`MixerConfig.layer_variant`). In a
        scanned unit it is the layer of the unit's first repeat; a mixer whose values (not
        shapes) depend on the layer reads the run-time index instead (:data:`TAKES_LAYER_INDEX`).
      shares_attention: this layer reuses an earlier anchor layer's attention probabilities
        (EchoAtt, ``ModelConfig.attention_sharing``, docs/echoatt.md): it has no query or key
        projection. Only set for mixers whose config
        :meth:`~MixerConfig.supports_attention_sharing`.
    """

    d_model: int = 1024
    num_layers: int = 1
    dtype: str = "float32"
    init_std: float = 0.02
    norm_eps: float = 1e-5
    implementation: str = "auto"
    layer_index: int = 0
    shares_attention: bool = False

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The activation dtype as a NumPy dtype."""
        return jnp.dtype(self.dtype)

    @property
    def output_init_std(self) -> float:
        """Init std of every output projection: ``init_std / sqrt(2 * num_layers)``."""
        return self.init_std / math.sqrt(2 * self.num_layers)


def _field_names(config_type: type) -> list[str]:
    return [field.name for field in dataclasses.fields(config_type)]


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Base of every mixer's config: frozen, checked on construction.

    Subclasses declare their fields with defaults, check them in :meth:`check` (use the
    ``require_*`` helpers of this module) and check what depends on the model in
    :meth:`validate`. Error messages start with the field name; ``ModelConfig`` prefixes the
    section (``based.feature_dim=0 must be ...``).
    """

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` for a field value that is invalid on its own."""

    def validate(self, context: MixerContext) -> None:
        """Raise ``ValueError`` for a field value that does not fit the model (``context``)."""
        del context

    def layer_variant(self, layer_index: int, num_layers: int) -> Hashable:
        """What sets layer ``layer_index``'s parameter or cache shapes apart from the other
        layers of this mixer (None: nothing). Layers of different variants never share a scanned
        body (``jaxbased.layer_layout``); values that only differ per layer (a decay computed
        from the index) need no variant, the run-time ``layer_index`` carries them."""
        del layer_index, num_layers

    def supports_attention_sharing(self) -> bool:
        """Whether a layer of this mixer can be an EchoAtt anchor or sharer: it computes causal
        softmax probabilities over all earlier tokens (full attention), which a sharing layer
        reuses with its own values (docs/echoatt.md). False unless a mixer says otherwise."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """Build from a mapping of field names; an unknown name is a ``ValueError``."""
        allowed = _field_names(cls)
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown fields {unknown}; allowed: {allowed}")
        return cls(**dict(values))

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (checked again)."""
        return type(self).from_dict({**self.to_dict(), **changes})


# Field checks -------------------------------------------------------------------------------
def require_positive_int(config: Any, *names: str, optional: bool = False) -> None:
    """Each field in ``names`` is an ``int >= 1`` (or None when ``optional``)."""
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = "an integer >= 1" + (" or None" if optional else "")
            raise ValueError(f"{name}={value!r} must be {allowed}")


def require_positive(config: Any, *names: str) -> None:
    """Each field in ``names`` is a number ``> 0``."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name}={value!r} must be a number > 0")


def require_choice(config: Any, name: str, allowed: Iterable[str]) -> None:
    """Field ``name`` is one of ``allowed``."""
    allowed = tuple(allowed)
    value = getattr(config, name)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; allowed: {allowed}")


def require_bool(config: Any, *names: str) -> None:
    """Each field in ``names`` is ``True`` or ``False``."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be True or False")


def require_divides(name: str, value: int, what: str, total: int) -> None:
    """``value`` (field ``name``) divides ``total`` (described by ``what``)."""
    if total % value:
        raise ValueError(f"{name}={value} must divide {what}={total}")


# Caches --------------------------------------------------------------------------------------
@flax.struct.dataclass
class EmptyCache:
    """The decode cache of a mixer that keeps no state (it acts on each token alone)."""


def count_state_floats(cache: Any) -> int:
    """Floating-point entries of a cache pytree (arrays or ``ShapeDtypeStruct``s); integer
    bookkeeping such as a KV cache's slot positions is not state and is not counted."""
    return sum(
        math.prod(leaf.shape)
        for leaf in jax.tree_util.tree_leaves(cache)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    )


#: The Flax collection where mixers report per-layer scalars (``report_metric``); training
#: logs them per layer as ``mixer/layer{i}/{name}`` (``jaxbased.model.mixer_metrics``).
METRICS_COLLECTION = "mixer_metrics"


def report_metric(module: Any, name: str, value: Array) -> None:
    """Report the float32 scalar ``value`` as metric ``name`` of ``module``'s layer (kept only
    when the caller applies the model with ``mutable=[METRICS_COLLECTION]``)."""
    module.sow(
        METRICS_COLLECTION,
        name,
        jnp.asarray(value, jnp.float32),
        init_fn=lambda: jnp.zeros((), jnp.float32),
        reduce_fn=lambda _, new: new,
    )


#: Name of a mixer class attribute: when True, the model passes ``layer_index=`` (an int32
#: scalar, traced in a scanned unit) to the mixer's ``__call__``, ``prefill`` and
#: ``decode_step``; such a mixer computes what depends on its layer from it with array ops.
TAKES_LAYER_INDEX = "takes_layer_index"


def takes_layer_index(mixer: Any) -> bool:
    """Whether ``mixer`` (a module or its class) takes the run-time ``layer_index``."""
    return bool(getattr(mixer, TAKES_LAYER_INDEX, False))


#: Name of a mixer property: when True, the mixer's ``prefill`` takes
#: ``recycled_attention=`` (a ``RecycledAttentionPolicy``) and then returns a cache whose
#: ``decode_step`` follows that policy (full softmax attention only; docs/recycled_attention.md).
ACCEPTS_RECYCLED_ATTENTION = "accepts_recycled_attention"


def accepts_recycled_attention(mixer: Any) -> bool:
    """Whether the mixer module ``mixer`` (an instance, bound or not) decodes under a Recycled
    Attention policy."""
    return getattr(mixer, ACCEPTS_RECYCLED_ATTENTION, False) is True


@runtime_checkable
class Mixer(Protocol):
    """What the model calls on every mixer (a Flax module with ``config`` and ``context``).

    ``flops``, ``state_size`` and ``init_cache`` read the config alone: they work on an unbound
    module (``module_type(config, context, parent=None)``).
    """

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        """Training/evaluation forward over whole sequences."""
        ...

    def prefill(
        self, x: Float[Array, "B T D"], max_len: int, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], Any]:
        """Forward over right-padded prompts (valid length ``lengths[b]``, default ``T``) and the
        cache after each row's last valid token; ``max_len`` bounds prompt + generated tokens."""
        ...

    def decode_step(
        self, x: Float[Array, "B D"], cache: Any, position: Int[Array, " B"]
    ) -> tuple[Float[Array, "B D"], Any]:
        """One token per row at absolute ``position``; returns its output and the new cache."""
        ...

    def init_cache(self, batch_size: int, max_len: int) -> Any:
        """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens."""
        ...

    def flops(self, seq_len: int) -> float:
        """Forward FLOPs per token at sequence length ``seq_len`` (2 per multiply-add)."""
        ...

    def state_size(self, seq_len: int) -> int:
        """Floats of decode state per sequence after ``seq_len`` tokens."""
        ...


class StateSizeFromCache:
    """Mixin: ``state_size(seq_len)`` counted from the shapes of ``init_cache(1, seq_len)``."""

    def state_size(self, seq_len: int) -> int:
        """Floats of decode state per sequence after ``seq_len`` tokens (from the cache)."""
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        return count_state_floats(jax.eval_shape(lambda: self.init_cache(1, seq_len)))
