"""``config.json`` of the released PyTorch checkpoints <-> :class:`~jaxbased.ModelConfig`.

The released checkpoints (docs/checkpoints.md) carry a ``config.json`` holding ``GPT2Config``
fields plus three mixer dicts whose ``_target_`` names a class of the reference code:

- ``mixer``: ``BaseConv`` (``expand_proj``, ``kernel_size``, ``use_bias``); layers in neither
  list below use it, or full softmax attention (``MHA``) when there is no ``mixer`` dict
  (Transformer++ checkpoints such as attn-360m);
- ``alt_mixer``: ``LinearAttention`` (``feature_dim``, ``num_heads``, ``feature_map``: TaylorExp,
  ``eps``) for the layers in ``alt_mixer_layers``;
- ``alt_mixer_2``: ``SlidingAttention`` (``window_size``) for the layers in ``alt_mixer_2_layers``
  (checked first).

Behaviour of the reference code that this module reproduces (it decides the math, not the
YAML/JSON spelling):

- Window: ``SlidingAttention`` builds flash-attn's ``window_size=(window_size // 2, 0)``, so a
  query sees ``window_size // 2 + 1`` keys, itself included: ``window_size: 256`` is our
  ``window = 129``.
- Heads of the sliding window: the reference overwrites ``alt_mixer_2.num_heads`` with the
  model's ``n_head`` (and takes the rotary dim from ``n_embd / n_head``), so ``n_head`` wins.
- BaseConv's kernel is its ``kernel_size`` argument, default 3; the training YAMLs' key
  ``kernel_sizes`` is swallowed by ``**kwargs`` and ignored, and so it is here.
- Linear-attention epsilon: ``eps`` when given, else 1e-6 for the fla implementations
  (``parallel_implementation: fla_parallel`` / ``fla_chunk``, based-360m's) and 1e-12 for the
  others (``quadratic``, the default, based-1b's), as the reference's recurrent step uses.
- MLP width: ``GatedMlp`` rounds ``n_inner`` (default ``int(8 * n_embd / 3)``) up to a multiple
  of 256, always.
- ``rotary_dim = int(rotary_emb_fraction * head_dim)`` (odd values rotate ``2 * ceil(r / 2)``
  channels, see :mod:`jaxbased.ops.rotary`).

Options that would change the math without changing any weight name (GELU MLPs, LayerNorm,
interleaved rotary, grouped-query attention, untied heads, ...) raise
:class:`UnsupportedCheckpointError` naming each one; options that add or remove weights (biases,
position embeddings) surface as unexpected or missing keys when the weights are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxbased.config import ModelConfig, merge_overrides

BASE_CONV_TARGET = "based.models.mixers.convolution.BaseConv"
LINEAR_ATTENTION_TARGET = "based.models.mixers.linear_attention.LinearAttention"
TAYLOR_TARGET = "based.models.mixers.linear_attention.TaylorExp"
SLIDING_TARGET = "based.models.mixers.slide_attention.SlidingAttention"
#: The reference's ``GatedMlp`` rounds its hidden width up to this (not configurable there).
REFERENCE_MLP_MULTIPLE = 256
#: ``l_max`` written into exported mixer dicts (the released models' training length).
DEFAULT_L_MAX = 2048


class UnsupportedCheckpointError(ValueError):
    """The checkpoint's architecture has no jaxbased equivalent (every reason is named)."""


def _class_name(target: Any) -> str:
    return str(target or "").rsplit(".", 1)[-1]


