"""Mamba and Mamba-2 checkpoints in mamba_ssm's ``MambaLMHeadModel`` layout <-> jaxbased.

The reference's ``mamba-360m`` / ``mamba-1b`` (HazyResearch/based, whose ``MambaLMHeadModel``
is mamba_ssm's) and state-spaces' ``mamba2-*`` models keep their weights under ``backbone.``
(after :func:`~jaxbased.interop.clean_state_dict` strips a Lightning ``model.`` prefix)::

    backbone.embedding.weight                       [V_padded, d]
    backbone.layers.{i}.norm.weight (.bias)         [d]          one norm per block, no MLP
    backbone.layers.{i}.mixer.in_proj.weight        [2 inner, d]; Mamba-2 [2 inner + 2GN + H, d]
    backbone.layers.{i}.mixer.conv1d.weight / .bias [C, 1, K] / [C]
    Mamba:   .mixer.x_proj.weight [R + 2N, inner], .mixer.dt_proj.weight [inner, R],
             .mixer.dt_proj.bias [inner], .mixer.A_log [inner, N], .mixer.D [inner]
    Mamba-2: .mixer.dt_bias [H], .mixer.A_log [H], .mixer.D [H], .mixer.norm.weight [inner]
    backbone.layers.{i}.mixer.out_proj.weight       [d, inner]
    backbone.norm_f.weight (.bias)                  [d]
    lm_head.weight                                  tied: must equal the embedding

Its ``config.json`` is a ``MambaConfig`` (``d_model``, ``n_layer``, ``vocab_size``,
``pad_vocab_size_multiple``, ``rms_norm``, ``ssm_cfg``; the reference's own ``MambaConfig`` adds
GPT-2 fields such as ``n_embd`` and ``n_head`` that its model does not read).
:func:`mamba_config_to_reference` writes the fields both the reference's and mamba_ssm's
``MambaConfig`` accept. Every tensor mapping is a transpose or a copy
(:mod:`jaxbased.interop.state_dict`'s rules), so import and export are exact inverses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxbased.config import ModelConfig, merge_overrides
from jaxbased.interop.reference_config import UnsupportedCheckpointError
from jaxbased.interop.state_dict import (
    LM_HEAD_KEY,
    Params,
    _bias,
    _conv,
    _copy,
    _linear,
    _Rule,
    check_tied_head,
    params_from_rules,
    state_from_rules,
)
from jaxbased.layer_layout import convert_layout, to_unrolled

EMBEDDING_KEY = "backbone.embedding.weight"
FINAL_NORM_PREFIX = "backbone.norm_f"

_MAMBA1_DEFAULTS = {"d_state": 16, "d_conv": 4, "expand": 2}
_MAMBA2_DEFAULTS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1}
#: The norm epsilon of mamba_ssm's ``MixerModel`` (its ``MambaConfig`` has no field for it).
MAMBA_NORM_EPS = 1e-5
#: Mixers of the mamba_ssm layout, with the ``ssm_cfg.layer`` that builds each.
MAMBA_LAYERS = {"mamba": "Mamba1", "mamba2": "Mamba2"}


def mamba_config_from_reference(values: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a ``MambaConfig`` ``config.json`` (Mamba-1 or Mamba-2 layers,
    mixer-only blocks); ``overrides`` replace fields of the result as in ``ModelConfig.replace``
    (``dtype``, ``mamba={"chunk_size": 16}``, ...).

    Raises :class:`UnsupportedCheckpointError` for what jaxbased cannot map: attention layers
    (``attn_layer_idx``), MLPs (``d_intermediate``), untied heads, biases in the projections,
    convs without bias, a per-channel D or a norm before the gate.
    """
    ssm = dict(values.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise UnsupportedCheckpointError(f"ssm_cfg.layer={layer!r}: only Mamba1 and Mamba2 map")
    for name in ("attn_layer_idx",):
        if values.get(name):
            raise UnsupportedCheckpointError(f"{name}={values[name]!r}: hybrid checkpoints")
    if values.get("d_intermediate", 0):
        raise UnsupportedCheckpointError(
            f"d_intermediate={values['d_intermediate']!r}: blocks with an MLP do not map"
        )
    if not values.get("tie_embeddings", True):
        raise UnsupportedCheckpointError("tie_embeddings=False: jaxbased ties the head")
    unsupported = {
        "bias": True,
        "conv_bias": False,
        "D_has_hdim": True,
        "norm_before_gate": True,
        "rmsnorm": False,
    }
    for name, bad in unsupported.items():
        if name in ssm and ssm[name] == bad:
            raise UnsupportedCheckpointError(f"ssm_cfg.{name}={ssm[name]!r} does not map")
    defaults = _MAMBA1_DEFAULTS if layer == "Mamba1" else _MAMBA2_DEFAULTS
    ssm = {**defaults, **ssm}
    num_layers = int(values["n_layer"])
    fields: dict[str, Any] = dict(
        vocab_size=int(values.get("vocab_size", 50277)),
        pad_vocab_size_multiple=int(values.get("pad_vocab_size_multiple", 8)),
        d_model=int(values["d_model"]),
        num_layers=num_layers,
        layer_pattern=("mamba" if layer == "Mamba1" else "mamba2",) * num_layers,
        use_mlp=False,
        norm="rmsnorm" if values.get("rms_norm", True) else "layernorm",
        norm_eps=float(values.get("norm_epsilon", 1e-5)),
    )
    shared = {"expand": int(ssm["expand"]), "conv_kernel_size": int(ssm["d_conv"])}
    if layer == "Mamba1":
        dt_rank = ssm.get("dt_rank", "auto")
        fields["mamba"] = {
            **shared,
            "state_dim": int(ssm["d_state"]),
            "dt_rank": None if dt_rank == "auto" else int(dt_rank),
        }
    else:
        fields["mamba2"] = {
            **shared,
            "state_dim": int(ssm["d_state"]),
            "head_dim": int(ssm["headdim"]),
            "groups": int(ssm["ngroups"]),
            "chunk_size": int(ssm.get("chunk_size", 256)),
        }
    return ModelConfig.from_dict(merge_overrides(fields, overrides))


def mamba_layout_problems(config: ModelConfig) -> list[str]:
    """Why ``config`` cannot be written in mamba_ssm's layout (empty when it can): the layers
    must all be ``mamba`` or all ``mamba2`` (``ssm_cfg.layer`` is model-wide), the blocks
    mixer-only and the norm epsilon mamba_ssm's fixed 1e-5."""
    problems = []
    kinds = set(config.layer_pattern)
    if not kinds <= set(MAMBA_LAYERS) or len(kinds) != 1:
        problems.append(
            f"layer_pattern uses {sorted(kinds)} (mamba_ssm's layout needs every layer 'mamba' "
            "or every layer 'mamba2')"
        )
    if config.use_mlp:
        problems.append("use_mlp=True (mamba_ssm's blocks are mixer-only)")
    if config.norm_eps != MAMBA_NORM_EPS:
        problems.append(
            f"norm_eps={config.norm_eps!r} (mamba_ssm's MixerModel uses {MAMBA_NORM_EPS})"
        )
    return problems


def mamba_config_to_reference(config: ModelConfig) -> dict[str, Any]:
    """A ``MambaConfig`` ``config.json`` dict that :func:`mamba_config_from_reference` reads
    back as ``config`` (up to fields that do not change the weights or the math: ``dtype``,
    ``implementation``, scan algorithms and chunks of Mamba-1, init ranges).

    Mamba-1 models get the fields that both the reference's ``MambaConfig`` and mamba_ssm's
    accept; Mamba-2 models also ``d_intermediate``, ``attn_layer_idx``, ``attn_cfg`` and
    ``tie_embeddings``, as state-spaces' ``mamba2-*`` files have them (mamba_ssm >= 2 reads
    them). Raises :class:`UnsupportedCheckpointError` naming every reason the layout cannot
    express ``config`` (see :func:`mamba_layout_problems`).
    """
    problems = mamba_layout_problems(config)
    if problems:
        raise UnsupportedCheckpointError(
            "cannot export to mamba_ssm's layout: " + "; ".join(problems)
        )
    layer = MAMBA_LAYERS[config.layer_pattern[0]]
    if layer == "Mamba1":
        section = config.mamba
        ssm: dict[str, Any] = {
            "d_state": section.state_dim,
            "d_conv": section.conv_kernel_size,
            "expand": section.expand,
            "dt_rank": "auto" if section.dt_rank is None else section.dt_rank,
        }
    else:
        section = config.mamba2
        ssm = {
            "layer": "Mamba2",
            "d_state": section.state_dim,
            "d_conv": section.conv_kernel_size,
            "expand": section.expand,
            "headdim": section.head_dim,
            "ngroups": section.groups,
            "chunk_size": section.chunk_size,
        }
    values: dict[str, Any] = {
        "d_model": config.d_model,
        "n_layer": config.num_layers,
        "vocab_size": config.vocab_size,
        "ssm_cfg": ssm,
        "rms_norm": config.norm == "rmsnorm",
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
    }
    if layer == "Mamba2":
        values.update(d_intermediate=0, attn_layer_idx=[], attn_cfg={}, tie_embeddings=True)
    return values


def _norm_rules(config: ModelConfig, key_prefix: str, path: tuple[str, ...]) -> list[_Rule]:
    rules = [_copy(f"{key_prefix}.weight", (*path, "weight"), (config.d_model,))]
    if config.norm == "layernorm":
        rules.append(_copy(f"{key_prefix}.bias", (*path, "bias"), (config.d_model,)))
    return rules


def _mixer_rules(config: ModelConfig, index: int, mixer: str) -> list[_Rule]:
    prefix, ours = f"backbone.layers.{index}.mixer", (f"layers_{index}", "mixer")
    d = config.d_model
    if mixer == "mamba":
        section = config.mamba
        inner, kernel_size = section.inner_dim(d), section.conv_kernel_size
        rank, state = section.time_step_rank(d), section.state_dim
        return [
            _linear(f"{prefix}.in_proj.weight", (*ours, "in_proj", "kernel"), (d,), (2, inner)),
            _conv(f"{prefix}.conv1d.weight", (*ours, "conv_weight"), kernel_size, inner),
            _bias(f"{prefix}.conv1d.bias", (*ours, "conv_bias"), (inner,)),
            _linear(
                f"{prefix}.x_proj.weight",
                (*ours, "x_proj", "kernel"),
                (inner,),
                (rank + 2 * state,),
            ),
            _linear(f"{prefix}.dt_proj.weight", (*ours, "dt_proj_kernel"), (rank,), (inner,)),
            _bias(f"{prefix}.dt_proj.bias", (*ours, "dt_bias"), (inner,)),
            _copy(f"{prefix}.A_log", (*ours, "A_log"), (inner, state)),
            _copy(f"{prefix}.D", (*ours, "D"), (inner,)),
            _linear(f"{prefix}.out_proj.weight", (*ours, "out_proj", "kernel"), (inner,), (d,)),
        ]
    if mixer == "mamba2":
        section = config.mamba2
        inner, kernel_size = section.inner_dim(d), section.conv_kernel_size
        heads, channels = section.heads(d), section.conv_channels(d)
        return [
            _linear(
                f"{prefix}.in_proj.weight",
                (*ours, "in_proj", "kernel"),
                (d,),
                (inner + channels + heads,),
            ),
            _conv(f"{prefix}.conv1d.weight", (*ours, "conv_weight"), kernel_size, channels),
            _bias(f"{prefix}.conv1d.bias", (*ours, "conv_bias"), (channels,)),
            _copy(f"{prefix}.dt_bias", (*ours, "dt_bias"), (heads,)),
            _copy(f"{prefix}.A_log", (*ours, "A_log"), (heads,)),
            _copy(f"{prefix}.D", (*ours, "D"), (heads,)),
            _copy(f"{prefix}.norm.weight", (*ours, "norm_weight"), (inner,)),
            _linear(f"{prefix}.out_proj.weight", (*ours, "out_proj", "kernel"), (inner,), (d,)),
        ]
    raise UnsupportedCheckpointError(
        f"layer {index} is {mixer!r}: the mamba_ssm layout holds only mamba and mamba2 layers"
    )


def mamba_parameter_rules(config: ModelConfig) -> list[_Rule]:
    """One rule per tensor of the mamba_ssm layout, in its state-dict order."""
    if config.use_mlp:
        raise UnsupportedCheckpointError("use_mlp=True: mamba_ssm blocks have no MLP")
    rules = [_copy(EMBEDDING_KEY, ("embedding",), (config.padded_vocab_size, config.d_model))]
    for index, mixer in enumerate(config.layer_pattern):
        rules += _norm_rules(config, f"backbone.layers.{index}.norm", (f"layers_{index}", "norm1"))
        rules += _mixer_rules(config, index, mixer)
    rules += _norm_rules(config, FINAL_NORM_PREFIX, ("final_norm",))
    return rules


def import_mamba_state_dict(
    state_dict: Mapping[str, Any], config: ModelConfig
) -> tuple[Params, list[str]]:
    """Our float32 parameter tree from a mamba_ssm state dict (keys already cleaned), in the
    parameter layout of ``config`` (``jaxbased.layer_layout``).

    Returns ``(params, ignored_keys)`` (``lm_head.weight``, checked to equal the embedding).
    Raises :class:`~jaxbased.interop.CheckpointMismatchError` naming every missing,
    unexpected and mis-shaped key at once.
    """
    rules = mamba_parameter_rules(config)
    expected = {rule.key: rule.reference_shape for rule in rules}

    def extra_key(key: str, found: dict, report: Any) -> None:
        if key == LM_HEAD_KEY:
            check_tied_head(state_dict, found, expected, report, EMBEDDING_KEY)
        else:
            report.unexpected.append(key)

    params, ignored = params_from_rules(state_dict, rules, extra_key)
    return convert_layout(params, config), ignored


def export_mamba_state_dict(
    params: Mapping[str, Any], config: ModelConfig, *, include_lm_head: bool = True
) -> dict[str, np.ndarray]:
    """The mamba_ssm state dict (float32 NumPy) of our parameters, with ``lm_head.weight`` (a
    copy of the embedding) unless ``include_lm_head`` is False.

    ``params`` may have either layout (``jaxbased.layer_layout``). Raises ``ValueError`` naming
    every parameter whose shape does not fit ``config``.
    """
    params = to_unrolled(params, config)
    return state_from_rules(params, mamba_parameter_rules(config), EMBEDDING_KEY, include_lm_head)
