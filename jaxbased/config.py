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
from jaxbased.ops.selective_scan import ALGORITHMS as SELECTIVE_SCAN_ALGORITHMS

#: Mixer names a layer pattern may use. ``jaxbased.layers.registry`` maps each to its module.
#: ``mlp`` is a layer whose mixer is a gated MLP (the ``-`` layers of NVIDIA's Mamba-2-Hybrid
#: pattern; use it with ``use_mlp=False``).
MIXER_NAMES: tuple[str, ...] = (
    "base_conv",
    "based",
    "sliding_window",
    "attention",
    "mamba",
    "mamba2",
    "decay_attention",
    "mlp",
)
#: Characters of a hybrid pattern string (Megatron-LM's ``hybrid_override_pattern``): ``M`` a
#: Mamba-2 layer, ``*`` a (full) attention layer, ``-`` an MLP layer.
HYBRID_PATTERN_CHARACTERS: MappingProxyType[str, str] = MappingProxyType(
    {"M": "mamba2", "*": "attention", "-": "mlp"}
)
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
      ssm_expand, ssm_conv_kernel_size: ``mamba`` and ``mamba2``: inner width
        ``ssm_expand * d_model`` and the depthwise causal conv's taps (with bias).
      ssm_dt_min, ssm_dt_max, ssm_dt_init_floor: the time-step init of ``mamba`` and ``mamba2``:
        ``softplus(dt_bias)`` log-uniform in ``[ssm_dt_min, ssm_dt_max]``, at least the floor.
      mamba_state_dim, mamba_dt_rank, mamba_scan_algorithm, mamba_chunk_size: the ``mamba``
        (Mamba-1) mixer: state size N per channel, rank of the time-step projection (None:
        ``ceil(d_model / 16)``), the selective-scan algorithm and its chunk.
      mamba2_state_dim, mamba2_head_dim, mamba2_groups, mamba2_chunk_size, mamba2_a_init_min,
        mamba2_a_init_max: the ``mamba2`` (SSD) mixer: state size N, head dim P (heads =
        inner / P), groups of B and C, SSD chunk, and the range of ``-A`` at init.
      decay_attention_heads, decay_key_dim, decay_feature_map, decay_output_gate: the
        ``decay_attention`` mixer (RetNet-style retention): heads, query/key dim per head (None:
        ``d_model / heads``, also the value dim), feature map of q and k, and a SiLU output gate.
        It shares ``chunk_size``, ``linear_attention_algorithm`` and ``implementation`` with
        ``based``.
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
    ssm_expand: int = 2
    ssm_conv_kernel_size: int = 4
    ssm_dt_min: float = 1e-3
    ssm_dt_max: float = 1e-1
    ssm_dt_init_floor: float = 1e-4
    mamba_state_dim: int = 16
    mamba_dt_rank: int | None = None
    mamba_scan_algorithm: str = "chunked"
    mamba_chunk_size: int = 64
    mamba2_state_dim: int = 128
    mamba2_head_dim: int = 64
    mamba2_groups: int = 1
    mamba2_chunk_size: int = 256
    mamba2_a_init_min: float = 1.0
    mamba2_a_init_max: float = 16.0
    decay_attention_heads: int = 16
    decay_key_dim: int | None = None
    decay_feature_map: str = "identity"
    decay_output_gate: bool = True
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
            "ssm_expand",
            "ssm_conv_kernel_size",
            "mamba_state_dim",
            "mamba_chunk_size",
            "mamba2_state_dim",
            "mamba2_head_dim",
            "mamba2_groups",
            "mamba2_chunk_size",
            "decay_attention_heads",
        ):
            positive_int(name)
        for name in ("mlp_inner_dim", "mamba_dt_rank", "decay_key_dim"):
            if getattr(self, name) is not None:
                positive_int(name)
        for name in (
            "norm_eps",
            "init_std",
            "rotary_base",
            "ssm_dt_min",
            "ssm_dt_init_floor",
            "mamba2_a_init_min",
        ):
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
        for name in ("use_mlp", "decay_output_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not self.ssm_dt_max >= self.ssm_dt_min:
            raise ValueError(
                f"ssm_dt_max={self.ssm_dt_max!r} must be >= ssm_dt_min={self.ssm_dt_min!r}"
            )
        if not self.mamba2_a_init_max >= self.mamba2_a_init_min:
            raise ValueError(
                f"mamba2_a_init_max={self.mamba2_a_init_max!r} must be >= mamba2_a_init_min="
                f"{self.mamba2_a_init_min!r}"
            )
        if self.mamba_scan_algorithm not in SELECTIVE_SCAN_ALGORITHMS:
            raise ValueError(
                f"mamba_scan_algorithm={self.mamba_scan_algorithm!r} is not known; allowed: "
                f"{SELECTIVE_SCAN_ALGORITHMS}"
            )
        if self.decay_feature_map not in FEATURE_MAP_NAMES:
            raise ValueError(
                f"decay_feature_map={self.decay_feature_map!r} is not known; allowed: "
                f"{FEATURE_MAP_NAMES}"
            )
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
        if "mamba2" in used:
            if self.ssm_inner_dim % self.mamba2_head_dim:
                raise ValueError(
                    f"mamba2_head_dim={self.mamba2_head_dim} must divide the inner width "
                    f"ssm_expand * d_model = {self.ssm_inner_dim}"
                )
            if self.mamba2_heads % self.mamba2_groups:
                raise ValueError(
                    f"mamba2_groups={self.mamba2_groups} must divide the number of heads "
                    f"{self.mamba2_heads} (ssm_expand * d_model / mamba2_head_dim)"
                )
        if "decay_attention" in used and self.d_model % self.decay_attention_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by decay_attention_heads="
                f"{self.decay_attention_heads}"
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
    def ssm_inner_dim(self) -> int:
        """Inner width of ``mamba`` and ``mamba2``: ``ssm_expand * d_model``."""
        return self.ssm_expand * self.d_model

    @property
    def mamba_time_step_rank(self) -> int:
        """Rank of Mamba's time-step projection: ``mamba_dt_rank`` or ``ceil(d_model / 16)``."""
        if self.mamba_dt_rank is not None:
            return self.mamba_dt_rank
        return math.ceil(self.d_model / 16)

    @property
    def mamba2_heads(self) -> int:
        """SSD heads of ``mamba2``: ``ssm_inner_dim / mamba2_head_dim``."""
        return self.ssm_inner_dim // self.mamba2_head_dim

    @property
    def mamba2_conv_channels(self) -> int:
        """Channels of Mamba-2's conv (x, B and C): ``inner + 2 * groups * state_dim``."""
        return self.ssm_inner_dim + 2 * self.mamba2_groups * self.mamba2_state_dim

    @property
    def decay_value_dim(self) -> int:
        """Value head dim of ``decay_attention``: ``d_model / decay_attention_heads``."""
        return self.d_model // self.decay_attention_heads

    @property
    def decay_head_key_dim(self) -> int:
        """Query/key dim per head of ``decay_attention`` (``decay_key_dim`` or the value dim)."""
        return self.decay_key_dim if self.decay_key_dim is not None else self.decay_value_dim

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


def _mamba(d_model: int, num_layers: int) -> ModelConfig:
    # The reference's Mamba LMs (HazyResearch/based train/configs/experiment/reference/
    # mamba-360m.yaml, mamba-1b.yaml): mixer-only blocks with RMSNorm, MambaConfig's
    # vocab_size 50277 padded to a multiple of 16 (50288), d_state 16, expand 2, d_conv 4.
    return ModelConfig(
        vocab_size=50277,
        pad_vocab_size_multiple=16,
        d_model=d_model,
        num_layers=num_layers,
        layer_pattern=("mamba",) * num_layers,
        use_mlp=False,
    )


def _mamba2_360m() -> ModelConfig:
    # state-spaces/mamba2-370m: 48 Mamba-2 layers of d 1024 (d_state 128, head dim 64, one
    # group, chunk 256), mixer-only blocks, the GPT-NeoX vocabulary padded to 16.
    return ModelConfig(
        vocab_size=50277,
        pad_vocab_size_multiple=16,
        d_model=1024,
        num_layers=48,
        layer_pattern=("mamba2",) * 48,
        use_mlp=False,
    )


#: The 360M-class Mamba-2-Hybrid (Waleffe et al. 2024, "An Empirical Study of Mamba-based
#: Language Models": 43% Mamba-2, 7% attention and 50% MLP layers, attention spread evenly,
#: no position embeddings): 48 layers, 20 Mamba-2 + 4 attention (8%) + 24 MLP layers.
MAMBA2_HYBRID_360M_PATTERN = "M-M-M*-M-M--" * 4


def _mamba2_hybrid_360m() -> ModelConfig:
    pattern = hybrid_layer_pattern(MAMBA2_HYBRID_360M_PATTERN)
    return ModelConfig(
        vocab_size=50277,
        pad_vocab_size_multiple=16,
        d_model=1024,
        num_layers=len(pattern),
        layer_pattern=pattern,
        use_mlp=False,
        mlp_inner_dim=2048,
        attention_heads=16,
        rotary_fraction=0.0,
    )


def _mamba_tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        d_model=64,
        num_layers=4,
        layer_pattern=("mamba",) * 4,
        use_mlp=False,
        mamba_state_dim=8,
        mamba_chunk_size=16,
    )


