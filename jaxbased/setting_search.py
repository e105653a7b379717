"""What fits: the training setting (micro-batch x gradient accumulation x remat) for a device.

For a config, a mesh ``(data, fsdp, tensor, sequence)``, a global batch and a sequence length,
every candidate setting is sized per device:

- parameters and optimizer state: exact, from the sharding rules (``jaxbased.planning``;
  replicated over ``sequence``);
- gradients and activations: the :class:`~jaxbased.activation_model.ActivationModel` fitted for
  each remat setting (its parameter-sized part split like the parameters). With ``sequence`` = n
  the probes train on one slice, ``seq_len / n`` tokens, and every sequence of a micro-batch adds
  what the time-split mixers hold beyond the slice's step (:mod:`jaxbased.sequence_memory`).

A candidate fits when the sum is at most ``memory_fraction`` of the device memory. Of those that
fit, the chosen one recomputes least (``none`` before ``minimal`` before ``full``) and, among
equals, accumulates over the fewest micro-batches. When none fits, the search doubles the FSDP
axis until a mesh fits and names it. See docs/planning.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from jaxbased.activation_model import ActivationModel, fit_activation_model, parameter_bytes
from jaxbased.config import REMAT_POLICIES, ModelConfig
from jaxbased.layer_layout import find_repeating_unit
from jaxbased.planning import plan_memory
from jaxbased.sequence_memory import sequence_bytes
from jaxbased.sequence_sharding import check_sequence_sharding
from jaxbased.sharding import MESH_AXES, SEQUENCE_AXIS, mesh_sizes_as_given

#: Memory of common accelerators (bytes per device, as the device reports its total).
DEVICE_MEMORY_PRESETS: MappingProxyType[str, int] = MappingProxyType(
    {
        "a100-40gb": 40 * 2**30,
        "a100-80gb": 80 * 2**30,
        "h100-80gb": 80 * 2**30,
        "h200": 141 * 2**30,
        "b200": 180 * 2**30,
        "tpu-v4": 32 * 2**30,
        "tpu-v5e": 16 * 2**30,
        "tpu-v5p": 95 * 2**30,
        "tpu-v6e": 32 * 2**30,
    }
)

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

#: The largest device count the mesh search tries before it gives up.
MAX_SEARCH_DEVICES = 65536


def parse_device_memory(text: str) -> int:
    """Bytes from ``"80GiB"``, ``"141 GiB"``, ``"96GB"``, ``"1.5TiB"`` or a preset name
    (:data:`DEVICE_MEMORY_PRESETS`, case-insensitive)."""
    preset = DEVICE_MEMORY_PRESETS.get(str(text).strip().lower())
    if preset is not None:
        return preset
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"device_memory={text!r} is not a size; give a number and a unit from "
            f"{', '.join(unit.replace('I', 'i') for unit in _UNITS)} (e.g. 80GiB) or one of "
            f"{', '.join(DEVICE_MEMORY_PRESETS)}"
        )
    return int(float(match.group(1)) * _UNITS[unit])


@dataclasses.dataclass(frozen=True)
class Setting:
    """One candidate training setting and its per-device bytes."""

    mesh: dict[str, int]
    remat: str
    micro_batch: int
    grad_accum_steps: int
    parameters: int
    optimizer_state: int
    gradients: int
    activations: int
    scan_layers: bool
    budget: int

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer_state + self.gradients + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def overrides(self, *, batch_size: int, seq_len: int) -> dict[str, object]:
        """The ``train.py`` config overrides that run this setting."""
        return {
            "data.batch_size": batch_size,
            "data.seq_len": seq_len,
            **{f"mesh.{axis}": size for axis, size in self.mesh.items()},
            "train.grad_accum_steps": self.grad_accum_steps,
            "model.remat": self.remat,
            "model.scan_layers": self.scan_layers,
        }


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Every candidate on the requested mesh, the chosen one, and (when none fits there) the
    smallest mesh with a fitting setting."""

    candidates: tuple[Setting, ...]
    chosen: Setting | None
    smallest_fitting: Setting | None
    budget: int


