"""Model configuration: a frozen, validated dataclass with one section per mixer.

``ModelConfig`` holds the model-level fields (vocabulary, width, depth, the layer pattern, norms,
dtype, init, implementation) and one nested config per registered mixer, named after it:
``config.based.feature_dim``, ``config.sliding_window.window``, ``config.mamba2.chunk_size``,
``config.mlp.inner_dim`` (the blocks' gated MLP and ``mlp`` layers). The sections' classes live
with their mixers in ``jaxbased.layers``; the list of sections is the mixer registry
(``jaxbased.layers.registry.MIXERS``). See docs/configuration.md.

Build one from keyword arguments (``ModelConfig(d_model=512, based={"feature_dim": 8})``), from a
preset (``ModelConfig.from_preset``, presets in ``jaxbased.presets``) or from a mapping such as an
ml_collections ``ConfigDict`` or a checkpoint's stored config (``ModelConfig.from_dict``, which
also reads the flat configs written before the sections existed: ``jaxbased.config_legacy``).
Every invalid value raises ``ValueError`` naming the field (``based.feature_dim``), the value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp

from jaxbased.config_legacy import LEGACY_FIELDS, is_legacy_flat, upgrade_flat_config
from jaxbased.layers.common import NORMS
from jaxbased.layers.mixer import DTYPES, MixerConfig, MixerContext
from jaxbased.layers.registry import MIXER_NAMES, MIXERS
from jaxbased.ops.dispatch import IMPLEMENTATIONS

__all__ = [
    "DTYPES",
    "HYBRID_PATTERN_CHARACTERS",
    "MIXER_NAMES",
    "NORMS",
    "REMAT_POLICIES",
    "ModelConfig",
    "based_layer_pattern",
    "hybrid_layer_pattern",
]

#: Characters of a hybrid pattern string (Megatron-LM's ``hybrid_override_pattern``): ``M`` a
#: Mamba-2 layer, ``*`` a (full) attention layer, ``-`` an MLP layer.
HYBRID_PATTERN_CHARACTERS: MappingProxyType[str, str] = MappingProxyType(
    {"M": "mamba2", "*": "attention", "-": "mlp"}
)


def based_layer_pattern(
    num_layers: int,
    linear_attention_layers: Iterable[int],
    sliding_window_layers: Iterable[int],
) -> tuple[str, ...]:
    """The released BASED pattern: a layer is ``sliding_window`` if listed there, else ``based``
    if listed as linear attention, else ``base_conv`` (the reference's alt_mixer_2 / alt_mixer /
    mixer rule, docs/checkpoints.md)."""
    linear, sliding = set(linear_attention_layers), set(sliding_window_layers)
    for name, layers in (("linear_attention_layers", linear), ("sliding_window_layers", sliding)):
        outside = sorted(i for i in layers if not 0 <= i < num_layers)
        if outside:
            raise ValueError(f"{name} has layers {outside} outside 0..{num_layers - 1}")
    return tuple(
        "sliding_window" if i in sliding else "based" if i in linear else "base_conv"
        for i in range(num_layers)
    )


def hybrid_layer_pattern(pattern: str) -> tuple[str, ...]:
    """Mixer names from a Megatron-style hybrid pattern string, one character per layer
    (``"M-M*-"`` -> ``("mamba2", "mlp", "mamba2", "attention", "mlp")``); see
    ``HYBRID_PATTERN_CHARACTERS``."""
    unknown = sorted(set(pattern) - set(HYBRID_PATTERN_CHARACTERS))
    if not pattern or unknown:
        raise ValueError(
            f"pattern={pattern!r} must be a non-empty string of {sorted(HYBRID_PATTERN_CHARACTERS)}"
            f"; unknown characters: {unknown}"
        )
    return tuple(HYBRID_PATTERN_CHARACTERS[character] for character in pattern)


#: Values of ``ModelConfig.remat``: what the backward pass recomputes (docs/model.md#remat).
#: ``none`` saves every activation; ``minimal`` saves the outputs of matmuls without batch
#: dimensions (the projections) and recomputes the elementwise work, attention scores and the
#: mixers' chunk states; ``full`` saves only each block's input.
REMAT_POLICIES: tuple[str, ...] = ("none", "minimal", "full")

#: Values of ``ModelConfig.residual_activation``.
RESIDUAL_ACTIVATIONS: tuple[str, ...] = ("none", "silu")

_DEFAULT_PATTERN = based_layer_pattern(27, (1, 6, 11, 16, 21), (2, 7, 12, 17, 22))


@dataclasses.dataclass(frozen=True)
class ModelFields:
    """The model-level fields of :class:`ModelConfig` (its sections come from the registry).

    Attributes:
      vocab_size: tokenizer vocabulary; the embedding has ``padded_vocab_size`` rows.
      pad_vocab_size_multiple: the embedding rows are a multiple of this.
      d_model: width of the residual stream.
      num_layers: number of blocks; ``layer_pattern`` names one mixer per block.
      layer_pattern: mixer names from ``MIXER_NAMES``, one per layer.
      use_mlp: whether each block has a gated MLP (section ``mlp``) after its mixer (False:
        mixer-only blocks, as in Mamba and the Zoology MQAR models).
      norm: ``rmsnorm``, ``layernorm`` or ``srmsnorm`` (pre-norms and the final norm;
        ``srmsnorm`` has no parameters).
      norm_eps: epsilon of the norms (also of the mixers' inner norms).
      dtype: activation dtype (``float32`` or ``bfloat16``); parameters, residual stream,
        states and softmax stay float32.
      init_std: standard deviation of linear and embedding weights; output projections use
        ``init_std / sqrt(2 * num_layers)``.
      implementation: who computes linear and sliding-window attention: ``auto`` (Pallas
        kernels on TPU/GPU, XLA on CPU), ``xla`` or ``pallas`` (interpreted on CPU); see
        ``jaxbased.ops.dispatch``.
      remat: rematerialisation of each block in the backward pass, one of ``REMAT_POLICIES``
        (``none``, ``minimal``, ``full``); it trades activation memory for compute and does not
        change the model's function.
      scan_layers: run the repeating unit of ``layer_pattern`` under ``nn.scan`` (parameters
        stacked along a leading ``layers`` axis; :mod:`jaxbased.layer_layout`), which makes
        compile time nearly independent of depth. It changes the parameter layout, not the
        model's function.
      scale_embedding: multiply the embedded tokens by ``sqrt(d_model)`` before the first
        block (TransNormerLLM v1); the tied head reads the unscaled embedding.
      residual_activation: applied to the residual stream after each mixer is added:
        ``none`` or ``silu`` (SeqBoat's ``silu(x + mixer(norm(x)))``).
      attention_sharing: EchoAtt (docs/echoatt.md): layers that reuse an anchor layer's
        attention probabilities and have no query/key projections of their own. Given as a
        mapping ``{sharing layer: anchor layer or None}``, a list of sharing layers, or a list of
        ``(sharing layer, anchor layer)`` pairs; a missing (None) anchor is the nearest earlier
        full-attention layer that does not share. Stored as sorted ``(sharer, anchor)`` pairs.
        Both layers must be full attention, the anchor earlier and not sharing itself; layer 0
        cannot share; not with ``scan_layers``. Empty (default): no sharing.
    """

    vocab_size: int = 50257
    pad_vocab_size_multiple: int = 8
    d_model: int = 1024
    num_layers: int = 27
    layer_pattern: tuple[str, ...] = _DEFAULT_PATTERN
    use_mlp: bool = True
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    dtype: str = "float32"
    init_std: float = 0.02
    implementation: str = "auto"
    remat: str = "none"
    scan_layers: bool = False
    scale_embedding: bool = False
    residual_activation: str = "none"
    attention_sharing: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        pattern = self.layer_pattern
        if isinstance(pattern, str) or not isinstance(pattern, Iterable):
            raise ValueError(
                f"layer_pattern={pattern!r} must be a sequence of mixer names from {MIXER_NAMES}"
            )
        object.__setattr__(self, "layer_pattern", tuple(pattern))
        for name, spec in MIXERS.items():
            section = getattr(self, name)
            if isinstance(section, Mapping):
                section = _section_from_dict(name, section)
                object.__setattr__(self, name, section)
            elif not isinstance(section, spec.config_type):
                raise TypeError(
                    f"{name} must be a {spec.config_type.__name__} or a dict of its fields; got "
                    f"{type(section).__name__}"
                )
        self._validate()

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "pad_vocab_size_multiple",
            "d_model",
            "num_layers",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        for name in ("norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        for name in ("use_mlp", "scan_layers", "scale_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        for name, allowed in (
            ("norm", NORMS),
            ("dtype", DTYPES),
            ("implementation", IMPLEMENTATIONS),
            ("remat", REMAT_POLICIES),
            ("residual_activation", RESIDUAL_ACTIVATIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not known; allowed: {allowed}")
        if len(self.layer_pattern) != self.num_layers:
            raise ValueError(
                f"layer_pattern has {len(self.layer_pattern)} entries but num_layers="
                f"{self.num_layers}; give one mixer name per layer"
            )
        unknown = sorted({name for name in self.layer_pattern if name not in MIXERS})
        if unknown:
            raise ValueError(
                f"layer_pattern has unknown mixer names {unknown}; allowed: {MIXER_NAMES}"
            )
        context = self.mixer_context
        for name in self.used_sections:
            try:
                getattr(self, name).validate(context)
            except ValueError as error:
                raise ValueError(f"{name}.{error}") from None
        object.__setattr__(
            self, "attention_sharing", self._checked_attention_sharing(self.attention_sharing)
        )

    def _can_share(self, layer: int) -> bool:
        """Whether layer ``layer``'s mixer computes full causal softmax attention."""
        name = self.layer_pattern[layer]
        return getattr(self, name).supports_attention_sharing()

    def _checked_attention_sharing(self, value: Any) -> tuple[tuple[int, int], ...]:
        """``attention_sharing`` as sorted ``(sharer, anchor)`` pairs, default anchors filled
        in; ``ValueError`` naming the value otherwise."""
        field = f"attention_sharing={value!r}"
        if value is None:
            return ()
        if isinstance(value, str):
            raise ValueError(f"{field} must be a mapping or a list of layer indices or pairs")
        if isinstance(value, Mapping):
            items = list(value.items())
        elif isinstance(value, Iterable):
            items = []
            for entry in value:
                if isinstance(entry, Iterable) and not isinstance(entry, str):
                    entry = tuple(entry)
                    if len(entry) != 2:
                        raise ValueError(f"{field}: {entry!r} is not a (sharer, anchor) pair")
                    items.append(entry)
                else:
                    items.append((entry, None))
        else:
            raise ValueError(f"{field} must be a mapping or a list of layer indices or pairs")
        if not items:
            return ()
        if self.scan_layers:
            raise ValueError(
                f"{field} cannot be combined with scan_layers=True (the anchor's probabilities "
                "would have to cross the scanned unit); set scan_layers=False"
            )

        def index(raw: Any, role: str) -> int:
            if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
                raw = int(raw)
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ValueError(f"{field}: {role} {raw!r} is not a layer index")
            if not 0 <= raw < self.num_layers:
                raise ValueError(
                    f"{field}: {role} {raw} is outside the layers 0..{self.num_layers - 1}"
                )
            return raw

        requested: dict[int, int | None] = {}
        for raw_sharer, raw_anchor in items:
            sharer = index(raw_sharer, "sharing layer")
            if sharer in requested:
                raise ValueError(f"{field}: layer {sharer} is listed twice")
            anchor = None if raw_anchor is None else index(raw_anchor, "anchor layer")
            requested[sharer] = anchor
        for sharer in sorted(requested):
            if sharer == 0:
                raise ValueError(
                    f"{field}: layer 0 cannot share attention; it has no earlier layer to copy from"
                )
            if not self._can_share(sharer):
                raise ValueError(
                    f"{field}: layer {sharer} is a {self.layer_pattern[sharer]!r} layer; only "
                    "full-attention layers can share attention probabilities"
                )
        pairs = []
        for sharer, anchor in sorted(requested.items()):
            if anchor is None:
                earlier = [
                    layer
                    for layer in range(sharer - 1, -1, -1)
                    if self._can_share(layer) and layer not in requested
                ]
                if not earlier:
                    raise ValueError(
                        f"{field}: layer {sharer} has no earlier full-attention layer that does "
                        "not share, to take as its anchor"
                    )
                anchor = earlier[0]
            elif anchor >= sharer:
                raise ValueError(
                    f"{field}: the anchor {anchor} of layer {sharer} must be an earlier layer"
                )
            elif not self._can_share(anchor):
                raise ValueError(
                    f"{field}: the anchor {anchor} of layer {sharer} is a "
                    f"{self.layer_pattern[anchor]!r} layer; an anchor must be full attention"
                )
            elif anchor in requested:
                raise ValueError(
                    f"{field}: the anchor {anchor} of layer {sharer} shares attention itself; "
                    "an anchor must compute its own"
                )
            pairs.append((sharer, anchor))
        return tuple(pairs)

    @property
    def attention_map_layers(self) -> tuple[int, ...]:
        """The full-attention layers (those that can anchor or share EchoAtt probabilities)."""
        return tuple(layer for layer in range(self.num_layers) if self._can_share(layer))

    @property
    def attention_anchors(self) -> dict[int, int]:
        """EchoAtt: ``{sharing layer: its anchor layer}`` (empty without sharing)."""
        return dict(self.attention_sharing)

    @property
    def anchor_layers(self) -> tuple[int, ...]:
        """EchoAtt: the layers whose probabilities some later layer reuses, ascending."""
        return tuple(sorted(set(self.attention_anchors.values())))

    # Derived -------------------------------------------------------------------------------
    @property
    def used_sections(self) -> tuple[str, ...]:
        """The sections this model reads: its pattern's mixers, and ``mlp`` when ``use_mlp``."""
        used = set(self.layer_pattern) | ({"mlp"} if self.use_mlp else set())
        return tuple(name for name in MIXERS if name in used)

    @property
    def mixer_context(self) -> MixerContext:
        """What every mixer reads of the model (width, depth, dtype, init, implementation)."""
        return MixerContext(
            d_model=self.d_model,
            num_layers=self.num_layers,
            dtype=self.dtype,
            init_std=self.init_std,
            norm_eps=self.norm_eps,
            implementation=self.implementation,
        )

    def layer_context(self, layer_index: int) -> MixerContext:
        """:attr:`mixer_context` of layer ``layer_index`` (its ``layer_index`` set)."""
        if not 0 <= layer_index < self.num_layers:
            raise ValueError(f"layer_index={layer_index} is outside 0..{self.num_layers - 1}")
        return dataclasses.replace(
            self.mixer_context,
            layer_index=layer_index,
            shares_attention=layer_index in self.attention_anchors,
        )

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: ``vocab_size`` rounded up to ``pad_vocab_size_multiple``."""
        return -(-self.vocab_size // self.pad_vocab_size_multiple) * self.pad_vocab_size_multiple

    @property
    def mlp_hidden_dim(self) -> int:
        """Gated-MLP hidden width (``fc2`` input); ``fc1`` outputs twice this."""
        return self.mlp.hidden_dim(self.d_model)

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The activation dtype as a NumPy dtype."""
        return self.mixer_context.compute_dtype

    @property
    def output_init_std(self) -> float:
        """Init std of every ``out_proj`` and ``fc2``: ``init_std / sqrt(2 * num_layers)``."""
        return self.mixer_context.output_init_std

    # Construction ---------------------------------------------------------------------------
    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed (validated). A section is changed by a dict of its
        fields, merged onto the current ones (``replace(based={"feature_dim": 8})``), or by a
        whole section config."""
        return ModelConfig.from_dict(merge_overrides(self.to_dict(), overrides))

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain values, each section a nested dict (JSON-ready)."""
        values = dataclasses.asdict(self)
        values["layer_pattern"] = tuple(self.layer_pattern)
        values["attention_sharing"] = tuple(tuple(pair) for pair in self.attention_sharing)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping (a dict, an ml_collections ``ConfigDict``, a stored config).

        Sections are nested mappings; a missing field or section takes its default. A flat
        config written before the sections existed (``feature_dim``, ``attention_heads``, ...)
        is converted by ``jaxbased.config_legacy.upgrade_flat_config``.
        """
        values = {key: _plain_mapping(value) for key, value in _plain_mapping(values).items()}
        if is_legacy_flat(values):
            pattern = values.get("layer_pattern", _DEFAULT_PATTERN)
            uses_mlp = values.get("use_mlp", True)
            used = set(pattern) | ({"mlp"} if uses_mlp else set())
            values = upgrade_flat_config(values, used)
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; allowed: {allowed}")
        if "layer_pattern" in values and not isinstance(values["layer_pattern"], str):
            values["layer_pattern"] = tuple(values["layer_pattern"])
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset of ``jaxbased.presets.PRESETS`` with fields overridden as in :meth:`replace`.

        Changing ``num_layers`` of a preset also needs a matching ``layer_pattern``.
        """
        from jaxbased.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is not known; allowed: {sorted(PRESETS)}")
        return PRESETS[name]().replace(**overrides)


def merge_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a ``ModelConfig.to_dict()``-like dict) with ``overrides`` as
    ``ModelConfig.replace`` takes them: a section given as a dict is merged onto the section's
    fields in ``values``, a section config replaces it, anything else replaces the field. Old
    flat field names are a ``ValueError`` naming their new place."""
    _reject_flat_names(overrides)
    merged = dict(values)
    for name, value in overrides.items():
        value = _plain_mapping(value)
        if name in MIXERS and isinstance(value, Mapping):
            merged[name] = {**_plain_mapping(merged.get(name) or {}), **value}
        elif isinstance(value, MixerConfig):
            merged[name] = value.to_dict()
        else:
            merged[name] = value
    return merged


def _plain_mapping(value: Any) -> Any:
    """A ``Mapping`` or an ml_collections ``ConfigDict`` as a plain dict; anything else as is."""
    if hasattr(value, "to_dict") and callable(value.to_dict) and not isinstance(value, MixerConfig):
        return dict(value.to_dict())
    return dict(value) if isinstance(value, Mapping) else value


def _section_from_dict(name: str, values: Mapping[str, Any]) -> MixerConfig:
    try:
        return MIXERS[name].config_type.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{name}.{error}") from None
    except TypeError as error:  # a comparison with a value of the wrong type
        raise ValueError(f"{name}: {error}") from None


def _reject_flat_names(overrides: Mapping[str, Any]) -> None:
    for name in overrides:
        if name in LEGACY_FIELDS:
            targets = " and ".join(f"{section}.{field}" for section, field in LEGACY_FIELDS[name])
            raise ValueError(
                f"{name} is no longer a ModelConfig field; it is {targets} "
                f"(e.g. {LEGACY_FIELDS[name][0][0]}={{{LEGACY_FIELDS[name][0][1]!r}: ...}})"
            )


#: The model configuration: :class:`ModelFields` plus one section per registered mixer, each a
#: field named after the mixer whose default is that mixer's default config.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [
        (name, spec.config_type, dataclasses.field(default_factory=spec.config_type))
        for name, spec in MIXERS.items()
    ],
    bases=(ModelFields,),
    frozen=True,
)
ModelConfig.__module__ = __name__
ModelConfig.__doc__ = (
    "Hyper-parameters of a language model: the fields of :class:`ModelFields` and one section "
    "per registered mixer (``config.<mixer name>``, a ``MixerConfig``); see the module docstring."
)
