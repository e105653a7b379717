"""``jaxbased-plan``: per-device memory of a config on a mesh, before launching it.

    jaxbased-plan --config=configs/based_1b.py --mesh=1,8,1
    jaxbased-plan --config=configs/based_360m.py --mesh=2,2,2 --config.data.batch_size=64 \
        --generate_batch=16 --max_len=8192

``--mesh`` gives the sizes of (data, fsdp, tensor); the default is the config's ``mesh`` section
(which must then have no -1). Activations come from compiling one train step of the per-device
batch on this host (``--noactivations`` skips that for big models on small hosts).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from jaxbased.cli.logging_setup import configure_logging
from jaxbased.config import ModelConfig
from jaxbased.planning import plan_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file")
_MESH = flags.DEFINE_list("mesh", None, "data,fsdp,tensor sizes (default: the config's mesh)")
_GENERATE_BATCH = flags.DEFINE_integer("generate_batch", 1, "sequences decoded at once")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "generation length (default: data.seq_len)")
_ACTIVATIONS = flags.DEFINE_bool("activations", True, "compile a train step for activations")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    mesh = [int(size) for size in _MESH.value] if _MESH.value else dict(config.mesh)
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


def run() -> None:
    """Console-script entry point."""
    configure_logging()
    app.run(main)


if __name__ == "__main__":
    run()
