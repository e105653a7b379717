"""Scanned layers: the repeating unit of a layer pattern and the two parameter layouts.

With ``ModelConfig.scan_layers`` the model runs the repeating unit of its ``layer_pattern``
under ``nn.scan`` (docs/model.md#scanned-layers). :func:`find_repeating_unit` splits the
pattern as ``head + unit * repeats + remainder`` (``repeats >= 2``; the head is empty whenever
the pattern repeats from its first layer); the unit's blocks are compiled once and their
parameters stacked along a leading axis of length ``repeats`` (logical axis ``"layers"``, never
split over the mesh); the head and the remainder run unrolled. Layers are compared by mixer name
and by their mixer's ``layer_variant`` (a layer whose parameters or cache differ from its
neighbours', such as TransNormerLLM's LRPE layer, never shares a scanned body with them).

The two layouts of a parameter tree (and of any tree that mirrors it, such as AdamW's ``mu`` and
``nu`` inside an optimizer state):

- unrolled: ``layers_0``, ``layers_1``, ... one subtree per layer;
- stacked: ``scanned_layers/block_j`` for the unit's position ``j``, each leaf ``[repeats, ...]``
  where row ``r`` is layer ``start + r * len(unit) + j``; the head's and the remainder's layers
  keep their unrolled names ``layers_i``.

:func:`convert_layout` converts any tree between them, exactly (only stacking and slicing), so a
checkpoint of either layout loads into a model of either.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxbased.config import ModelConfig

#: Name of the stacked unit's subtree in a scanned model's parameters.
SCANNED_LAYERS = "scanned_layers"
#: Logical axis name of the leading layer axis of stacked parameters (replicated on the mesh).
LAYER_AXIS = "layers"
#: A key that every parameter tree of the model has at its top level (both layouts).
_TOP_LEVEL_KEY = "embedding"


@dataclasses.dataclass(frozen=True)
class ScanPlan:
    """``layer_pattern == head + unit * repeats + remainder`` with ``len(head) == start``.

    Attributes:
      unit: mixer names of the repeating unit (its blocks are scanned).
      repeats: how many times the unit repeats after the head (>= 2).
      remainder: mixer names of the layers after the repeats (run unrolled).
      start: layers before the repeats (the head, run unrolled); 0 when the pattern repeats
        from its first layer.
    """

    unit: tuple[str, ...]
    repeats: int
    remainder: tuple[str, ...]
    start: int = 0

    @property
    def scanned_layers(self) -> int:
        """Number of layers run under the scan: ``len(unit) * repeats``."""
        return len(self.unit) * self.repeats

    @property
    def scanned_range(self) -> range:
        """Indices of the scanned layers: ``start .. start + scanned_layers - 1``."""
        return range(self.start, self.start + self.scanned_layers)

    @property
    def compiled_blocks(self) -> int:
        """Blocks the compiler sees: the head, one unit and the remainder."""
        return self.start + len(self.unit) + len(self.remainder)

    def unit_layer(self, repeat: int, position: int) -> int:
        """The layer index of the unit's block ``position`` in repeat ``repeat``."""
        return self.start + repeat * len(self.unit) + position


def _best_plan(keys: tuple[Hashable, ...], names: tuple[str, ...], start: int) -> ScanPlan | None:
    best: ScanPlan | None = None
    rest = keys[start:]
    for period in range(1, len(rest) // 2 + 1):
        unit = rest[:period]
        repeats = 1
        while rest[repeats * period : (repeats + 1) * period] == unit:
            repeats += 1
        if repeats < 2:
            continue
        end = start + repeats * period
        plan = ScanPlan(
            unit=names[start : start + period],
            repeats=repeats,
            remainder=names[end:],
            start=start,
        )
        if best is None or plan.compiled_blocks < best.compiled_blocks:
            best = plan
    return best


def find_repeating_unit(
    pattern: Sequence[str], variants: Sequence[Hashable] | None = None
) -> ScanPlan | None:
    """The split ``head + unit * repeats + remainder`` of ``pattern`` (``repeats >= 2``), or
    None when no part of the pattern repeats.

    Layers are equal when their names and their ``variants`` (default: all alike) are. A split
    without a head is taken whenever one exists: the one that leaves the compiler the fewest
    blocks (``len(unit) + len(remainder)``; the shortest unit on a tie). Only a pattern that does
    not repeat from its first layer gets a head: the shortest head after which some unit
    repeats, with the fewest blocks for it.

    The fewest blocks rather than the shortest unit: ``"M-M-M*-M-M--" * 4`` also starts with
    ``"M-" * 2``, but its unit of 12 layers repeated 4 times leaves 12 blocks, not 46.
    """
    names = tuple(pattern)
    variants = (None,) * len(names) if variants is None else tuple(variants)
    if len(variants) != len(names):
        raise ValueError(f"{len(variants)} variants for a pattern of {len(names)} layers")
    keys = tuple(zip(names, variants, strict=True))
    for start in range(len(names) - 1):
        plan = _best_plan(keys, names, start)
        if plan is not None:
            return plan
    return None


def layer_variants(config: ModelConfig) -> tuple[Hashable, ...]:
    """Each layer's ``layer_variant`` from its mixer's section (None: like every other layer
    of that mixer)."""
    return tuple(
        getattr(config, name).layer_variant(index, config.num_layers)
        for index, name in enumerate(config.layer_pattern)
    )


def repeating_unit(config: ModelConfig) -> ScanPlan | None:
    """:func:`find_repeating_unit` of ``config``'s pattern and layer variants (whatever
    ``scan_layers`` says)."""
    return find_repeating_unit(config.layer_pattern, layer_variants(config))


@functools.cache
def _log_unrolled_fallback(pattern: tuple[str, ...]) -> None:
    logging.info(
        "scan_layers: layer_pattern %s has no repeating unit; its %d layers run unrolled",
        list(pattern),
        len(pattern),
    )


def scan_plan(config: ModelConfig) -> ScanPlan | None:
    """How ``config``'s model scans its layers, or None when it runs them unrolled
    (``scan_layers`` is False, or the pattern has no repeat: logged once per pattern)."""
    if not config.scan_layers:
        return None
    plan = repeating_unit(config)
    if plan is None:
        _log_unrolled_fallback(tuple(config.layer_pattern))
    return plan


def is_stacked(config: ModelConfig) -> bool:
    """Whether ``config``'s parameters have the stacked layout."""
    return scan_plan(config) is not None


def layer_name(index: int) -> str:
    """The unrolled name of layer ``index``: ``layers_{index}``."""
    return f"layers_{index}"


def unit_block_name(position: int) -> str:
    """The name of the unit's block at ``position`` under ``scanned_layers``."""
    return f"block_{position}"


def _is_parameter_dict(node: Any) -> bool:
    return isinstance(node, Mapping) and _TOP_LEVEL_KEY in node


def _is_box(node: Any) -> bool:
    return isinstance(node, nn.Partitioned)


def _stack(values: Sequence[Any]) -> Any:
    first = values[0]
    if _is_box(first):  # logical names gain the leading layer axis
        return first.replace(
            value=_stack([box.value for box in values]), names=(LAYER_AXIS, *first.names)
        )
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values), *first.shape), first.dtype)
    if isinstance(first, np.ndarray | np.generic):
        return np.stack(values)
    return jnp.stack(values)


