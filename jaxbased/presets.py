"""Presets: the released model sizes and small CPU models (docs/model.md#presets).

Each preset is a function returning a :class:`~jaxbased.config.ModelConfig`; read them with
``ModelConfig.from_preset(name, **overrides)``. Every preset has a ``configs/<name>.py`` for
``train.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from jaxbased.config import ModelConfig, based_layer_pattern, hybrid_layer_pattern

#: The 360M-class Mamba-2-Hybrid (Waleffe et al. 2024, "An Empirical Study of Mamba-based
#: Language Models": 43% Mamba-2, 7% attention and 50% MLP layers, attention spread evenly,
#: no position embeddings): 48 layers, 20 Mamba-2 + 4 attention (8%) + 24 MLP layers.
MAMBA2_HYBRID_360M_PATTERN = "M-M-M*-M-M--" * 4

#: The vocabulary of the CPU presets: bytes.
_BYTES = 256


def _based_360m() -> ModelConfig:
    # The released based-360m ran fla's parallel kernel, whose normalizer adds 1e-6 (based-1b's
    # config names no implementation: the reference's default, 1e-12).
    return ModelConfig(based={"eps": 1e-6})


def _based_1b() -> ModelConfig:
    return ModelConfig(
        d_model=1792,
        num_layers=36,
        layer_pattern=based_layer_pattern(
            36, (1, 6, 11, 16, 21, 27, 33), (2, 7, 12, 17, 22, 28, 34)
        ),
        mlp={"inner_dim": 3584},
    )


def _transformer(d_model: int, num_layers: int, heads: int) -> ModelConfig:
    # Transformer++ of the reference: rotary on half of each head, SwiGLU with hidden
    # int(8 d / 3) rounded up to 256, vocabulary padded to a multiple of 16.
    return ModelConfig(
        d_model=d_model,
        num_layers=num_layers,
        layer_pattern=("attention",) * num_layers,
        mlp={"inner_dim": None},
        attention={"heads": heads, "rotary_fraction": 0.5},
        pad_vocab_size_multiple=16,
    )


def _based_tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=_BYTES,
        d_model=64,
        num_layers=6,
        layer_pattern=based_layer_pattern(6, (1, 4), (2, 5)),
        mlp={"inner_dim": 128, "multiple_of": 64},
        based={"heads": 4, "feature_dim": 8, "chunk_size": 16},
        sliding_window={"heads": 4, "window": 16},
    )


def _attn_tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=_BYTES,
        d_model=64,
        num_layers=4,
        layer_pattern=("attention",) * 4,
        mlp={"inner_dim": None, "multiple_of": 64},
        attention={"heads": 4, "rotary_fraction": 0.5},
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


def _mamba2_hybrid_360m() -> ModelConfig:
    pattern = hybrid_layer_pattern(MAMBA2_HYBRID_360M_PATTERN)
    return ModelConfig(
        vocab_size=50277,
        pad_vocab_size_multiple=16,
        d_model=1024,
        num_layers=len(pattern),
        layer_pattern=pattern,
        use_mlp=False,
        mlp={"inner_dim": 2048},
        attention={"heads": 16, "rotary_fraction": 0.0},
    )


def _mamba_tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=_BYTES,
        d_model=64,
        num_layers=4,
        layer_pattern=("mamba",) * 4,
        use_mlp=False,
        mamba={"state_dim": 8, "chunk_size": 16},
    )


_MAMBA2_TINY = {"state_dim": 16, "head_dim": 16, "chunk_size": 16}


def _mamba2_tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=_BYTES,
        d_model=64,
        num_layers=4,
        layer_pattern=("mamba2",) * 4,
        use_mlp=False,
        mamba2=_MAMBA2_TINY,
    )


def _mamba2_hybrid_tiny() -> ModelConfig:
    pattern = hybrid_layer_pattern("M*-M-")
    return ModelConfig(
        vocab_size=_BYTES,
        d_model=64,
        num_layers=len(pattern),
        layer_pattern=pattern,
        use_mlp=False,
        mlp={"inner_dim": 128, "multiple_of": 64},
        attention={"heads": 4, "rotary_fraction": 0.0},
        mamba2=_MAMBA2_TINY,
    )


def _decay_tiny() -> ModelConfig:
    # A RetNet / TransNormerLLM-style LM: decay linear attention and a gated MLP in every block.
    return ModelConfig(
        vocab_size=_BYTES,
        d_model=64,
        num_layers=4,
        layer_pattern=("decay_attention",) * 4,
        mlp={"inner_dim": 128, "multiple_of": 64},
        decay_attention={"heads": 4, "chunk_size": 16},
    )


def _cca_tiny() -> ModelConfig:
    # attn_tiny with CCA-Attention in every layer: the same parameters (attn_tiny workdirs load),
    # groups of 8 pooled into core tokens beyond a local window of 32.
    return _attn_tiny().replace(
        layer_pattern=("cca_attention",) * 4,
        cca_attention={"heads": 4, "rotary_fraction": 0.5, "group_size": 8, "local_window": 32},
    )


def _transnormer(d_model: int, num_layers: int, heads: int, glu_dim: int) -> ModelConfig:
    # TransNormerLLM v1 (OpenNLPLab/TransNormerLLM-385M, -1B config.json): gated linear
    # attention with LRPE in the first layer, SGLU without activation, weightless SRMSNorm
    # (eps 1e-8), sqrt(d) embedding scale (no_scale_embedding false), the 64000-token Baichuan
    # vocabulary, head tied to the embedding.
    return ModelConfig(
        vocab_size=64000,
        d_model=d_model,
        num_layers=num_layers,
        layer_pattern=("transnormer",) * num_layers,
        norm="srmsnorm",
        norm_eps=1e-8,
        scale_embedding=True,
        mlp={"inner_dim": glu_dim, "multiple_of": 256, "activation": "none"},
        transnormer={"heads": heads, "lrpe_layers": (0,)},
    )


def _transnormer_tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=_BYTES,
        d_model=64,
        num_layers=4,
        layer_pattern=("transnormer",) * 4,
        norm="srmsnorm",
        norm_eps=1e-8,
        scale_embedding=True,
        mlp={"inner_dim": 128, "multiple_of": 64, "activation": "none"},
        transnormer={"heads": 4, "lrpe_layers": (0,), "chunk_size": 16},
    )


def _seqboat(d_model: int, num_layers: int, section: dict) -> ModelConfig:
    # SeqBoat's LM (renll/SeqBoat, arch slag_lm_enwik8_base_v2): EMA + routed local GAU in every
    # layer, no FFN, pre-LayerNorm, SiLU on the residual stream, sqrt(d) embedding scale, bytes.
    return ModelConfig(
        vocab_size=_BYTES,
        d_model=d_model,
        num_layers=num_layers,
        layer_pattern=("seqboat",) * num_layers,
        use_mlp=False,
        norm="layernorm",
        residual_activation="silu",
        scale_embedding=True,
        seqboat=section,
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
        "cca_tiny": _cca_tiny,
        "transnormer_385m": lambda: _transnormer(1024, 24, 8, 2816),
        "transnormer_1b": lambda: _transnormer(2048, 16, 16, 5632),
        "transnormer_tiny": _transnormer_tiny,
        # enwik8: 14 layers of d 616, z 128, h 1232, N 16; its chunk W = 1024 sees 1025 keys
        "seqboat_enwik8": lambda: _seqboat(
            616, 14, {"attention_dim": 128, "value_dim": 1232, "window": 1025}
        ),
        "seqboat_tiny": lambda: _seqboat(
            64,
            4,
            {"attention_dim": 32, "value_dim": 128, "window": 33, "ema_chunk_size": 16},
        ),
    }
)
