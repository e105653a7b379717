"""Metrics output: a JSON-lines file and TensorBoard event files in the workdir, and a progress
line with an ETA on the log."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"


class MetricsWriter:
    """Appends ``{"step": s, "split": ..., **values}`` lines and TensorBoard scalars.

    Only the writing process (JAX process 0) should create one. TensorBoard needs the
    ``tensorboardX`` package; without it only the JSON-lines file is written (logged once).
    """

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True) -> None:
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._file = (self.workdir / METRICS_FILE).open("a", buffering=1)
        self._tensorboard = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                logging.warning("tensorboardX is not installed; writing %s only", METRICS_FILE)
            else:
                self._tensorboard = SummaryWriter(str(self.workdir / TENSORBOARD_SUBDIR))

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        clean = {key: _plain(value) for key, value in values.items()}
        self._file.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
        if self._tensorboard is not None:
            for key, value in clean.items():
                if isinstance(value, float | int) and math.isfinite(value):
                    self._tensorboard.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _plain(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def format_duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def progress_line(step: int, total: int, values: dict[str, float], eta_seconds: float) -> str:
    """``step 120/500 | loss 2.345 | lr 8.0e-04 | grad_norm 0.53 | ... | ETA 1m20s``."""
    parts = [f"step {step}/{total}"]
    formats = {
        "loss": "loss {:.4f}",
        "distill/lm_loss": "lm_loss {:.4f}",
        "distill/hidden_mse": "hidden_mse {:.4f}",
        "distill/kl": "kl {:.4f}",
        "distill/teacher_ce": "teacher_ce {:.4f}",
        "accuracy": "acc {:.3f}",
        "learning_rate": "lr {:.2e}",
        "grad_norm": "grad_norm {:.3f}",
        "step_time": "{:.3f} s/step",
        "tokens_per_second": "{:,.0f} tok/s",
        "mfu": "MFU {:.1%}",
    }
    for key, template in formats.items():
        if key in values:
            parts.append(template.format(values[key]))
    # The mixers' per-layer scalars (mixer/layer{i}/{name}), one group per name.
    reported: dict[str, list[str]] = {}
    for key, value in values.items():
        if key.startswith("mixer/layer"):
            layer, _, name = key[len("mixer/layer") :].partition("/")
            reported.setdefault(name, []).append(f"L{layer} {value:.3f}")
    parts += [f"{name} {' '.join(cells)}" for name, cells in reported.items()]
    parts.append(f"ETA {format_duration(eta_seconds)}")
    return " | ".join(parts)
