"""The recall-vs-state figure of an MQAR sweep (the BASED paper's Figure 2 layout): test accuracy
against the floats of recurrent state (log scale), one series per model group, each point the
best learning rate of one model."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

from jaxbased.layers.registry import MIXERS

#: Markers and colours, given to mixers in registry order (a group is drawn in its mixer's style).
_STYLES = [
    ("o", "tab:red"),
    ("s", "tab:blue"),
    ("^", "tab:green"),
    ("x", "tab:gray"),
    ("D", "tab:purple"),
    ("P", "tab:orange"),
    ("v", "tab:brown"),
    ("*", "tab:pink"),
    ("h", "tab:olive"),
    ("<", "tab:cyan"),
    (">", "black"),
]


def _style(mixer: str) -> tuple[str, str]:
    names = list(MIXERS)
    index = names.index(mixer) if mixer in names else len(names)
    return _STYLES[index % len(_STYLES)]


def _legend(group: str, mixer: str) -> str:
    """The group's name, with its mixer's label from the registry when they differ."""
    label = MIXERS[mixer].label if mixer in MIXERS else mixer
    return label if group == mixer else f"{group} ({label})"


def _label(grid: Mapping[str, Any]) -> str:
    short = {"d_model": "d", "feature_dim": "F", "window": "w"}
    return " ".join(f"{short.get(key, key)}={value}" for key, value in grid.items())


def plot_summary(
    summary: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    annotate: bool = True,
) -> pathlib.Path:
    """Draw ``summary["points"]`` (from :func:`jaxbased.mqar.sweep.summarize`) to ``path``
    (PNG, or any format matplotlib infers from the suffix) with the Agg canvas; returns the
    path. ``annotate`` writes each point's grid values beside it."""
    # A bare Figure draws with the Agg canvas and leaves pyplot's backend alone (a notebook's
    # inline plots keep working).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = list(summary["points"])
    if not points:
        raise ValueError("summary has no points to plot; run some of the sweep first")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for point in points:
        groups.setdefault(point["group"], []).append(point)
    figure = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for group, group_points in groups.items():
        mixer = group_points[0].get("mixer", group)
        marker, colour = _style(mixer)
        group_points = sorted(group_points, key=lambda point: point["state_size"])
        xs = [point["state_size"] for point in group_points]
        ys = [point["accuracy"] for point in group_points]
        axes.plot(
            xs,
            ys,
            marker=marker,
            color=colour,
            linestyle="-",
            linewidth=1,
            label=_legend(group, mixer),
        )
        if annotate:
            for point in group_points:
                axes.annotate(
                    _label({k: v for k, v in point["grid"].items()}),
                    (point["state_size"], point["accuracy"]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=6,
                    color=colour,
                )
    axes.set_xscale("log")
    axes.set_ylim(-0.02, 1.04)
    axes.set_xlabel(
        f"recurrent state (floats per sequence; attention's KV cache at "
        f"T={summary.get('state_size_seq_len', '?')})"
    )
    axes.set_ylabel("MQAR test accuracy")
    data = summary.get("data", {})
    mix = ", ".join(f"({t},{p})" for t, p, _ in data.get("test_mix", []))
    axes.set_title(
        title
        or f"MQAR recall vs state, vocab {data.get('vocab_size', '?')}; test (T, pairs): {mix}",
        fontsize=8,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
