"""Reading the flat model configs written before ``ModelConfig`` had one section per mixer.

Checkpoints and ``config.json`` files of that time store one flat record of 44 fields
(``feature_dim``, ``chunk_size``, ``attention_heads``, ``mamba2_state_dim``, ...).
:func:`upgrade_flat_config` moves each old field to the section field(s) it fed. Some old fields
fed several mixers at once and so fill several sections: ``chunk_size`` and
``linear_attention_algorithm`` both ``based`` and ``decay_attention``; ``attention_heads``,
``rotary_fraction`` and ``rotary_base`` both ``sliding_window`` and ``attention``; ``ssm_*``
both ``mamba`` and ``mamba2``. Only the sections the model uses (its layer pattern's mixers, and
``mlp`` when it has MLPs) are filled; the others keep their defaults, since an old record gave
every shared field a value whether or not a layer read it. Model-level fields keep their names.
This table is history: new mixers never add to it. See docs/checkpoints.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any


def _to(*targets: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return targets


#: Old flat field -> the ``(section, field)`` pairs it becomes.
LEGACY_FIELDS: MappingProxyType[str, tuple[tuple[str, str], ...]] = MappingProxyType(
    {
        "mlp_inner_dim": _to(("mlp", "inner_dim")),
        "mlp_multiple_of": _to(("mlp", "multiple_of")),
        "linear_attention_heads": _to(("based", "heads")),
        "feature_dim": _to(("based", "feature_dim")),
        "feature_map": _to(("based", "feature_map")),
        "linear_attention_eps": _to(("based", "eps")),
        "linear_attention_algorithm": _to(("based", "algorithm"), ("decay_attention", "algorithm")),
        "chunk_size": _to(("based", "chunk_size"), ("decay_attention", "chunk_size")),
        "attention_heads": _to(("sliding_window", "heads"), ("attention", "heads")),
        "window": _to(("sliding_window", "window")),
        "rotary_fraction": _to(
            ("sliding_window", "rotary_fraction"), ("attention", "rotary_fraction")
        ),
        "rotary_base": _to(("sliding_window", "rotary_base"), ("attention", "rotary_base")),
        "conv_kernel_size": _to(("base_conv", "kernel_size")),
        "conv_expand": _to(("base_conv", "expand")),
        "ssm_expand": _to(("mamba", "expand"), ("mamba2", "expand")),
        "ssm_conv_kernel_size": _to(("mamba", "conv_kernel_size"), ("mamba2", "conv_kernel_size")),
        "ssm_dt_min": _to(("mamba", "dt_min"), ("mamba2", "dt_min")),
        "ssm_dt_max": _to(("mamba", "dt_max"), ("mamba2", "dt_max")),
        "ssm_dt_init_floor": _to(("mamba", "dt_init_floor"), ("mamba2", "dt_init_floor")),
        "mamba_state_dim": _to(("mamba", "state_dim")),
        "mamba_dt_rank": _to(("mamba", "dt_rank")),
        "mamba_scan_algorithm": _to(("mamba", "scan_algorithm")),
        "mamba_chunk_size": _to(("mamba", "chunk_size")),
        "mamba2_state_dim": _to(("mamba2", "state_dim")),
        "mamba2_head_dim": _to(("mamba2", "head_dim")),
        "mamba2_groups": _to(("mamba2", "groups")),
        "mamba2_chunk_size": _to(("mamba2", "chunk_size")),
        "mamba2_a_init_min": _to(("mamba2", "a_init_min")),
        "mamba2_a_init_max": _to(("mamba2", "a_init_max")),
        "decay_attention_heads": _to(("decay_attention", "heads")),
        "decay_key_dim": _to(("decay_attention", "key_dim")),
        "decay_feature_map": _to(("decay_attention", "feature_map")),
        "decay_output_gate": _to(("decay_attention", "output_gate")),
    }
)


def is_legacy_flat(values: Mapping[str, Any]) -> bool:
    """Whether ``values`` holds any old flat field name."""
    return any(name in LEGACY_FIELDS for name in values)


def upgrade_flat_config(values: Mapping[str, Any], used_sections: Iterable[str]) -> dict[str, Any]:
    """``values`` with each old flat field moved into its section(s) among ``used_sections``
    (old fields that feed only unused sections are dropped).

    A field also given in the nested form must agree with the old one; otherwise the result
    would depend on the order of reading, and this raises ``ValueError`` naming both.
    """
    used = set(used_sections)
    upgraded: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if name in LEGACY_FIELDS:
            for section, field in LEGACY_FIELDS[name]:
                if section in used:
                    sections.setdefault(section, {})[field] = value
        else:
            upgraded[name] = value
    for section, fields in sections.items():
        nested = dict(upgraded.get(section) or {})
        for field, value in fields.items():
            if field in nested and nested[field] != value:
                raise ValueError(
                    f"{section}.{field}={nested[field]!r} disagrees with the old flat field "
                    f"giving {value!r}; give one of them"
                )
            nested[field] = value
        upgraded[section] = nested
    return upgraded