def _row(value: Any, row: int) -> Any:
    if _is_box(value):
        return value.replace(value=_row(value.value, row), names=tuple(value.names[1:]))
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
    return value[row]


def _stack_dict(tree: Mapping[str, Any], plan: ScanPlan) -> dict[str, Any]:
    period = len(plan.unit)
    missing = [layer_name(i) for i in plan.scanned_range if layer_name(i) not in tree]
    if missing:
        raise ValueError(f"an unrolled parameter tree lacks {missing}; has {sorted(tree)}")
    stacked = {
        unit_block_name(position): jax.tree.map(
            lambda *values: _stack(values),
            *(tree[layer_name(plan.unit_layer(r, position))] for r in range(plan.repeats)),
            is_leaf=_is_box,
        )
        for position in range(period)
    }
    scanned_names = {layer_name(i) for i in plan.scanned_range}
    result = {name: value for name, value in tree.items() if name not in scanned_names}
    result[SCANNED_LAYERS] = stacked
    return result


def _unstack_dict(tree: Mapping[str, Any], plan: ScanPlan) -> dict[str, Any]:
    period = len(plan.unit)
    stacked = tree[SCANNED_LAYERS]
    if sorted(stacked) != sorted(unit_block_name(j) for j in range(period)):
        raise ValueError(
            f"a stacked parameter tree has {sorted(stacked)} under {SCANNED_LAYERS!r}; the "
            f"pattern's unit {list(plan.unit)} needs block_0..block_{period - 1}"
        )
    result = {name: value for name, value in tree.items() if name != SCANNED_LAYERS}
    for position in range(period):
        for row in range(plan.repeats):
            result[layer_name(plan.unit_layer(row, position))] = jax.tree.map(
                lambda value, row=row: _row(value, row),
                stacked[unit_block_name(position)],
                is_leaf=_is_box,
            )
    return result


def convert_layout(tree: Any, config: ModelConfig) -> Any:
    """``tree`` in the parameter layout of ``config`` (stacked when :func:`is_stacked`).

    ``tree`` is a parameter tree, or any pytree holding parameter-shaped dicts (a train state,
    an optimizer state's ``mu`` / ``nu``): every dict with an ``embedding`` key is converted,
    whichever layout it has; everything else is kept. Leaves may be NumPy or JAX arrays or
    ``jax.ShapeDtypeStruct``, boxed or not in ``nn.Partitioned`` (whose logical names gain or
    lose the leading ``"layers"``); values are only stacked or sliced, so the conversion is
    exact and the two directions are inverses. Call it under ``jax.jit`` (with ``out_shardings``) to
    convert sharded device arrays in place on their devices.
    """
    plan = repeating_unit(config)
    want_stacked = is_stacked(config)

    def convert(node: Any) -> Any:
        if not _is_parameter_dict(node):
            return node
        has_stacked = SCANNED_LAYERS in node
        if has_stacked == want_stacked:
            return node
        if plan is None:
            raise ValueError(
                f"a stacked parameter tree does not fit layer_pattern {list(config.layer_pattern)}"
                ", which has no repeating unit"
            )
        return _stack_dict(node, plan) if want_stacked else _unstack_dict(node, plan)

    return jax.tree.map(convert, tree, is_leaf=_is_parameter_dict)


def to_unrolled(tree: Any, config: ModelConfig) -> Any:
    """``tree`` (see :func:`convert_layout`) in the unrolled layout ``layers_0, layers_1, ...``
    of ``config``'s pattern, whichever layout it has."""
    return convert_layout(tree, unrolled_config(config))


def unrolled_config(config: ModelConfig) -> ModelConfig:
    """``config`` with ``scan_layers=False`` (the same function, the unrolled layout)."""
    if not config.scan_layers:
        return config
    return dataclasses.replace(config, scan_layers=False)
