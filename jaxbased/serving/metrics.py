"""Prometheus text-format metrics without extra dependencies: counters, gauges, histograms.

:class:`ServingMetrics` holds what ``GET /metrics`` reports (:meth:`ServingMetrics.render`):
requests by outcome, prompt and generated tokens, queue depth, slot occupancy, and histograms
of the time to first token, the per-token latency (between successive tokens of one
sequence), and the prefill and decode step times. Every update takes one lock, so the engine's
thread and the server's event loop may both write.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence

#: Histogram bucket bounds in seconds, for latencies from a millisecond to a minute.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (
        f'{key}="{str(value).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for key, value in sorted(labels.items())
    )
    return "{" + ",".join(escaped) + "}"


class Histogram:
    """Cumulative-bucket histogram of observations (seconds)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError(f"histogram buckets={buckets!r} must be a non-empty sorted sequence")
        self.bounds = tuple(float(bound) for bound in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        cumulative, lines = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{_format_value(bound)}"}} {cumulative}')
        lines.append(f"{name}_sum {_format_value(self.total)}")
        lines.append(f"{name}_count {self.count}")
        return lines


class ServingMetrics:
    """The server's metrics, rendered in the Prometheus text exposition format (0.0.4).

    ``gauges`` maps a gauge's name to a function read at render time (queue depth, busy
    slots), so that a gauge is never stale.
    """

    PREFIX = "jaxbased_serve_"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._counter_help: dict[str, str] = {}
        self._histograms: dict[str, Histogram] = {}
        self._histogram_help: dict[str, str] = {}
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        for name, text in (
            ("time_to_first_token_seconds", "time from a request's arrival to its first token"),
            ("time_per_output_token_seconds", "time between successive tokens of a sequence"),
            ("prefill_seconds", "wall time of one prompt's prefill (and slot insertion)"),
            ("decode_step_seconds", "wall time of one decode step over every slot"),
            ("request_seconds", "time from a request's arrival to its last token"),
        ):
            self._histograms[name] = Histogram()
            self._histogram_help[name] = text
        for name, text in (
            ("requests_total", "requests answered, by outcome"),
            ("prompt_tokens_total", "prompt tokens prefilled"),
            ("generation_tokens_total", "tokens generated"),
            ("http_requests_total", "completion requests admitted, by route"),
            ("http_errors_total", "requests refused with an error, by HTTP status"),
        ):
            self._counter_help[name] = text

    def increment(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` to counter ``name`` with ``labels``."""
        if name not in self._counter_help:
            raise ValueError(
                f"counter {name!r} is not known; allowed: {sorted(self._counter_help)}"
            )
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def counter(self, name: str, **labels: str) -> float:
        """The current value of counter ``name`` with exactly ``labels`` (0 if never set)."""
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def observe(self, name: str, seconds: float) -> None:
        """Record ``seconds`` in histogram ``name``."""
        if name not in self._histograms:
            raise ValueError(
                f"histogram {name!r} is not known; allowed: {sorted(self._histograms)}"
            )
        with self._lock:
            self._histograms[name].observe(seconds)

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Report ``read()`` as gauge ``name`` at every render."""
        self._gauges[name] = (help_text, read)

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        lines: list[str] = []
        with self._lock:
            for name, text in self._counter_help.items():
                full = self.PREFIX + name
                lines += [f"# HELP {full} {text}", f"# TYPE {full} counter"]
                for (counter, labels), value in sorted(self._counters.items()):
                    if counter == name:
                        lines.append(f"{full}{_labels(dict(labels))} {_format_value(value)}")
            for name, histogram in self._histograms.items():
                full = self.PREFIX + name
                lines += [f"# HELP {full} {self._histogram_help[name]}", f"# TYPE {full} histogram"]
                lines += histogram.lines(full)
        for name, (text, read) in self._gauges.items():
            full = self.PREFIX + name
            lines += [f"# HELP {full} {text}", f"# TYPE {full} gauge"]
            lines.append(f"{full} {_format_value(float(read()))}")
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of a Prometheus text exposition (comments skipped): what a
    test or a load generator reads back from ``GET /metrics``."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


__all__ = ["LATENCY_BUCKETS", "Histogram", "ServingMetrics", "parse_metrics"]
