"""``jaxbased-plan``: per-device memory of a config on a mesh, before launching it.

    jaxbased-plan --config=configs/based_1b.py --mesh=1,8,1
    jaxbased-plan --config=configs/based_360m.py --mesh=2,2,2 --config.data.batch_size=64 \
        --generate_batch=16 --max_len=8192

``--mesh`` gives the sizes of (data, fsdp, tensor) or (data, fsdp, tensor, sequence); the
default is the config's ``mesh`` section (which must then have no -1). A ``sequence`` size splits
every sequence's tokens (docs/sequence_parallelism.md): the plan sizes the step of one slice and
prints the bytes each device sends over that axis per step.

    jaxbased-plan --config=configs/based_360m.py --mesh=1,1,1,8 \
        --config.data.seq_len=131072 --config.data.batch_size=1

Activations come from compiling one train step of the per-device batch on this host
(``--noactivations`` skips that for big models on small hosts).

``--device_memory=141GiB`` (or an accelerator name) searches the training setting that fits
instead (``jaxbased.setting_search``).
"""

from __future__ import annotations

from typing import Any

from absl import flags
from ml_collections import config_flags

from jaxbased.cli import command, errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file")
_MESH = flags.DEFINE_list(
    "mesh", None, "data,fsdp,tensor[,sequence] sizes (default: the config's mesh)"
)
_GENERATE_BATCH = flags.DEFINE_integer("generate_batch", 1, "sequences decoded at once")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "generation length (default: data.seq_len)")
_ACTIVATIONS = flags.DEFINE_bool("activations", True, "compile a train step for activations")
_DEVICE_MEMORY = flags.DEFINE_string(
    "device_memory",
    None,
    "search the setting that fits this much memory per device: a size (80GiB, 141GiB, 96GB) or "
    "an accelerator (h200, a100-80gb, tpu-v5p, ...)",
)
_MEMORY_FRACTION = flags.DEFINE_float(
    "memory_fraction", 0.9, "share of --device_memory the plan may fill (headroom for XLA)"
)


def parse_mesh(values: list[str] | None) -> list[int] | None:
    """``--mesh=1,8,1`` or ``--mesh=1,1,1,8`` as three or four positive sizes (None when not
    given)."""
    if not values:
        return None
    if len(values) not in (3, 4) or not all(
        value.strip().isdigit() and int(value) > 0 for value in values
    ):
        raise errors.UsageError(
            f"--mesh={','.join(values)} must be three or four positive sizes "
            "data,fsdp,tensor[,sequence] (e.g. --mesh=1,8,1 or --mesh=1,1,1,8)"
        )
    return [int(value) for value in values]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise errors.UsageError("--config is required (e.g. --config=configs/based_1b.py)")
    mesh = parse_mesh(_MESH.value)
    if _GENERATE_BATCH.value < 1:
        raise errors.UsageError(f"--generate_batch={_GENERATE_BATCH.value} must be >= 1")
    if _MAX_LEN.value is not None and _MAX_LEN.value < 1:
        raise errors.UsageError(f"--max_len={_MAX_LEN.value} must be >= 1")
    if not 0 < _MEMORY_FRACTION.value <= 1:
        raise errors.UsageError(
            f"--memory_fraction={_MEMORY_FRACTION.value} must be in (0, 1] (e.g. 0.9)"
        )
    device_memory = None
    if _DEVICE_MEMORY.value is not None:
        from jaxbased.setting_search import parse_device_memory

        try:
            device_memory = parse_device_memory(_DEVICE_MEMORY.value)
        except ValueError as error:
            raise errors.UsageError(f"--{error}") from None
    from jaxbased.config import ModelConfig
    from jaxbased.planning import plan_memory

    mesh = mesh if mesh is not None else dict(config.mesh)
    if device_memory is not None:
        search(config, mesh, device_memory)
        return
    plan = plan_memory(
        ModelConfig.from_dict(config.model),
        mesh,
        seq_len=config.data.seq_len,
        batch_size=config.data.batch_size,
        generate_batch=_GENERATE_BATCH.value,
        max_len=_MAX_LEN.value,
        activations=_ACTIVATIONS.value,
    )
    print(plan.table())
    remark = memory_remark(plan.total, plan.activations)
    if remark:
        print(remark)


