"""TransNormerLLM checkpoints in the released Hugging Face layout (``TransnormerForCausalLM``
of the OpenNLPLab/TransNormerLLM-* model repositories) -> jaxbased; docs/checkpoints.md.

The state dict (``n = hidden_dim``, ``e = n / H``, ``glu = glu_dim``)::

    model.embed_tokens.weight                           [V, d]
    model.layers.{i}.token_mixer.qkvu_proj.weight       [4n, d]   rows q | k | v | u, head-major
    model.layers.{i}.token_mixer.out_proj.weight        [d, n]
    model.layers.{i}.token_mixer.lrpe.theta             [H, 1, e] the LRPE layers only
    model.layers.{i}.channel_mixer.l1.weight, l2.weight [glu, d]
    model.layers.{i}.channel_mixer.l3.weight            [d, glu]
    lm_head.weight                                      tied: must equal the embedding

The norms (``token_norm``, ``channel_norm``, ``final_norm``, the attention's ``norm``) are
SRMSNorms without parameters. ``config.json`` is a ``TransnormerConfig`` (``model_type``
``transnormer``): ``decoder_embed_dim``, ``decoder_layers``, ``decoder_attention_heads``,
``hidden_dim``, ``glu_dim``, ``vocab_size``, ``no_scale_embedding``, ``norm_type``,
``linear_act_fun``, ``linear_use_lrpe_list``, ``bias``, ``init_std``.

The GLU's ``l1`` is our ``fc1`` gate half and ``l2`` its value half: ``l1(x) * l2(x)`` either
way without an activation, and ``act(l1(x)) * l2(x)`` for a config with ``glu_act`` ``silu``.
Every mapping is a transpose, a reshape or a copy, so the import is exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxbased.config import ModelConfig
from jaxbased.interop.reference_config import UnsupportedCheckpointError
from jaxbased.interop.state_dict import (
    LM_HEAD_KEY,
    Params,
    _copy,
    _linear,
    _Rule,
    check_tied_head,
    params_from_rules,
)
from jaxbased.layer_layout import convert_layout

#: ``model_type`` of the released ``TransnormerConfig``.
TRANSNORMER_MODEL_TYPE = "transnormer"
EMBEDDING_KEY = "model.embed_tokens.weight"
#: The released SimpleRMSNorm's epsilon (its config has no field for it).
SRMSNORM_EPS = 1e-8
_ACTIVATIONS = ("silu", "swish")
_GLU_ACTIVATIONS = {
    None: "none",
    "none": "none",
    "identity": "none",
    "silu": "silu",
    "swish": "silu",
}


def _require(values: Mapping[str, Any], name: str) -> Any:
    if name not in values:
        raise UnsupportedCheckpointError(f"TransnormerConfig lacks {name!r}")
    return values[name]


def _lrpe_layers(values: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
    listed = values.get("linear_use_lrpe_list") or []
    if listed:
        if len(listed) != num_layers:
            raise UnsupportedCheckpointError(
                f"linear_use_lrpe_list has {len(listed)} entries for decoder_layers={num_layers}"
            )
        return tuple(i for i, used in enumerate(listed) if used)
    return tuple(range(num_layers)) if values.get("linear_use_lrpe") else ()


def transnormer_config_from_reference(values: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a released ``TransnormerConfig`` (a parsed config.json);
    ``overrides`` set what it does not decide (``dtype``, ``implementation``, ``chunk_size`` of
    the section via ``transnormer={...}``).

    Raises :class:`~jaxbased.interop.UnsupportedCheckpointError` for what jaxbased does not
    build: biases, a norm other than ``simplermsnorm``, an attention activation other than
    SiLU, an unknown GLU activation, an untied head (``tie_word_embeddings`` false).
    """
    if values.get("model_type", TRANSNORMER_MODEL_TYPE) != TRANSNORMER_MODEL_TYPE:
        raise UnsupportedCheckpointError(
            f"model_type={values.get('model_type')!r} is not 'transnormer'"
        )
    problems = []
    if values.get("bias", False):
        problems.append("bias=true (jaxbased's TransNormerLLM has no biases)")
    if values.get("norm_type", "simplermsnorm") != "simplermsnorm":
        problems.append(f"norm_type={values['norm_type']!r} (only 'simplermsnorm' is built)")
    if values.get("linear_act_fun", "silu") not in _ACTIVATIONS:
        problems.append(f"linear_act_fun={values['linear_act_fun']!r} (only silu/swish)")
    if values.get("glu_act") not in _GLU_ACTIVATIONS:
        problems.append(
            f"glu_act={values['glu_act']!r} (allowed: {sorted(map(str, _GLU_ACTIVATIONS))})"
        )
    if values.get("tie_word_embeddings", True) is False:
        problems.append("tie_word_embeddings=false (jaxbased ties the head to the embedding)")
    if problems:
        raise UnsupportedCheckpointError("unsupported TransnormerConfig: " + "; ".join(problems))
    d_model = int(_require(values, "decoder_embed_dim"))
    num_layers = int(_require(values, "decoder_layers"))
    vocab_size = int(_require(values, "vocab_size"))
    glu_dim = int(values.get("glu_dim", -1))
    glu_dim = d_model if glu_dim == -1 else glu_dim
    hidden_dim = int(values.get("hidden_dim", d_model))
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        # the embedding keeps exactly the checkpoint's rows
        pad_vocab_size_multiple=math.gcd(vocab_size, 8),
        d_model=d_model,
        num_layers=num_layers,
        layer_pattern=("transnormer",) * num_layers,
        norm="srmsnorm",
        norm_eps=SRMSNORM_EPS,
        scale_embedding=not values.get("no_scale_embedding", False),
        init_std=float(values.get("init_std", 0.02)),
        mlp={
            "inner_dim": glu_dim,
            "multiple_of": math.gcd(glu_dim, 256),
            "activation": _GLU_ACTIVATIONS[values.get("glu_act")],
        },
        transnormer={
            "heads": int(_require(values, "decoder_attention_heads")),
            "hidden_dim": None if hidden_dim == d_model else hidden_dim,
            "lrpe_layers": _lrpe_layers(values, num_layers),
        },
    )
    config = ModelConfig.from_dict(fields)
    return config.replace(**overrides) if overrides else config


