"""Model configuration: a frozen, validated dataclass and the presets of SPEC.md §1–§2.

``ModelConfig`` is built from keyword arguments, from a preset (``ModelConfig.from_preset``) or
from a mapping such as an ml_collections ``ConfigDict`` (``ModelConfig.from_dict``). Every invalid
value raises ``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp

from jaxbased.ops.dispatch import IMPLEMENTATIONS
from jaxbased.ops.feature_maps import FEATURE_MAP_NAMES, expanded_dim
from jaxbased.ops.linear_attention import ALGORITHMS

#: Mixer names a layer pattern may use. ``jaxbased.layers.registry`` maps each to its module.
MIXER_NAMES: tuple[str, ...] = ("base_conv", "based", "sliding_window", "attention")
#: Activation dtypes; ``float64`` (with ``jax_enable_x64``) is for numerical checks.
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float64")
#: Normalisation layers: ``rmsnorm`` (no bias, the released models) or ``layernorm`` (with bias,
#: the Zoology MQAR models).
NORMS: tuple[str, ...] = ("rmsnorm", "layernorm")


def based_layer_pattern(
    num_layers: int,
    linear_attention_layers: Iterable[int],
    sliding_window_layers: Iterable[int],
) -> tuple[str, ...]:
    """The released BASED pattern: a layer is ``sliding_window`` if listed there, else ``based``
    if listed as linear attention, else ``base_conv`` (the reference's alt_mixer_2 / alt_mixer /
    mixer rule, SPEC.md §4)."""
    linear, sliding = set(linear_attention_layers), set(sliding_window_layers)
    for name, layers in (("linear_attention_layers", linear), ("sliding_window_layers", sliding)):
        outside = sorted(i for i in layers if not 0 <= i < num_layers)
        if outside:
            raise ValueError(f"{name} has layers {outside} outside 0..{num_layers - 1}")
    return tuple(
        "sliding_window" if i in sliding else "based" if i in linear else "base_conv"
        for i in range(num_layers)
    )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a language model (one flat record; names follow SPEC.md).

    Attributes:
      vocab_size: tokenizer vocabulary; the embedding has ``padded_vocab_size`` rows.
      pad_vocab_size_multiple: the embedding rows are a multiple of this.
      d_model: width of the residual stream.
      num_layers: number of blocks; ``layer_pattern`` names one mixer per block.
      layer_pattern: mixer names from ``MIXER_NAMES``, one per layer.
      mlp_inner_dim: gated-MLP hidden width before rounding (None: ``int(8 * d_model / 3)``),
        rounded up to ``mlp_multiple_of``; ``fc1`` maps to twice that.
      use_mlp: whether each block has a gated MLP after its mixer (False: mixer-only blocks, as
        in Mamba and the Zoology MQAR models).
      norm: ``rmsnorm`` or ``layernorm`` (pre-norms and the final norm).
      norm_eps: epsilon of the norms.
      linear_attention_heads, feature_dim, feature_map, linear_attention_eps, chunk_size,
      linear_attention_algorithm: the ``based`` mixer (value head dim
        ``d_model / linear_attention_heads``).
      attention_heads, window, rotary_fraction, rotary_base: ``sliding_window`` and
        ``attention`` mixers; ``window`` counts the keys a query sees, itself included;
        ``rotary_dim = int(rotary_fraction * head_dim)``.
      conv_kernel_size, conv_expand: the ``base_conv`` mixer (``in_proj: d -> conv_expand * d``).
      dtype: activation dtype (``float32`` or ``bfloat16``); parameters, residual stream,
        states and softmax stay float32.
      init_std: standard deviation of linear and embedding weights; output projections use
        ``init_std / sqrt(2 * num_layers)``.
      implementation: who computes linear and sliding-window attention: ``auto`` (Pallas
        kernels on TPU/GPU, XLA on CPU), ``xla`` or ``pallas`` (interpreted on CPU);
        see ``jaxbased.ops.dispatch``.
    """

    vocab_size: int = 50257
    pad_vocab_size_multiple: int = 8
    d_model: int = 1024
    num_layers: int = 27
    layer_pattern: tuple[str, ...] = based_layer_pattern(27, (1, 6, 11, 16, 21), (2, 7, 12, 17, 22))
    mlp_inner_dim: int | None = 2048
    mlp_multiple_of: int = 256
    use_mlp: bool = True
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    linear_attention_heads: int = 16
    feature_dim: int = 16
    feature_map: str = "taylor"
    linear_attention_eps: float = 1e-12
    linear_attention_algorithm: str = "chunked"
    chunk_size: int = 64
    attention_heads: int = 16
    window: int = 129
    rotary_fraction: float = 1.0
    rotary_base: float = 10000.0
    conv_kernel_size: int = 3
    conv_expand: int = 4
    dtype: str = "float32"
    init_std: float = 0.02
    implementation: str = "auto"

    def __post_init__(self) -> None:
        pattern = self.layer_pattern
        if isinstance(pattern, str) or not isinstance(pattern, Iterable):
            raise ValueError(
                f"layer_pattern={pattern!r} must be a sequence of mixer names from {MIXER_NAMES}"
            )
        object.__setattr__(self, "layer_pattern", tuple(pattern))
        self._validate()

    def _validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")

        for name in (
            "vocab_size",
            "pad_vocab_size_multiple",
            "d_model",
            "num_layers",
            "mlp_multiple_of",
            "linear_attention_heads",
            "feature_dim",
            "chunk_size",
            "attention_heads",
            "window",
            "conv_kernel_size",
            "conv_expand",
        ):
            positive_int(name)
        if self.mlp_inner_dim is not None:
            positive_int("mlp_inner_dim")
        for name in ("norm_eps", "init_std", "rotary_base"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if not self.linear_attention_eps >= 0:
            raise ValueError(f"linear_attention_eps={self.linear_attention_eps!r} must be >= 0")
        if not 0.0 <= self.rotary_fraction <= 1.0:
            raise ValueError(f"rotary_fraction={self.rotary_fraction!r} must be in [0, 1]")
        if self.conv_expand % 2:
            raise ValueError(f"conv_expand={self.conv_expand} must be even (split into two halves)")
        if self.feature_map not in FEATURE_MAP_NAMES:
            raise ValueError(
                f"feature_map={self.feature_map!r} is not known; allowed: {FEATURE_MAP_NAMES}"
            )
        if self.linear_attention_algorithm not in ALGORITHMS:
            raise ValueError(
                f"linear_attention_algorithm={self.linear_attention_algorithm!r} is not known; "
                f"allowed: {ALGORITHMS}"
            )
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={self.implementation!r} is not known; allowed: {IMPLEMENTATIONS}"
            )
        if not isinstance(self.use_mlp, bool):
            raise ValueError(f"use_mlp={self.use_mlp!r} must be True or False")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not known; allowed: {NORMS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not known; allowed: {DTYPES}")
        if len(self.layer_pattern) != self.num_layers:
            raise ValueError(
                f"layer_pattern has {len(self.layer_pattern)} entries but num_layers="
                f"{self.num_layers}; give one mixer name per layer"
            )
        unknown = sorted({name for name in self.layer_pattern if name not in MIXER_NAMES})
        if unknown:
            raise ValueError(
                f"layer_pattern has unknown mixer names {unknown}; allowed: {MIXER_NAMES}"
            )
        used = set(self.layer_pattern)
        if "based" in used and self.d_model % self.linear_attention_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by linear_attention_heads="
                f"{self.linear_attention_heads}"
            )
        if used & {"sliding_window", "attention"} and self.d_model % self.attention_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by attention_heads="
                f"{self.attention_heads}"
            )

    # Derived sizes -------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: ``vocab_size`` rounded up to ``pad_vocab_size_multiple``."""
        return _round_up(self.vocab_size, self.pad_vocab_size_multiple)

    @property
    def mlp_hidden_dim(self) -> int:
        """Gated-MLP hidden width (``fc2`` input); ``fc1`` outputs twice this."""
        inner = self.mlp_inner_dim if self.mlp_inner_dim is not None else int(8 * self.d_model / 3)
        return _round_up(inner, self.mlp_multiple_of)

    @property
    def linear_attention_value_dim(self) -> int:
        """Value head dim of the ``based`` mixer, ``d_model / linear_attention_heads``."""
        return self.d_model // self.linear_attention_heads

    @property
    def expanded_feature_dim(self) -> int:
        """Features after the feature map (273 for Taylor with F = 16)."""
        return expanded_dim(self.feature_map, self.feature_dim)

    @property
    def attention_head_dim(self) -> int:
        return self.d_model // self.attention_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each attention head that rotary rotates (0: none)."""
        return int(self.rotary_fraction * self.attention_head_dim)

    @property
    def conv_channels(self) -> int:
        """Channels of the short conv (and of each ``in_proj`` half): ``conv_expand * d / 2``."""
        return self.conv_expand * self.d_model // 2

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def output_init_std(self) -> float:
        """Init std of every ``out_proj`` and ``fc2``: ``init_std / sqrt(2 * num_layers)``."""
        return self.init_std / math.sqrt(2 * self.num_layers)

    # Construction ---------------------------------------------------------------------------
    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return ModelConfig.from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping (a dict or an ml_collections ``ConfigDict``)."""
        values = dict(values)
        allowed = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; allowed: {sorted(allowed)}")
        if "layer_pattern" in values and not isinstance(values["layer_pattern"], str):
            values["layer_pattern"] = tuple(values["layer_pattern"])
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset from ``PRESETS`` with fields overridden by keyword.

        Changing ``num_layers`` of a preset also needs a matching ``layer_pattern``.
        """
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is not known; allowed: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name]().to_dict(), **overrides})