def search(config: Any, mesh: Any, device_memory: int) -> None:
    """Print the settings (remat x micro-batch) that fit ``device_memory`` and the flags of the
    chosen one (``jaxbased.setting_search``)."""
    from jaxbased.config import ModelConfig
    from jaxbased.setting_search import format_search, search_settings

    if isinstance(mesh, dict) and any(int(size) < 1 for size in mesh.values()):
        raise errors.UsageError(
            f"the config's mesh {dict(mesh)} has a -1; give --mesh=DATA,FSDP,TENSOR[,SEQUENCE] "
            "to search"
        )
    result = search_settings(
        ModelConfig.from_dict(config.model),
        mesh,
        seq_len=config.data.seq_len,
        batch_size=config.data.batch_size,
        device_memory=device_memory,
        memory_fraction=_MEMORY_FRACTION.value,
    )
    print(
        format_search(
            result,
            config_path=config_flags.get_config_filename(flags.FLAGS["config"]),
            batch_size=config.data.batch_size,
            seq_len=config.data.seq_len,
        )
    )


# The memory of the largest common accelerators (H100/H200 80-141 GiB, TPU v5p 95 GiB): a plan
# above it fits no single device of today.
TYPICAL_DEVICE_MEMORY = 80 * 2**30


def memory_remark(total: int, activations: int | None) -> str:
    """A remark when the per-device total exceeds a typical accelerator's memory."""
    if total <= TYPICAL_DEVICE_MEMORY:
        return ""
    cause = (
        "mostly the activations of the train step"
        if activations is not None and activations > total / 2
        else "mostly parameters and optimizer state"
    )
    return (
        f"note: {total / 2**30:,.1f} GiB per device exceeds a typical accelerator's "
        f"{TYPICAL_DEVICE_MEMORY / 2**30:.0f} GiB ({cause}); a larger mesh (--mesh), a smaller "
        "--config.data.batch_size or --config.train.grad_accum_steps lowers it"
    )


COMMAND = command.Command(
    name="jaxbased-plan",
    summary="per-device memory (parameters, optimizer state, activations, decoding caches) "
    "of a training config on a device mesh, before launching it",
    usage="jaxbased-plan --config=FILE [--mesh=DATA,FSDP,TENSOR[,SEQUENCE]] [flags]",
    examples=(
        "jaxbased-plan --config=configs/based_1b.py --mesh=1,8,1",
        "jaxbased-plan --config=configs/based_360m.py --mesh=2,2,2 --config.data.batch_size=64 "
        "--generate_batch=16 --max_len=8192",
        "jaxbased-plan --config=configs/based_1b.py --mesh=1,8,1 --noactivations",
        "jaxbased-plan --config=configs/based_1b.py --mesh=1,8,1 --device_memory=141GiB",
        "jaxbased-plan --config=configs/based_360m.py --mesh=1,1,1,8 "
        "--config.data.seq_len=131072 --config.data.batch_size=1",
    ),
    notes="Activations come from compiling one train step of the per-device batch on this "
    "host (--noactivations skips that for big models on small hosts); with a sequence size, "
    "the step of one slice of every sequence. With --device_memory "
    "the command instead searches micro-batch x gradient accumulation x remat for the mesh, "
    "global batch and sequence length, and prints the setting that fits with its train.py "
    "flags, or the smallest mesh that would fit (docs/planning.md).",
    groups=(
        ("config", ("config", "mesh")),
        ("what to plan", ("generate_batch", "max_len", "activations")),
        ("what fits", ("device_memory", "memory_fraction")),
    ),
    required=("config",),
    config_flag="config",
)


def run() -> None:
    """Console-script entry point."""
    command.run(main, COMMAND)


if __name__ == "__main__":
    run()