def _mamba2_tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        d_model=64,
        num_layers=4,
        layer_pattern=("mamba2",) * 4,
        use_mlp=False,
        mamba2_state_dim=16,
        mamba2_head_dim=16,
        mamba2_chunk_size=16,
    )


def _mamba2_hybrid_tiny() -> ModelConfig:
    pattern = hybrid_layer_pattern("M*-M-")
    return ModelConfig(
        vocab_size=256,
        d_model=64,
        num_layers=len(pattern),
        layer_pattern=pattern,
        use_mlp=False,
        mlp_inner_dim=128,
        mlp_multiple_of=64,
        attention_heads=4,
        rotary_fraction=0.0,
        mamba2_state_dim=16,
        mamba2_head_dim=16,
        mamba2_chunk_size=16,
    )


def _decay_tiny() -> ModelConfig:
    # A RetNet / TransNormerLLM-style LM: decay linear attention and a gated MLP in every block.
    return ModelConfig(
        vocab_size=256,
        d_model=64,
        num_layers=4,
        layer_pattern=("decay_attention",) * 4,
        mlp_inner_dim=128,
        mlp_multiple_of=64,
        decay_attention_heads=4,
        chunk_size=16,
    )


PRESETS: MappingProxyType[str, Callable[[], ModelConfig]] = MappingProxyType(
    {
        "based_360m": _based_360m,
        "based_1b": _based_1b,
        "attn_360m": lambda: _transformer(1024, 24, 16),
        "attn_1b": lambda: _transformer(1680, 36, 24),
        "based_tiny": _based_tiny,
        "attn_tiny": _attn_tiny,
        "mamba_360m": lambda: _mamba(1024, 46),
        "mamba_1b": lambda: _mamba(2048, 46),
        "mamba2_360m": _mamba2_360m,
        "mamba2_hybrid_360m": _mamba2_hybrid_360m,
        "mamba_tiny": _mamba_tiny,
        "mamba2_tiny": _mamba2_tiny,
        "mamba2_hybrid_tiny": _mamba2_hybrid_tiny,
        "decay_tiny": _decay_tiny,
    }
)
