"""Train a jaxbased language model (``python train.py --help`` lists the flags).

    python train.py --config=configs/demo.py --workdir=workdirs/demo
    python train.py --config=configs/based_360m.py --config.data.path=/data/pile \
        --config.train.num_steps=20000 --workdir=/ckpt/based-360m

Restarting with the same --workdir resumes from the newest intact checkpoint. SIGTERM saves a
checkpoint and exits cleanly. With --config.distill.teacher_workdir set, the run distills an
EchoAtt student (shared attention) from that teacher, then trains it on the LM loss
(docs/echoatt.md#distillation-in-trainpy).
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from jaxbased.cli import command, errors

DEFAULT_CONFIG = "configs/demo.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file (configs/*.py)", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "run directory (checkpoints, logs)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "call jax.distributed.initialize() (auto-detects TPU pods, SLURM, ...); the flags below "
    "override what it detects",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process runs)"
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")

COMMAND = command.Command(
    name="train.py",
    summary="train (or resume) a language model of a config file in a workdir",
    usage=".venv/bin/python train.py [--config=FILE] [--config.SECTION.FIELD=VALUE...] "
    "[--workdir=DIR] [flags]",
    examples=(
        ".venv/bin/python train.py --config=configs/demo.py --workdir=workdirs/demo",
        ".venv/bin/python train.py --config=configs/demo.py --workdir=workdirs/demo "
        "--config.train.num_steps=600    # extend a finished run",
        ".venv/bin/python train.py --config=configs/based_360m.py --workdir=/ckpt/based-360m "
        "--config.data.path=/data/pile-gpt2 --config.train.num_steps=20000",
        ".venv/bin/python train.py --config=configs/demo_mixers.py:transformer "
        "--workdir=workdirs/demo_echoatt --config.distill.teacher_workdir=workdirs/"
        "demo_transformer --config.distill.share_fraction=0.5 --config.distill.steps=200"
        "    # EchoAtt: distill a student sharing half the layers, then LM-train it",
    ),
    notes="Restarting with the same --workdir resumes from its newest intact checkpoint (a "
    "damaged newer one is skipped with a warning and moved to <workdir>/damaged_checkpoints/). "
    "The workdir holds checkpoints/, tokenizer/, metrics.jsonl and tensorboard/; nothing is "
    "created before the config and the data are checked. SIGTERM saves a checkpoint and "
    "exits.",
    groups=(
        ("run", ("config", "workdir")),
        ("several hosts", ("distributed", "coordinator_address", "num_processes", "process_id")),
    ),
    config_flag="config",
    config_default=DEFAULT_CONFIG,
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from jaxbased.training.loop import train

    if _DISTRIBUTED.value or _COORDINATOR.value:
        import jax

        # Cross-process collectives on CPU hosts (ignored by GPU and TPU backends).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    config = _CONFIG.value
    result = train(config, _WORKDIR.value)
    if result.initial_eval is not None:
        logging.info(
            "evaluation loss: %.4f at the start, %.4f at the end",
            result.initial_eval["loss"],
            result.final_eval.get("loss", float("nan")),
        )
    if not result.preempted and config.sample.max_new_tokens > 0 and result.is_writer:
        from jaxbased.training.print_sample import print_sample

        print_sample(result.workdir, config.sample)
    logging.info("checkpoints: %s", result.checkpoint_dir)
    logging.info("logs: %s (metrics.jsonl, tensorboard/)", result.workdir)


if __name__ == "__main__":
    command.run(main, COMMAND)
