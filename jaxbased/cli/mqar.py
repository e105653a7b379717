"""``jaxbased-mqar``: the MQAR recall sweep (docs/mqar.md) and its recall-vs-state figure.

    jaxbased-mqar --output_dir=mqar_cpu                       # configs/mqar_cpu.py, ~15 min CPU
    jaxbased-mqar --config=configs/mqar_paper.py --output_dir=/results/mqar   # accelerators
    jaxbased-mqar --output_dir=mqar_cpu --groups=based,attention --config.train.max_epochs=2
    jaxbased-mqar --output_dir=mqar_cpu --plot_only           # summary and figure from the JSONs

Every run (model group x grid point x learning rate) writes ``<output_dir>/runs/<name>.json``;
runs whose JSON exists with the same settings are skipped, so a killed sweep resumes where it
stopped. At the end ``<output_dir>/summary.json`` (the best learning rate of each model) and
``<output_dir>/mqar.png`` (accuracy vs recurrent state, log x) are written from every finished
run. Run from the repository root (the default config path is relative), or give ``--config``.
"""

from __future__ import annotations

import pathlib

from absl import flags, logging
from ml_collections import config_flags

from jaxbased.cli import command, errors

DEFAULT_CONFIG = "configs/mqar_cpu.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "MQAR sweep config file", lock_config=True
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "mqar_results", "folder for run JSONs, summary")
_GROUPS = flags.DEFINE_list("groups", None, "model groups of the config to run (default: all)")
_PLOT_ONLY = flags.DEFINE_bool(
    "plot_only", False, "train nothing: summarize the runs already finished and draw the figure"
)
_FIGURE = flags.DEFINE_string("figure", None, "figure path (default: <output_dir>/mqar.png)")


def _print_table(summary: dict) -> None:
    header = f"{'model':<40} {'state':>9} {'accuracy':>8} {'best lr':>8} {'steps':>6}"
    print(header)
    print("-" * len(header))
    for point in summary["points"]:
        print(
            f"{point['model_key']:<40} {point['state_size']:>9d} {point['accuracy']:>8.4f} "
            f"{point['best_learning_rate']:>8.1e} {point['steps']:>6d}"
        )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    available = list(config.models.keys()) if "models" in config else []
    for name in _GROUPS.value or []:
        if name not in available:
            raise errors.unknown_name("--groups entry", name, available)
    from jaxbased.mqar.plot import plot_summary
    from jaxbased.mqar.sweep import (
        FIGURE_FILE,
        SUMMARY_FILE,
        collect_finished,
        run_sweep,
        summarize,
        write_json_atomically,
    )

    output = pathlib.Path(_OUTPUT_DIR.value)
    figure = pathlib.Path(_FIGURE.value) if _FIGURE.value else output / FIGURE_FILE
    try:
        if _PLOT_ONLY.value:
            records = collect_finished(config, output, groups=_GROUPS.value)
            if not records:
                raise errors.UsageError(f"no finished runs of this config in {output}")
            summary = summarize(config, records)
            write_json_atomically(output / SUMMARY_FILE, summary)
        else:
            result = run_sweep(config, output, groups=_GROUPS.value, figure=False)
            summary = result.summary
            logging.info(
                "trained %d runs, %d were finished before", len(result.trained), len(result.skipped)
            )
    except ValueError as error:  # a config that does not validate: a usage error
        raise errors.UsageError(str(error)) from error
    plot_summary(summary, figure)
    _print_table(summary)
    print(f"summary: {output / SUMMARY_FILE}\nfigure: {figure}", flush=True)


COMMAND = command.Command(
    name="jaxbased-mqar",
    summary="the MQAR recall benchmark: train every model of a sweep config at every learning "
    "rate, keep the best, and plot recall accuracy against state size",
    usage="jaxbased-mqar --output_dir=DIR [--config=FILE] [flags]",
    examples=(
        "jaxbased-mqar --output_dir=results/mqar_cpu            # configs/mqar_cpu.py, ~15 min",
        "jaxbased-mqar --output_dir=results/mqar_cpu --groups=based --config.train.max_epochs=2",
        "jaxbased-mqar --output_dir=results/mqar_cpu --plot_only",
        "jaxbased-mqar --config=configs/mqar_paper.py --output_dir=results/mqar_paper",
    ),
    notes="Every run writes <output_dir>/runs/<name>.json atomically; runs already finished "
    "with the same settings are skipped, so a killed sweep resumes. Run it from the "
    "repository root (the default config path is relative) or give --config.",
    groups=(
        ("sweep", ("config", "groups")),
        ("output", ("output_dir", "figure", "plot_only")),
    ),
    config_flag="config",
    config_default=DEFAULT_CONFIG,
)


def run() -> None:
    """Console-script entry point."""
    command.run(main, COMMAND)


if __name__ == "__main__":
    run()
