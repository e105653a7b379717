"""Bytes that a compiled SPMD program's collectives move, read from its HLO text.

``collective_bytes(hlo)`` sums, per kind, the bytes each device passes to a
``collective-permute``, an ``all-reduce``, an ``all-gather`` or a ``reduce-scatter``. Compiled
HLO prints only the result's shape: a permute and an all-reduce return their operand's shape, an
all-gather ``g`` times its operand and a reduce-scatter ``1 / g`` of it, for ``g`` devices in its
replica group. It splits the collective-permutes by the model layer named in their metadata
(``.../layers_3/mixer/.../shard_map/ppermute``), and also gives each layer's total *sent* bytes
inside its ``shard_map``: a permute sends its operand, and an all-gather or a reduce-scatter on
a ring sends ``g - 1`` shards (the all-gather's operand, the reduce-scatter's result). An
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
COLLECTIVES = ("collective-permute", "all-reduce", "all-gather", "reduce-scatter")
GATHERS = ("all-gather", "reduce-scatter")
_CALL = re.compile(rf"= (\(.*?\)|\S+) ({'|'.join(COLLECTIVES)})(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(ELEMENT_BYTES) + r")\[([0-9,]*)\]")
_LAYER = re.compile(r"/(layers_\d+)/")
_GROUP_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUP_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]")


def group_size(line: str) -> int:
    """Devices in the first replica group of a collective's HLO line (1 when none is named):
    ``replica_groups={{0,1,2,3},...}`` or the iota form ``replica_groups=[2,4]<=[8]``."""
    listed = _GROUP_LIST.search(line)
    if listed:
        return len([device for device in listed.group(1).split(",") if device])
    iota = _GROUP_IOTA.search(line)
    return int(iota.group(1)) if iota else 1


def shape_bytes(text: str) -> int:
    """Total bytes of every ``f32[2,4,9]``-style array shape in ``text``."""
    total = 0
    for element, dims in _SHAPE.findall(text):
        sizes = [int(size) for size in dims.split(",") if size]
        total += math.prod(sizes) * ELEMENT_BYTES[element]
    return total


def collective_bytes(hlo: str) -> dict:
    """``{"by_kind": {kind: bytes}, "permutes_by_layer": {layer: bytes},
    "other_permutes": bytes, "sent_by_layer": {layer: bytes}}`` of compiled HLO text: operand
    bytes per device, and the bytes each layer's ``shard_map`` collectives send per device
    (module docstring)."""
    by_kind = dict.fromkeys(COLLECTIVES, 0)
    by_layer: dict[str, int] = {}
    sent_by_layer: dict[str, int] = {}
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
        layer = _LAYER.search(line)
        in_layer = layer is not None and "/shard_map/" in line
        if kind in GATHERS:
            devices = group_size(line)
            gathered = kind == "all-gather" and not started  # the result: g shards
            shard = size // devices if gathered else size
            by_kind[kind] += shard if kind == "all-gather" else shard * devices
            if in_layer:
                name = layer.group(1)
                sent_by_layer[name] = sent_by_layer.get(name, 0) + (devices - 1) * shard
            continue
        by_kind[kind] += size
        if kind == "collective-permute":
            if in_layer and "shard_map/ppermute" in line:
                name = layer.group(1)
                by_layer[name] = by_layer.get(name, 0) + size
                sent_by_layer[name] = sent_by_layer.get(name, 0) + size
            else:
                other_permutes += size
    return {
        "by_kind": by_kind,
        "permutes_by_layer": by_layer,
        "other_permutes": other_permutes,
        "sent_by_layer": sent_by_layer,
    }