def _based_360m() -> ModelConfig:
    # The released based-360m ran fla's parallel kernel, whose normalizer adds 1e-6 (based-1b's
    # config names no implementation: the reference's default, 1e-12).
    return ModelConfig(linear_attention_eps=1e-6)


def _based_1b() -> ModelConfig:
    return ModelConfig(
        d_model=1792,
        num_layers=36,
        layer_pattern=based_layer_pattern(
            36, (1, 6, 11, 16, 21, 27, 33), (2, 7, 12, 17, 22, 28, 34)
        ),
        mlp_inner_dim=3584,
    )


def _transformer(d_model: int, num_layers: int, heads: int) -> ModelConfig:
    # Transformer++ of the reference: rotary on half of each head, SwiGLU with hidden
    # int(8 d / 3) rounded up to 256, vocabulary padded to a multiple of 16.
    return ModelConfig(
        d_model=d_model,
        num_layers=num_layers,
        layer_pattern=("attention",) * num_layers,
        mlp_inner_dim=None,
        attention_heads=heads,
        rotary_fraction=0.5,
        pad_vocab_size_multiple=16,
    )


def _based_tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        d_model=64,
        num_layers=6,
        layer_pattern=based_layer_pattern(6, (1, 4), (2, 5)),
        mlp_inner_dim=128,
        mlp_multiple_of=64,
        linear_attention_heads=4,
        feature_dim=8,
        chunk_size=16,
        attention_heads=4,
        window=16,
    )


def _attn_tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        d_model=64,
        num_layers=4,
        layer_pattern=("attention",) * 4,
        mlp_inner_dim=None,
        mlp_multiple_of=64,
        attention_heads=4,
        rotary_fraction=0.5,
        pad_vocab_size_multiple=16,
    )


PRESETS: MappingProxyType[str, Callable[[], ModelConfig]] = MappingProxyType(
    {
        "based_360m": _based_360m,
        "based_1b": _based_1b,
        "attn_360m": lambda: _transformer(1024, 24, 16),
        "attn_1b": lambda: _transformer(1680, 36, 24),
        "based_tiny": _based_tiny,
        "attn_tiny": _attn_tiny,
    }
)