def _rank(setting: Setting) -> tuple[int, int]:
    return REMAT_POLICIES.index(setting.remat), setting.grad_accum_steps


def settings_on_mesh(
    config: ModelConfig,
    models: Mapping[str, ActivationModel],
    mesh: dict[str, int],
    *,
    seq_len: int,
    batch_size: int,
    budget: int,
) -> list[Setting]:
    """Every (remat, micro-batch) setting of ``mesh``: micro-batches divide the per-device
    batch ``batch_size / (data * fsdp)``. ``models`` are fitted on the slice of
    ``seq_len / sequence`` tokens."""
    shards = mesh["data"] * mesh["fsdp"]
    if batch_size % shards:
        return []
    per_device = batch_size // shards
    plan = plan_memory(config, mesh, seq_len=seq_len, batch_size=batch_size, activations=False)
    parameter_share = plan.parameters / parameter_bytes(config)
    settings = []
    for remat in REMAT_POLICIES:
        if remat not in models:
            continue
        scanned = models[remat].probes == "scanned"
        sequence = sequence_bytes(
            config.replace(remat=remat, scan_layers=scanned),
            shards=mesh[SEQUENCE_AXIS],
            seq_len=seq_len,
            tensor=mesh["tensor"],
        )
        for micro_batch in (m for m in range(per_device, 0, -1) if per_device % m == 0):
            accumulation = per_device // micro_batch
            estimate = models[remat].estimate(micro_batch, accumulating=accumulation > 1)
            settings.append(
                Setting(
                    mesh=dict(mesh),
                    remat=remat,
                    micro_batch=micro_batch,
                    grad_accum_steps=accumulation,
                    parameters=plan.parameters,
                    optimizer_state=plan.optimizer_state,
                    gradients=math.ceil(estimate.gradients * parameter_share),
                    activations=math.ceil(
                        estimate.activations + micro_batch * sequence.memory_per_row
                    ),
                    scan_layers=models[remat].probes == "scanned",
                    budget=budget,
                )
            )
    return settings


def search_settings(
    config: ModelConfig,
    mesh_shape: Sequence[int] | Mapping[str, int],
    *,
    seq_len: int,
    batch_size: int,
    device_memory: int,
    memory_fraction: float = 0.9,
    remats: Sequence[str] = REMAT_POLICIES,
    models: Mapping[str, ActivationModel] | None = None,
) -> SearchResult:
    """Search micro-batch x accumulation x remat on ``mesh_shape`` (sizes of data, fsdp,
    tensor and optionally sequence) for a global ``batch_size`` of ``seq_len`` tokens; see the
    module docstring. A ``sequence`` size that the model or ``seq_len`` cannot split raises
    ``ValueError`` before any compile (``check_sequence_sharding``).

    The search plans scanned layers whenever the pattern repeats (``scan_layers=True``: a
    faster compile, and remat saves memory across the scan's iterations on every backend).
    ``models`` (one fitted :class:`ActivationModel` per remat setting) are fitted when not
    given (four probe compiles per setting for a scanned pattern), on ``seq_len / sequence``
    tokens; given ones must have been fitted on that length.
    """
    sizes = mesh_sizes_as_given(mesh_shape)
    if any(size < 1 for size in sizes):
        raise ValueError(f"mesh={sizes} must give sizes >= 1 for {MESH_AXES}")
    sequence = sizes[MESH_AXES.index(SEQUENCE_AXIS)]
    check_sequence_sharding(config, sequence, seq_len)
    slice_tokens = seq_len // sequence
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction={memory_fraction} must be in (0, 1]")
    if device_memory <= 0:
        raise ValueError(f"device_memory={device_memory} must be > 0 bytes")
    unknown = sorted(set(remats) - set(REMAT_POLICIES))
    if unknown or not remats:
        raise ValueError(f"remats={list(remats)} must be a non-empty subset of {REMAT_POLICIES}")
    mesh = dict(zip(MESH_AXES, sizes, strict=True))
    if batch_size % (mesh["data"] * mesh["fsdp"]):
        raise ValueError(
            f"batch_size={batch_size} is not divisible by data x fsdp = "
            f"{mesh['data'] * mesh['fsdp']}"
        )
    if models is None:
        scan = find_repeating_unit(config.layer_pattern) is not None
        models = {
            remat: fit_activation_model(
                config.replace(remat=remat, scan_layers=scan), seq_len=slice_tokens
            )
            for remat in remats
        }
    stale = {
        remat: model.seq_len for remat, model in models.items() if model.seq_len != slice_tokens
    }
    if stale:
        raise ValueError(
            f"models were fitted on {stale} tokens; mesh {SEQUENCE_AXIS}={sequence} trains on "
            f"slices of seq_len / {sequence} = {slice_tokens} tokens: fit them on that length"
        )
    budget = int(device_memory * memory_fraction)
    candidates = settings_on_mesh(
        config, models, mesh, seq_len=seq_len, batch_size=batch_size, budget=budget
    )
    fitting = sorted((s for s in candidates if s.fits), key=_rank)
    chosen = fitting[0] if fitting else None
    smallest = None
    if chosen is None:
        fsdp = mesh["fsdp"] * 2
        while mesh["data"] * fsdp * mesh["tensor"] <= MAX_SEARCH_DEVICES:
            bigger = dict(mesh, fsdp=fsdp)
            options = settings_on_mesh(
                config, models, bigger, seq_len=seq_len, batch_size=batch_size, budget=budget
            )
            if not options:
                break  # the batch no longer splits over the mesh
            fitting_there = sorted((s for s in options if s.fits), key=_rank)
            if fitting_there:
                smallest = fitting_there[0]
                break
            fsdp *= 2
    return SearchResult(
        candidates=tuple(candidates), chosen=chosen, smallest_fitting=smallest, budget=budget
    )