def _get(values: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """The first of ``names`` present in ``values`` (GPT2Config aliases), else ``default``."""
    for name in names:
        if name in values and values[name] is not None:
            return values[name]
    return default


def _layers(values: Mapping[str, Any], name: str, num_layers: int) -> set[int]:
    layers = values.get(name) or []
    if isinstance(layers, int):
        layers = [layers]
    result = {int(i) for i in layers}
    outside = sorted(i for i in result if not 0 <= i < num_layers)
    if outside:
        raise UnsupportedCheckpointError(
            f"config.json {name} lists layers {outside} outside 0..{num_layers - 1}"
        )
    return result


def linear_attention_eps(parallel_implementation: str | None) -> float:
    """The normalizer epsilon the reference uses for a ``parallel_implementation``: fla's
    kernels add 1e-6, the quadratic and CUDA paths 1e-12."""
    return 1e-6 if "fla" in str(parallel_implementation or "") else 1e-12


def _check_supported(values: Mapping[str, Any]) -> None:
    """Raise one error naming every option whose math jaxbased does not implement."""
    problems = []

    def expect(name: str, allowed: tuple[Any, ...], default: Any) -> None:
        value = values.get(name, default)
        if value not in allowed:
            problems.append(f"{name}={value!r} (supported: {', '.join(map(repr, allowed))})")

    expect("activation_function", ("swiglu",), "gelu_new")
    expect("rms_norm", (True,), False)
    expect("prenorm", (True,), True)
    expect("parallel_block", (False,), False)
    expect("tie_word_embeddings", (True,), True)
    expect("lm_head_bias", (False,), False)
    expect("rotary_emb_interleaved", (False,), False)
    expect("rotary_emb_scale_base", (None,), None)
    expect("scale_attn_weights", (True,), True)
    expect("scale_attn_by_inverse_layer_idx", (False,), False)
    expect("mlp_type", ("base",), "base")
    expect("word_embed_proj_dim", (None,), None)
    n_head = _get(values, "n_head", "num_attention_heads")
    n_head_kv = values.get("n_head_kv")
    if n_head_kv is not None and n_head_kv != n_head:
        problems.append(f"n_head_kv={n_head_kv!r} (grouped-query attention is not supported)")
    if values.get("head_dim") is not None:
        d_model, heads = _get(values, "n_embd", "hidden_size"), n_head
        if d_model and heads and values["head_dim"] != d_model // heads:
            problems.append(f"head_dim={values['head_dim']!r} (must be n_embd / n_head)")
    if problems:
        raise UnsupportedCheckpointError(
            "config.json describes a model jaxbased cannot represent: " + "; ".join(problems)
        )


def _mixer_fields(values: Mapping[str, Any], d_model: int) -> dict[str, Any]:
    """ModelConfig sections from the three mixer dicts (the ones that are present)."""
    fields: dict[str, Any] = {}
    problems = []
    mixer = values.get("mixer")
    if mixer is not None:
        if _class_name(mixer.get("_target_")) != "BaseConv":
            problems.append(f"mixer._target_={mixer.get('_target_')!r} (supported: BaseConv)")
        else:
            fields["base_conv"] = {
                "expand": int(mixer.get("expand_proj", 2)),
                "kernel_size": int(mixer.get("kernel_size", 3)),
            }
            if mixer.get("use_cuda"):
                problems.append("mixer.use_cuda=True (its conv has a bias and a fused SiLU)")
    linear = values.get("alt_mixer")
    if linear is not None:
        if _class_name(linear.get("_target_")) != "LinearAttention":
            problems.append(
                f"alt_mixer._target_={linear.get('_target_')!r} (supported: LinearAttention)"
            )
        else:
            feature_map = linear.get("feature_map") or {"_target_": TAYLOR_TARGET}
            if _class_name(feature_map.get("_target_")) != "TaylorExp":
                problems.append(
                    f"alt_mixer.feature_map._target_={feature_map.get('_target_')!r} "
                    "(supported: TaylorExp)"
                )
            heads = int(linear.get("num_heads", 16))
            fields["based"] = {
                "heads": heads,
                "feature_dim": int(linear.get("feature_dim", 16)),
                "feature_map": "taylor",
                "eps": float(
                    linear.get("eps", linear_attention_eps(linear.get("parallel_implementation")))
                ),
            }
            head_dim = linear.get("head_dim")
            if head_dim is not None and head_dim != d_model // heads:
                problems.append(f"alt_mixer.head_dim={head_dim!r} (must be n_embd / num_heads)")
            if linear.get("parallel_implementation") == "tk":
                problems.append(
                    "alt_mixer.parallel_implementation='tk' (adds an output RMSNorm, g_norm)"
                )
    sliding = values.get("alt_mixer_2")
    if sliding is not None:
        if _class_name(sliding.get("_target_")) != "SlidingAttention":
            problems.append(
                f"alt_mixer_2._target_={sliding.get('_target_')!r} (supported: SlidingAttention)"
            )
        else:
            window_size = sliding.get("window_size", 128)
            if window_size is None:
                problems.append("alt_mixer_2.window_size=None (the reference asserts a window)")
            else:
                fields["sliding_window"] = {"window": int(window_size) // 2 + 1}
    if problems:
        raise UnsupportedCheckpointError(
            "config.json describes a model jaxbased cannot represent: " + "; ".join(problems)
        )
    return fields


def config_from_reference(values: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a released checkpoint's ``config.json`` (a parsed dict).

    ``overrides`` set fields that ``config.json`` does not decide, as in ``ModelConfig.replace``
    (``dtype``, ``implementation``, ``based={"chunk_size": 16, "algorithm": "recurrent",
    "feature_map": "taylor_symmetric"}``, ...).
    Raises :class:`UnsupportedCheckpointError` naming every unsupported option.
    """
    _check_supported(values)
    d_model = int(_get(values, "n_embd", "hidden_size"))
    num_layers = int(_get(values, "n_layer", "num_hidden_layers"))
    n_head = int(_get(values, "n_head", "num_attention_heads"))
    sliding_layers = _layers(values, "alt_mixer_2_layers", num_layers)
    linear_layers = _layers(values, "alt_mixer_layers", num_layers)
    default_mixer = "base_conv" if values.get("mixer") is not None else "attention"
    pattern = []
    for i in range(num_layers):
        if i in sliding_layers and values.get("alt_mixer_2") is not None:
            pattern.append("sliding_window")
        elif i in sliding_layers:  # listed, but no alt_mixer_2 dict: the reference builds MHA
            pattern.append("attention")
        elif i in linear_layers and values.get("alt_mixer") is not None:
            pattern.append("based")
        elif i in linear_layers:
            pattern.append("attention")
        else:
            pattern.append(default_mixer)
    n_inner = values.get("n_inner")
    fields: dict[str, Any] = dict(
        vocab_size=int(values["vocab_size"]),
        pad_vocab_size_multiple=int(values.get("pad_vocab_size_multiple", 1)),
        d_model=d_model,
        num_layers=num_layers,
        layer_pattern=tuple(pattern),
        mlp={
            "inner_dim": None if n_inner is None else int(n_inner),
            "multiple_of": REFERENCE_MLP_MULTIPLE,
        },
        norm_eps=float(values.get("layer_norm_epsilon", 1e-5)),
        init_std=float(values.get("initializer_range", 0.02)),
    )
    # The reference's attention settings are model-wide: both attention mixers read them.
    attention = {
        "heads": n_head,
        "rotary_fraction": float(values.get("rotary_emb_fraction", 0.0)),
        "rotary_base": float(values.get("rotary_emb_base", 10000.0)),
    }
    sections = _mixer_fields(values, d_model)
    used = set(pattern)
    if "attention" in used:
        fields["attention"] = attention
    if "sliding_window" in used:
        fields["sliding_window"] = {**attention, **sections.pop("sliding_window", {})}
    fields.update({name: section for name, section in sections.items() if name in used})
    return ModelConfig.from_dict(merge_overrides(fields, overrides))


def config_to_reference(config: ModelConfig, *, l_max: int = DEFAULT_L_MAX) -> dict[str, Any]:
    """A ``config.json`` dict in the released layout that :func:`config_from_reference` (and the
    reference's ``GPTLMHeadModel``) reads back as ``config``.

    Raises :class:`UnsupportedCheckpointError` for models the reference cannot express: a layer
    pattern that mixes ``base_conv`` and full ``attention`` layers, feature maps other than the
    Taylor ones, or an MLP width rounded to a multiple other than 256.
    """
    used = set(config.layer_pattern)
    problems = []
    if {"base_conv", "attention"} <= used:
        problems.append(
            "layer_pattern mixes base_conv and attention (the reference builds its default "
            "layers from one class: BaseConv when config.json has a mixer dict, else MHA)"
        )
    if "based" in used and config.based.feature_map not in ("taylor", "taylor_symmetric"):
        problems.append(
            f"based.feature_map={config.based.feature_map!r} (the reference has TaylorExp)"
        )
    attention_sections = [getattr(config, name) for name in ("sliding_window", "attention")]
    attention_sections = [
        section
        for section, name in zip(attention_sections, ("sliding_window", "attention"), strict=True)
        if name in used
    ]
    shared = {
        (section.heads, section.rotary_fraction, section.rotary_base)
        for section in attention_sections
    }
    if len(shared) > 1:
        problems.append(
            "sliding_window and attention differ in heads or rotary (the reference's n_head "
            "and rotary settings are model-wide)"
        )
    if not config.use_mlp or config.norm != "rmsnorm":
        problems.append(
            f"use_mlp={config.use_mlp}, norm={config.norm!r} (the reference's blocks have a "
            "gated MLP and RMSNorm)"
        )
    if config.mlp_hidden_dim != reference_mlp_hidden_dim(config):
        problems.append(
            f"mlp.multiple_of={config.mlp.multiple_of} gives an MLP width the reference's "
            "GatedMlp (multiple of 256) cannot build"
        )
    if problems:
        raise UnsupportedCheckpointError(
            "cannot export to the reference layout: " + "; ".join(problems)
        )
    # n_head and rotary: from the attention mixer the model uses (both agree, checked above)
    attention = config.attention if "attention" in used else config.sliding_window
    values: dict[str, Any] = {
        "_target_": "based.models.gpt.GPT2MixerConfig"
        if used - {"attention"}
        else "transformers.GPT2Config",
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "n_embd": config.d_model,
        "n_layer": config.num_layers,
        "n_head": attention.heads,
        "n_inner": config.mlp.inner_dim,
        "n_positions": 0,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": config.init_std,
        "activation_function": "swiglu",
        "rms_norm": True,
        "residual_in_fp32": True,
        "prenorm": True,
        "tie_word_embeddings": True,
        "rotary_emb_fraction": attention.rotary_fraction,
        "rotary_emb_base": attention.rotary_base,
        "rotary_emb_interleaved": False,
        "qkv_proj_bias": False,
        "out_proj_bias": False,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "fused_mlp": False,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "alt_mixer_layers": [i for i, name in enumerate(config.layer_pattern) if name == "based"],
        "alt_mixer_2_layers": [
            i for i, name in enumerate(config.layer_pattern) if name == "sliding_window"
        ],
    }
    if "base_conv" in used:
        values["mixer"] = {
            "_target_": BASE_CONV_TARGET,
            "l_max": l_max,
            "use_bias": True,
            "expand_proj": config.base_conv.expand,
            "kernel_size": config.base_conv.kernel_size,
        }
    if "based" in used:
        values["alt_mixer"] = {
            "_target_": LINEAR_ATTENTION_TARGET,
            "l_max": l_max,
            "feature_map": {"_target_": TAYLOR_TARGET, "input_dim": config.based.feature_dim},
            "feature_dim": config.based.feature_dim,
            "num_heads": config.based.heads,
            "eps": config.based.eps,
        }
    if "sliding_window" in used:
        values["alt_mixer_2"] = {
            "_target_": SLIDING_TARGET,
            "window_size": 2 * (config.sliding_window.window - 1),
            "num_heads": config.sliding_window.heads,
            "causal": True,
        }
    return values


def reference_mlp_hidden_dim(config: ModelConfig) -> int:
    """The hidden width the reference's ``GatedMlp`` builds for ``config``: ``n_inner`` (default
    ``int(8 * d / 3)``) rounded up to a multiple of 256."""
    inner = (
        config.mlp.inner_dim if config.mlp.inner_dim is not None else int(8 * config.d_model / 3)
    )
    return -(-inner // REFERENCE_MLP_MULTIPLE) * REFERENCE_MLP_MULTIPLE
