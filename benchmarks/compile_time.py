"""Compile time of the train step, unrolled vs. scanned layers (``ModelConfig.scan_layers``).

For every preset and layout, a fresh subprocess builds the model, the released AdamW optimizer
and ``jaxbased.training.steps.make_train_step``, and lowers the jitted step for abstract inputs
only (the state from ``jax.eval_shape``, the batch a ``jax.ShapeDtypeStruct`` of
``[batch, seq_len + 1]`` int32): no parameter is ever materialised, so the 1B model compiles
on a laptop. It then compiles the lowered step for the CPU (``.compile()``) and reports:

- ``trace_lower_s``: tracing and lowering to StableHLO;
- ``compile_s``: XLA's compilation of the lowered module;
- ``total_s``: both, what a user waits for before the first step;
- ``hlo_ops``: the number of lines of the optimized HLO (how much code XLA saw);
- ``hlo_passes_s`` and ``codegen_s``: XLA's own split of ``compile_s`` (read from its log,
  ``TF_CPP_VMODULE=cpu_compiler=1``): the HLO optimization passes, which grow with the number of
  layers, and LLVM code generation of the kernels, which grows with the number of *distinct*
  kernels (identical layers of an unrolled model share them); ``kernels`` counts them.

The batch is small (the shape barely changes compile time); the layer pattern decides how much
the scan folds: based_1b's 36 layers become one 5-layer unit scanned 5 times plus an 11-layer
remainder, based_360m's 27 layers a 5-layer unit scanned 5 times plus 2
(:func:`jaxbased.layer_layout.find_repeating_unit`).

Usage (from the repository root)::

    python benchmarks/compile_time.py                       # based_360m and based_1b
    python benchmarks/compile_time.py --presets=based_tiny --seq_len=128   # a quick smoke run

The table (markdown) goes to stdout and the JSON (machine, date, one row per point) to
``--output``, written atomically. Times are wall-clock on a possibly shared machine: each row
records the load average before it ran.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_info, write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["based_360m", "based_1b"], "Presets to compile.")
flags.DEFINE_integer("batch_size", 1, "Rows of the abstract batch.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per row (the batch is [batch, seq_len + 1]).")
flags.DEFINE_string("remat", "none", "ModelConfig.remat of every point.")
flags.DEFINE_string(
    "output",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile_time.json"),
    "JSON output path.",
)
flags.DEFINE_string("point", None, "Internal: measure one 'preset,scan' point and print JSON.")


def measure_point(preset: str, scan_layers: bool, batch: int, seq_len: int, remat: str) -> dict:
    """Lower and compile the train step of ``preset`` for abstract inputs; times in seconds."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from jaxbased.config import ModelConfig
    from jaxbased.layer_layout import scan_plan
    from jaxbased.model import LanguageModel, count_parameters
    from jaxbased.training.optimizer import make_optimizer
    from jaxbased.training.state import TrainState
    from jaxbased.training.steps import make_train_step

    config = ModelConfig.from_preset(preset, scan_layers=scan_layers, remat=remat)
    model = LanguageModel(config)
    schedule = optax.constant_schedule(1e-3)
    optimizer = make_optimizer(schedule)

    def init_state() -> TrainState:
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        return TrainState.create(nn.meta.unbox(params), optimizer)

    abstract_state = jax.eval_shape(init_state)
    abstract_batch = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    train_step = make_train_step(model, optimizer, schedule)
    start = time.perf_counter()
    lowered = train_step.lower(abstract_state, abstract_batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    plan = scan_plan(config)
    return {
        "preset": preset,
        "scan_layers": scan_layers,
        "remat": remat,
        "batch": [batch, seq_len + 1],
        "num_layers": config.num_layers,
        "compiled_blocks": config.num_layers if plan is None else plan.compiled_blocks,
        "unit": None if plan is None else list(plan.unit),
        "repeats": None if plan is None else plan.repeats,
        "parameters": count_parameters(abstract_state.params),
        "trace_lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
        "total_s": compiled_at - start,
        "hlo_ops": compiled.as_text().count("\n"),
        "load_average_before": os.getloadavg(),
    }


#: XLA CPU's timing lines (absl VLOG of cpu_compiler.cc): HLO passes, then LLVM code generation.
_HLO_PASSES = re.compile(r"Running HLO passes on \[jit_step\] for CPU time: ([0-9.]+) (s|ms)")
_CODEGEN = re.compile(r"Compiling \[jit_step\] for CPU using JIT time: ([0-9.]+) (s|ms)")


def _seconds(pattern: re.Pattern, log: str) -> float | None:
    match = pattern.search(log)
    if match is None:
        return None
    return float(match.group(1)) / (1000.0 if match.group(2) == "ms" else 1.0)


def run_point(preset: str, scan_layers: bool) -> dict:
    """``measure_point`` in a fresh subprocess (no cache shared between points)."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--point={preset},{int(scan_layers)}",
        f"--batch_size={FLAGS.batch_size}",
        f"--seq_len={FLAGS.seq_len}",
        f"--remat={FLAGS.remat}",
    ]
    environment = dict(
        os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="cpu_compiler=1"
    )
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if result.returncode:
        raise RuntimeError(f"point {preset} scan={scan_layers} failed:\n{result.stderr[-4000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["hlo_passes_s"] = _seconds(_HLO_PASSES, result.stderr)
    row["codegen_s"] = _seconds(_CODEGEN, result.stderr)
    row["kernels"] = result.stderr.count("Running LLVM verifier")
    return row


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.point is not None:
        preset, scan = FLAGS.point.split(",")
        row = measure_point(preset, bool(int(scan)), FLAGS.batch_size, FLAGS.seq_len, FLAGS.remat)
        print(json.dumps(row))
        return
    rows = []
    for preset in FLAGS.presets:
        for scan_layers in (False, True):
            row = run_point(preset, scan_layers)
            rows.append(row)
            print(f"{preset} scan_layers={scan_layers}: {row['total_s']:.1f} s", file=sys.stderr)
    speedups = {}
    print(
        "| preset | layout | blocks compiled | trace+lower s | compile s | of which HLO passes s "
        "| codegen s | kernels | total s | HLO lines |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    for row in rows:
        layout = "scanned" if row["scan_layers"] else "unrolled"
        print(
            f"| {row['preset']} | {layout} | {row['compiled_blocks']} / {row['num_layers']} | "
            f"{row['trace_lower_s']:.1f} | {row['compile_s']:.1f} | "
            f"{number(row['hlo_passes_s'])} | {number(row['codegen_s'])} | {row['kernels']} | "
            f"{row['total_s']:.1f} | {row['hlo_ops']} |"
        )
    for preset in FLAGS.presets:
        unrolled, scanned = (
            next(r for r in rows if r["preset"] == preset and r["scan_layers"] == scan)
            for scan in (False, True)
        )
        speedups[preset] = {
            "compile": unrolled["compile_s"] / scanned["compile_s"],
            "total": unrolled["total_s"] / scanned["total_s"],
        }
        if unrolled["hlo_passes_s"] and scanned["hlo_passes_s"]:
            speedups[preset]["hlo_passes"] = unrolled["hlo_passes_s"] / scanned["hlo_passes_s"]
        print(
            f"\n{preset}: scanned compiles {speedups[preset]['compile']:.1f}x faster "
            f"({speedups[preset]['total']:.1f}x with tracing and lowering; HLO passes "
            f"{speedups[preset].get('hlo_passes', float('nan')):.1f}x)"
        )
    write_json_atomic(FLAGS.output, {"machine": machine_info(), "rows": rows, "speedups": speedups})


if __name__ == "__main__":
    app.run(main)