def format_search(result: SearchResult, *, config_path: str, batch_size: int, seq_len: int) -> str:
    """The search as a table of candidates (best first) and the chosen setting's flags."""

    def gib(value: float) -> str:
        return f"{value / 2**30:9.2f}"

    lines = [
        f"budget per device: {result.budget / 2**30:.2f} GiB",
        f"{'remat':<8} {'micro':>5} {'accum':>5} {'params':>9} {'optim':>9} {'grads':>9} "
        f"{'activ':>9} {'total':>9}  fits   (GiB per device)",
    ]
    for setting in sorted(result.candidates, key=lambda s: (not s.fits, *_rank(s)))[:12]:
        lines.append(
            f"{setting.remat:<8} {setting.micro_batch:>5} {setting.grad_accum_steps:>5} "
            f"{gib(setting.parameters)} {gib(setting.optimizer_state)} "
            f"{gib(setting.gradients)} {gib(setting.activations)} {gib(setting.total)}  "
            f"{'yes' if setting.fits else 'no'}"
        )
    chosen = result.chosen or result.smallest_fitting
    if result.chosen is None:
        if chosen is None:
            lines.append(
                "nothing fits on this mesh, nor on any mesh with a larger fsdp axis up to "
                f"{MAX_SEARCH_DEVICES} devices that divides batch_size={batch_size}: lower "
                "data.batch_size or data.seq_len, or use devices with more memory"
            )
            return "\n".join(lines)
        devices = math.prod(chosen.mesh.values())
        lines.append(
            "nothing fits on this mesh; the smallest mesh that fits is "
            + " x ".join(f"{axis} {size}" for axis, size in chosen.mesh.items())
            + f" ({devices} devices), with remat={chosen.remat}, micro-batch "
            f"{chosen.micro_batch} ({chosen.total / 2**30:.2f} GiB per device)"
        )
    else:
        lines.append(
            f"chosen: remat={chosen.remat}, {chosen.micro_batch} sequences per micro-batch, "
            f"{chosen.grad_accum_steps} accumulation steps, {chosen.total / 2**30:.2f} GiB "
            "per device"
        )
    flags = " ".join(
        f"--config.{name}={value}"
        for name, value in chosen.overrides(batch_size=batch_size, seq_len=seq_len).items()
    )
    lines.append(f"flags: train.py --config={config_path} {flags}")
    return "\n".join(lines)
