"""Bytes that a compiled SPMD program's collective-permutes and all-reduces move, read from its
HLO text.

``collective_bytes(hlo)`` sums, per kind, the bytes each device passes to a
``collective-permute`` or an ``all-reduce`` (both return an array of their operand's shape, which
compiled HLO prints where it names the operands only), and splits the collective-permutes by the
model layer named in their metadata (``.../layers_3/mixer/.../shard_map/ppermute``). An
asynchronous ``-start``/``-done`` pair counts once: the ``-start``'s result tuple begins with
its operand. The numbers are per device: an SPMD program is the same on every device.
"""

from __future__ import annotations

import math
import re

#: Bytes per element of the HLO element types that activations, states and labels use.
ELEMENT_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
COLLECTIVES = ("collective-permute", "all-reduce")
_CALL = re.compile(rf"= (\(.*?\)|\S+) ({'|'.join(COLLECTIVES)})(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(ELEMENT_BYTES) + r")\[([0-9,]*)\]")
_LAYER = re.compile(r"/(layers_\d+)/")


def shape_bytes(text: str) -> int:
    """Total bytes of every ``f32[2,4,9]``-style array shape in ``text``."""
    total = 0
    for element, dims in _SHAPE.findall(text):
        sizes = [int(size) for size in dims.split(",") if size]
        total += math.prod(sizes) * ELEMENT_BYTES[element]
    return total


def collective_bytes(hlo: str) -> dict:
    """``{"by_kind": {kind: bytes}, "permutes_by_layer": {layer: bytes},
    "other_permutes": bytes}`` of compiled HLO text, operand bytes per device."""
    by_kind = dict.fromkeys(COLLECTIVES, 0)
    by_layer: dict[str, int] = {}
    other_permutes = 0
    for line in hlo.splitlines():
        match = _CALL.search(line)
        if not match:
            continue
        result, kind, started = match.groups()
        shapes = _SHAPE.findall(result)
        if started:  # (operand, result, contexts...): the operand only
            shapes = (
                shapes[: max(1, (len(shapes) - 2) // 2)]
                if kind == "collective-permute"
                else shapes[:1]
            )
        size = sum(shape_bytes(f"{element}[{dims}]") for element, dims in shapes)
        by_kind[kind] += size
        if kind == "collective-permute":
            layer = _LAYER.search(line)
            if layer and "shard_map/ppermute" in line:
                by_layer[layer.group(1)] = by_layer.get(layer.group(1), 0) + size
            else:
                other_permutes += size
    return {"by_kind": by_kind, "permutes_by_layer": by_layer, "other_permutes": other_permutes}
