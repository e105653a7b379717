"""The planner's activation model against XLA's own numbers, for each remat setting.

For one fixed small configuration (the benchmark BASED model of ``benchmarks/common.py`` at
``--seq_len`` tokens, ``--micro_batch`` sequences), this compiles the real one-device train step
under ``remat`` = none, minimal and full, reads ``memory_analysis().temp_size_in_bytes`` and
prints it beside the prediction of ``jaxbased.activation_model`` (fitted from probes that differ
from the model only in depth: 3 and 5 repeats of a scanned pattern's unit, one and two layers of
each mixer kind when unrolled). Writes a table and ``benchmarks/results/plan_accuracy.json``.

    .venv/bin/python benchmarks/plan_accuracy.py
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, model_config, write_json_atomic

_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "tokens per sequence")
_MICRO_BATCH = flags.DEFINE_integer("micro_batch", 4, "sequences per step")
_MODELS = flags.DEFINE_list("models", ["based", "transformer"], "benchmark models")
_SCAN = flags.DEFINE_bool("scan_layers", True, "scan the repeating unit of the layer pattern")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/plan_accuracy.json", "JSON path")


def main(argv: list[str]) -> None:
    del argv
    from jaxbased.activation_model import fit_activation_model, probe_step
    from jaxbased.config import REMAT_POLICIES

    rows = []
    for name in _MODELS.value:
        for remat in REMAT_POLICIES:
            config = model_config(name).replace(remat=remat, scan_layers=_SCAN.value)
            start = time.perf_counter()
            model = fit_activation_model(config, seq_len=_SEQ_LEN.value)
            fit_seconds = time.perf_counter() - start
            predicted = model.estimate(_MICRO_BATCH.value).temp
            real = probe_step(config, seq_len=_SEQ_LEN.value, micro_batch=_MICRO_BATCH.value)
            rows.append(
                {
                    "model": name,
                    "remat": remat,
                    "xla_temp_bytes": real,
                    "predicted_temp_bytes": predicted,
                    "ratio": predicted / real,
                    "fit_seconds": fit_seconds,
                }
            )
    header = f"{'model':<12} {'remat':<8} {'XLA temp MiB':>13} {'predicted MiB':>14} {'ratio':>6}"
    print(
        f"seq_len {_SEQ_LEN.value}, micro-batch {_MICRO_BATCH.value}, scan_layers "
        f"{_SCAN.value}, one CPU device"
    )
    print(header)
    for row in rows:
        print(
            f"{row['model']:<12} {row['remat']:<8} {row['xla_temp_bytes'] / 2**20:13.1f} "
            f"{row['predicted_temp_bytes'] / 2**20:14.1f} {row['ratio']:6.3f}"
        )
    write_json_atomic(
        _OUTPUT.value,
        {
            "machine": machine_info(),
            "seq_len": _SEQ_LEN.value,
            "micro_batch": _MICRO_BATCH.value,
            "scan_layers": _SCAN.value,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    app.run(main)