def transnormer_parameter_rules(config: ModelConfig) -> list[_Rule]:
    """How every released tensor maps onto our parameters (unrolled layout)."""
    section, d = config.transnormer, config.d_model
    heads, head_dim = section.heads, section.head_dim(d)
    glu = config.mlp_hidden_dim
    rules = [_copy(EMBEDDING_KEY, ("embedding",), (config.padded_vocab_size, d))]
    for index in range(config.num_layers):
        prefix, layer = f"model.layers.{index}.", f"layers_{index}"
        rules += [
            _linear(
                prefix + "token_mixer.qkvu_proj.weight",
                (layer, "mixer", "qkvu_proj", "kernel"),
                (d,),
                (4, heads, head_dim),
            ),
            _linear(
                prefix + "token_mixer.out_proj.weight",
                (layer, "mixer", "out_proj", "kernel"),
                (heads, head_dim),
                (d,),
            ),
            _linear(
                prefix + "channel_mixer.l3.weight", (layer, "mlp", "fc2", "kernel"), (glu,), (d,)
            ),
        ]
        if index in section.lrpe_layers:
            rules.append(
                _Rule(
                    prefix + "token_mixer.lrpe.theta",
                    (layer, "mixer", "lrpe_theta"),
                    (heads, 1, head_dim),
                    lambda theta: theta[:, 0, :],
                    lambda theta: theta[:, None, :],
                )
            )
    return rules


def _glu_input_rules(config: ModelConfig) -> list[tuple[str, str, int]]:
    """``(l1 key, l2 key, layer index)``: the two halves of each layer's ``fc1``."""
    return [
        (
            f"model.layers.{index}.channel_mixer.l1.weight",
            f"model.layers.{index}.channel_mixer.l2.weight",
            index,
        )
        for index in range(config.num_layers)
    ]


def import_transnormer_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig
) -> tuple[Params, list[str]]:
    """Our float32 parameter tree from a released ``TransnormerForCausalLM`` state dict (keys
    as released, with their ``model.`` prefix), in the parameter layout of ``config``.

    Returns ``(params, ignored_keys)`` (``lm_head.weight``, checked to equal the embedding).
    Raises :class:`~jaxbased.interop.CheckpointMismatchError` naming every missing, unexpected
    and mis-shaped key at once.
    """
    rules = transnormer_parameter_rules(config)
    glu, d = config.mlp_hidden_dim, config.d_model
    halves = _glu_input_rules(config)
    for l1_key, l2_key, index in halves:
        # Shape-checked as whole tensors here, joined into fc1 below.
        rules.append(_copy(l1_key, (f"layers_{index}", "mlp", "_gate"), (glu, d)))
        rules.append(_copy(l2_key, (f"layers_{index}", "mlp", "_value"), (glu, d)))
    expected = {rule.key: rule.reference_shape for rule in rules}

    def extra_key(key: str, found: dict, report: Any) -> None:
        if key == LM_HEAD_KEY:
            check_tied_head(state_dict, found, expected, report, EMBEDDING_KEY)
        else:
            report.unexpected.append(key)

    params, ignored = params_from_rules(state_dict, rules, extra_key)
    for _, _, index in halves:
        mlp = params[f"layers_{index}"]["mlp"]
        gate, value = mlp.pop("_gate"), mlp.pop("_value")  # [glu, d] each
        mlp["fc1"] = {"kernel": np.ascontiguousarray(np.stack([value.T, gate.T], axis=1))}
    return convert_layout(params, config), ignored
