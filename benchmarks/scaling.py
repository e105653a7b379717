"""Forward time and memory against sequence length: BASED vs. Transformer++ of equal size.

Two language models of (nearly) the same parameter count, sized for a small CPU machine:

- BASED: d_model 256, 12 layers in the released pattern (docs/model.md: linear attention at
  layers 1, 6, 11, sliding window at 2, 7, BaseConv elsewhere), Taylor features (F = 16),
  4 linear-attention heads of value dim 64, 4 window heads of dim 64 seeing 129 keys,
  gated MLP 512.
- Transformer++: d_model 256, 10 full causal attention layers (4 heads, rotary on half of each
  head), SwiGLU hidden ``int(8 d / 3)`` rounded up to 256 (768).

Both use a 256-token vocabulary so that the tied head does not dominate. For every sequence length
``T`` and model, a fresh subprocess builds the model, compiles ``jax.jit(model.apply)`` for tokens
``[1, T]`` (outside the timed region), runs one untimed warm-up call, then times
``--min_repeats`` to ``--repeats`` calls (fewer for slow points, by ``--seconds_per_point``;
``block_until_ready``; the median is reported). Memory is measured two ways:

- ``xla_bytes``: the compiled executable's ``memory_analysis()``: temp + argument + output bytes
  (generated code excluded). Deterministic: what XLA's buffer assignment reserves for one call.
- ``peak_rss_bytes``: the subprocess's peak resident set size while the forward runs. The peak is
  reset (``/proc/self/clear_refs``) after compilation, so compile-time memory is excluded; it
  includes the JAX runtime, the parameters and the compiled code (``rss_before_run_bytes``).
  Where the reset is not allowed, the whole-process ``getrusage`` peak is reported instead and
  ``rss_kind`` says so.

The models come from ``benchmarks/common.py`` (shared with the other CPU benchmarks).

On a shared machine other processes inflate the times: every point records the share of the
CPUs other processes used during its timed calls (``other_processes_cpu_fraction``, /proc/stat),
waits for an idle machine first, and is measured again (``--attempts``) when that share exceeds
``--max_other_cpu``; the least disturbed attempt is kept and every attempt is listed.

Usage (from the repository root)::

    python benchmarks/scaling.py                       # T in 1k..16k, table + JSON
    python benchmarks/scaling.py --quick               # a smoke run of about 30 s
    python benchmarks/scaling.py --seq_lens=1024,2048 --repeats=3 --output=/tmp/s.json

The table (markdown) goes to stdout, the JSON (machine, date, configs, one row per T) to
``--output``, written atomically.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MODEL_TITLES, VOCAB_SIZE, model_config, write_json_atomic
from common import machine_info as common_machine_info

FLAGS = flags.FLAGS

flags.DEFINE_list(
    "seq_lens", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths T (batch 1)."
)
flags.DEFINE_integer(
    "repeats", 5, "Timed forward calls per (model, T) at most; the median is kept."
)
flags.DEFINE_integer("min_repeats", 3, "Timed forward calls per (model, T) at least.")
flags.DEFINE_float(
    "seconds_per_point",
    60.0,
    "Time budget of the timed calls of one (model, T): repeats = clamp(budget / warm-up time, "
    "min_repeats, repeats). Keeps slow quadratic points from dominating the run.",
)
flags.DEFINE_integer(
    "reference_seq_len", 2048, "Times and memory are also given relative to this T (if run)."
)
flags.DEFINE_list(
    "models", ["based", "transformer"], "Models to run, from: based, transformer, cca."
)
flags.DEFINE_string(
    "output", "benchmarks/results/scaling.json", "Where the JSON results go ('' for none)."
)
flags.DEFINE_bool(
    "quick", False, "Smoke run: T in {256, 512}, 2 repeats, default output /tmp/scaling_quick.json."
)
flags.DEFINE_float(
    "max_other_cpu",
    0.25,
    "Shared machines: a point during which other processes used more than this share of the "
    "CPUs is measured again (up to --attempts times; the least disturbed attempt is kept), and "
    "each point first waits up to --idle_wait_s for the machine to be this idle. 1 disables.",
)
flags.DEFINE_integer("attempts", 3, "Measurements of one point at most (see --max_other_cpu).")
flags.DEFINE_float("idle_wait_s", 120.0, "Longest wait for an idle machine before a point.")
flags.DEFINE_integer("seed", 0, "Seed of the parameters and tokens.")
flags.DEFINE_string(
    "platform", "cpu", "JAX platform to measure on (JAX_PLATFORMS); '' keeps JAX's default."
)
flags.DEFINE_enum(
    "host_malloc",
    "keep",
    ["keep", "system"],
    "keep: glibc keeps freed blocks for the next call, as the jaxbased commands set it "
    "(jaxbased.host_memory); system: glibc's defaults (fresh pages for large buffers each call).",
)
flags.DEFINE_string(
    "worker", None, "Internal: 'MODEL:T' measures one point in this process and prints JSON."
)

RESULT_PREFIX = "SCALING_RESULT "
MIB = 2**20


# Models (benchmarks/common.py) ----------------------------------------------------------------
def parameter_count(name: str) -> int:
    """Parameters of model ``name`` (from shapes only, nothing is initialised)."""
    import jax
    import jax.numpy as jnp

    from jaxbased import LanguageModel, count_parameters

    model = LanguageModel(model_config(name))
    tokens = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
    return count_parameters(shapes["params"])


# Memory helpers -------------------------------------------------------------------------------
def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have spent busy (``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _getrusage_peak_bytes() -> int:
    """Whole-process peak RSS from ``getrusage`` (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _memory_analysis(compiled: Any) -> dict[str, int]:
    """The integer fields of ``compiled.memory_analysis()`` (names vary across JAX versions)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = {}
    for name in dir(stats):
        if name.endswith("_in_bytes"):
            value = getattr(stats, name)
            if isinstance(value, int):
                fields[name] = value
    return fields


# One measurement (runs in a fresh subprocess) -------------------------------------------------
def measure_point(name: str, seq_len: int, repeats: int, min_repeats: int, budget: float) -> dict:
    """Compile and time the forward of model ``name`` on tokens ``[1, seq_len]``; measure memory.

    Returns a dict with times (seconds), the number of timed calls, XLA memory fields and RSS.
    """
    import gc

    import jax
    import jax.numpy as jnp

    from jaxbased import LanguageModel

    model = LanguageModel(model_config(name))
    key_params, key_tokens = jax.random.split(jax.random.key(FLAGS.seed))
    params = jax.jit(model.init)(key_params, jnp.zeros((1, 8), jnp.int32))["params"]
    tokens = jax.random.randint(key_tokens, (1, seq_len), 0, VOCAB_SIZE, jnp.int32)

    def forward(params: Any, tokens: jax.Array) -> jax.Array:
        return model.apply({"params": params}, tokens)

    start = time.perf_counter()
    compiled = jax.jit(forward).lower(params, tokens).compile()
    compile_seconds = time.perf_counter() - start
    xla = _memory_analysis(compiled)
    xla_bytes = sum(
        xla.get(field, 0)
        for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
    )

    gc.collect()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rss_before = _proc_status_bytes("VmRSS")
    peak_reset = _reset_peak_rss()

    start = time.perf_counter()
    compiled(params, tokens).block_until_ready()
    warmup_seconds = time.perf_counter() - start

    calls = max(min_repeats, min(repeats, int(budget / max(warmup_seconds, 1e-9))))
    times, cpu_times, system_times, faults = [], [], [], []
    busy_start = _busy_cpu_seconds()
    for _ in range(calls):
        usage_start = resource.getrusage(resource.RUSAGE_SELF)
        start, cpu_start = time.perf_counter(), time.process_time()
        logits = compiled(params, tokens)
        logits.block_until_ready()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        usage_end = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(usage_end.ru_minflt - usage_start.ru_minflt)
        system_times.append(usage_end.ru_stime - usage_start.ru_stime)
        del logits
    busy_end = _busy_cpu_seconds()
    other_cpu = None
    if busy_start is not None and busy_end is not None:
        # Share of the machine's CPUs that other processes kept busy during the timed calls.
        other = busy_end - busy_start - sum(cpu_times)
        other_cpu = max(0.0, other / (sum(times) * (os.cpu_count() or 1)))

    if peak_reset:
        peak_rss, rss_kind = _proc_status_bytes("VmHWM"), "VmHWM reset after compile"
    else:
        peak_rss, rss_kind = _getrusage_peak_bytes(), "getrusage whole process"
    return {
        "seq_len": seq_len,
        "median_seconds": statistics.median(times),
        "min_seconds": min(times),
        "times_seconds": times,
        # CPU time of this process (all threads) per call: less sensitive than wall time to other
        # processes competing for the cores, more sensitive to threads spinning.
        "median_cpu_seconds": statistics.median(cpu_times),
        "cpu_seconds": cpu_times,
        # Minor page faults per call: fresh pages the call had to get from the OS.
        "median_minor_page_faults": statistics.median(faults),
        # Kernel CPU time per call (page faults, mmap/munmap): part of median_cpu_seconds.
        "median_system_cpu_seconds": statistics.median(system_times),
        "host_malloc": FLAGS.host_malloc,
        "other_processes_cpu_fraction": other_cpu,
        "warmup_seconds": warmup_seconds,
        "compile_seconds": compile_seconds,
        "timed_calls": calls,
        "xla_bytes": xla_bytes,
        "xla_memory_analysis": xla,
        "peak_rss_bytes": peak_rss,
        "rss_before_run_bytes": rss_before,
        "rss_kind": rss_kind,
        "process_peak_rss_bytes": _getrusage_peak_bytes(),
        # 1-minute load average before/after: other processes on the machine skew the times.
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def run_worker(spec: str) -> None:
    """``--worker=MODEL:T``: measure one point and print it as one JSON line."""
    name, _, seq = spec.partition(":")
    result = measure_point(
        name, int(seq), FLAGS.repeats, FLAGS.min_repeats, FLAGS.seconds_per_point
    )
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def wait_for_idle(max_busy: float, timeout: float, window: float = 3.0) -> float | None:
    """Wait until the machine's CPUs are at most ``max_busy`` busy over ``window`` seconds.

    Returns the last busy fraction seen (None where ``/proc/stat`` is not readable); gives up
    after ``timeout`` seconds.
    """
    began = time.monotonic()
    cpus = os.cpu_count() or 1
    while True:
        start = _busy_cpu_seconds()
        if start is None:
            return None
        time.sleep(window)
        end = _busy_cpu_seconds()
        busy = (end - start) / (window * cpus) if end is not None else 0.0
        waited = time.monotonic() - began
        if busy <= max_busy or waited >= timeout:
            if waited > window:
                print(
                    f"    waited {waited:.0f} s for an idle machine; now {busy:.0%} busy",
                    flush=True,
                )
            return busy


def measure_point_retrying(name: str, seq_len: int, repeats: int) -> dict:
    """``run_point_subprocess`` until other processes disturbed it little (``--max_other_cpu``).

    Keeps the attempt with the smallest share of the CPUs taken by other processes, and records
    every attempt's median time and share under ``attempts``.
    """
    attempts: list[dict] = []
    best: dict | None = None
    for _ in range(max(1, FLAGS.attempts)):
        if FLAGS.max_other_cpu < 1:
            wait_for_idle(FLAGS.max_other_cpu, FLAGS.idle_wait_s)
        point = run_point_subprocess(name, seq_len, repeats)
        other = point.get("other_processes_cpu_fraction")
        attempts.append({"median_seconds": point["median_seconds"], "other_cpu": other})
        if best is None or (other or 0.0) < (best.get("other_processes_cpu_fraction") or 0.0):
            best = point
        if other is None or other <= FLAGS.max_other_cpu:
            break
        print(
            f"    {MODEL_TITLES[name]} T={seq_len}: other processes took {other:.0%} of the CPUs"
            f" (attempt {len(attempts)} of {FLAGS.attempts})",
            flush=True,
        )
    assert best is not None
    best["attempts"] = attempts
    return best


def run_point_subprocess(name: str, seq_len: int, repeats: int) -> dict:
    """Measure one (model, T) in a fresh Python process, so that memory readings are isolated."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--worker={name}:{seq_len}",
        f"--repeats={repeats}",
        f"--min_repeats={min(FLAGS.min_repeats, repeats)}",
        f"--seconds_per_point={FLAGS.seconds_per_point}",
        f"--seed={FLAGS.seed}",
        f"--platform={FLAGS.platform}",
        f"--host_malloc={FLAGS.host_malloc}",
    ]
    process = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in process.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(
        f"worker {name}:{seq_len} failed (exit {process.returncode}):\n{process.stderr[-4000:]}"
    )


# Machine, report ------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """``common.machine_info()`` plus usable CPUs, jaxlib / flax versions and the devices."""
    import flax
    import jax
    import jaxlib

    info = common_machine_info()
    info.update(
        machine=platform.machine(),
        cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        jaxlib=jaxlib.__version__,
        flax=flax.__version__,
        devices=[str(device) for device in jax.devices()],
    )
    return info


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # repository root
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.rstrip("\n")


def log_log_slope(seq_lens: Sequence[int], values: Sequence[float]) -> float | None:
    """Least-squares slope of ``log(value)`` against ``log(T)``: 1 linear, 2 quadratic."""
    if len(seq_lens) < 2:
        return None
    xs = [math.log(t) for t in seq_lens]
    ys = [math.log(v) for v in values]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mean_x) ** 2 for x in xs)
    return num / den


def _activation_bytes(point: dict) -> int:
    """XLA temp + output bytes: the part of ``xla_bytes`` that can grow with T (not the params)."""
    xla = point["xla_memory_analysis"]
    return xla.get("temp_size_in_bytes", 0) + xla.get("output_size_in_bytes", 0)


def summarize(rows: list[dict], models: Sequence[str], reference: int) -> dict[str, Any]:
    """Log-log slopes against T (1: linear, 2: quadratic) and ratios longest T / reference T.

    ``*_from_reference`` slopes use only T >= the reference (short T carry fixed costs).
    """
    summary: dict[str, Any] = {}
    ref_row = next((row for row in rows if row["seq_len"] == reference), None)
    long_rows = [row for row in rows if row["seq_len"] >= reference] or rows
    metrics = {
        "time": lambda point: point["median_seconds"],
        "cpu_time": lambda point: point["median_cpu_seconds"],
        "xla_bytes": lambda point: point["xla_bytes"],
        "activation_bytes": _activation_bytes,
        "rss_increase_bytes": lambda point: (
            point["peak_rss_bytes"] - point["rss_before_run_bytes"]
            if point.get("rss_before_run_bytes") is not None
            else 0
        ),
    }
    for name in models:
        entry: dict[str, Any] = {}
        for metric, value in metrics.items():
            for suffix, subset in (("", rows), ("_from_reference", long_rows)):
                values = [value(row[name]) for row in subset]
                seq = [row["seq_len"] for row in subset]
                ok = all(v > 0 for v in values)
                entry[f"{metric}_exponent{suffix}"] = log_log_slope(seq, values) if ok else None
            if ref_row is not None and value(ref_row[name]) > 0:
                entry[f"{metric}_ratio_longest_to_reference"] = value(rows[-1][name]) / value(
                    ref_row[name]
                )
        entry["longest_seq_len"] = rows[-1]["seq_len"]
        summary[name] = entry
    return summary


def _fmt_t(seq_len: int) -> str:
    return f"{seq_len // 1024}k" if seq_len % 1024 == 0 else str(seq_len)


def _fmt_fraction(point: dict) -> str:
    fraction = point.get("other_processes_cpu_fraction")
    return "?" if fraction is None else f"{fraction:.0%}"


def _fmt_rss(point: dict) -> str:
    """``peak (+increase over the RSS before the first call)`` in MiB."""
    peak = point["peak_rss_bytes"]
    before = point.get("rss_before_run_bytes")
    if before is None:
        return f"{peak / MIB:.0f}"
    return f"{peak / MIB:.0f} (+{(peak - before) / MIB:.0f})"


def markdown_table(rows: list[dict], models: Sequence[str], reference: int) -> str:
    """One line per T: median time, ratio to the reference T, XLA bytes and peak RSS per model."""
    ref_row = next((row for row in rows if row["seq_len"] == reference), None)
    ref = _fmt_t(reference)
    header = ["T"]
    for name in models:
        title = MODEL_TITLES[name]
        header += [f"{title} ms (× T={ref})", f"{title} CPU ms (× T={ref})"]
    for name in models:
        header.append(f"{MODEL_TITLES[name]} XLA MiB")
    for name in models:
        header.append(f"{MODEL_TITLES[name]} peak RSS MiB")
    header.append("others' CPU")
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in rows:
        cells = [_fmt_t(row["seq_len"])]
        for name in models:
            for key in ("median_seconds", "median_cpu_seconds"):
                seconds = row[name][key]
                ratio = seconds / ref_row[name][key] if ref_row else float("nan")
                cells.append(f"{seconds * 1e3:.0f} ({ratio:.2f}×)")
        cells += [f"{row[name]['xla_bytes'] / MIB:.0f}" for name in models]
        cells += [_fmt_rss(row[name]) for name in models]
        cells.append(" / ".join(_fmt_fraction(row[name]) for name in models))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_benchmark(
    seq_lens: Sequence[int], models: Sequence[str], repeats: int, reference: int, output: str
) -> dict[str, Any]:
    """Measure every (model, T), print the table, write the JSON (after every T, atomically)."""
    configs = {name: model_config(name) for name in models}
    params = {name: parameter_count(name) for name in models}
    for name in models:
        pattern = ", ".join(configs[name].layer_pattern)
        print(f"{MODEL_TITLES[name]}: {params[name]:,} parameters; layers: {pattern}")
    if len(models) == 2:
        a, b = (params[name] for name in models)
        print(f"parameter difference: {abs(a - b) / max(a, b):.2%}")

    payload: dict[str, Any] = {
        "benchmark": "scaling",
        "description": "forward time and memory vs sequence length, batch 1, float32",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "git_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes to the library measured (the working tree, not only the commit).
        "git_dirty_library_files": (
            _git("status", "--porcelain", "--", "jaxbased") or ""
        ).splitlines(),
        "machine": machine_info(),
        "settings": {
            "seq_lens": list(seq_lens),
            "batch": 1,
            "repeats": repeats,
            "min_repeats": FLAGS.min_repeats,
            "seconds_per_point": FLAGS.seconds_per_point,
            "reference_seq_len": reference,
            "seed": FLAGS.seed,
            "timing": "median of the timed calls after one untimed warm-up; compile excluded",
            "xla_bytes": "memory_analysis(): temp + argument + output bytes",
            "peak_rss_bytes": "fresh subprocess per point; VmHWM reset after compile",
            "platform": FLAGS.platform or "default",
            "host_malloc": FLAGS.host_malloc,
            "max_other_cpu": FLAGS.max_other_cpu,
            "attempts": FLAGS.attempts,
        },
        "models": {
            name: {
                "title": MODEL_TITLES[name],
                "parameters": params[name],
                "config": configs[name].to_dict(),
            }
            for name in models
        },
        "rows": [],
        "complete": False,
    }
    rows: list[dict] = payload["rows"]
    for seq_len in seq_lens:
        row: dict[str, Any] = {"seq_len": seq_len}
        for name in models:
            point = measure_point_retrying(name, seq_len, repeats)
            row[name] = point
            milliseconds = point["median_seconds"] * 1e3
            print(
                f"  {MODEL_TITLES[name]:>13} T={seq_len:>6}: {milliseconds:9.1f} ms"
                f" (median of {point['timed_calls']}), XLA {point['xla_bytes'] / MIB:7.1f} MiB,"
                f" peak RSS {_fmt_rss(point)} MiB",
                flush=True,
            )
        rows.append(row)
        if output:
            write_json_atomic(output, payload)

    payload["summary"] = summarize(rows, models, reference)
    payload["complete"] = True
    table = markdown_table(rows, models, reference)
    payload["table_markdown"] = table
    print()
    print(
        "ms: median wall time of a forward (jit, compile excluded); CPU ms: CPU time of all"
        " the process's threads per forward (less sensitive to other processes). XLA MiB:"
        " memory_analysis() temp + args + output. Peak RSS MiB: fresh process, peak during the"
        " forward calls (JAX runtime, params and code included); (+x): increase over the RSS"
        " just before the first call. Others' CPU: share of the machine's CPUs other processes"
        " used during the timed calls (per model)."
    )
    print(table)
    print()
    print(f"Log-log slopes vs T for T >= {_fmt_t(reference)} (1 linear, 2 quadratic):")
    for name, entry in payload["summary"].items():
        slopes = ", ".join(
            f"{metric} {entry[f'{metric}_exponent_from_reference']:.2f}"
            for metric in ("time", "cpu_time", "activation_bytes", "rss_increase_bytes")
            if entry.get(f"{metric}_exponent_from_reference") is not None
        )
        ratio = entry.get("time_ratio_longest_to_reference")
        longest = _fmt_t(entry["longest_seq_len"])
        ratio_text = f"; time T={longest} / T={_fmt_t(reference)}: {ratio:.2f}x" if ratio else ""
        print(f"  {MODEL_TITLES[name]}: {slopes}{ratio_text}")
    if output:
        write_json_atomic(output, payload)
        print(f"wrote {output}")
    return payload


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.platform:
        import jax

        jax.config.update("jax_platforms", FLAGS.platform)
    if FLAGS.worker:
        if FLAGS.host_malloc == "keep":
            from jaxbased.host_memory import keep_freed_host_memory

            keep_freed_host_memory()  # before the backend starts
        run_worker(FLAGS.worker)
        return
    models = list(FLAGS.models)
    unknown = sorted(set(models) - set(MODEL_TITLES))
    if unknown:
        raise app.UsageError(
            f"--models has unknown names {unknown}; allowed: {sorted(MODEL_TITLES)}"
        )
    if FLAGS.quick:
        seq_lens, repeats, reference = [256, 512], 2, 256
        output = FLAGS.output
        if not FLAGS["output"].present:
            output = "/tmp/scaling_quick.json"
    else:
        seq_lens = sorted({int(value) for value in FLAGS.seq_lens})
        repeats, reference, output = FLAGS.repeats, FLAGS.reference_seq_len, FLAGS.output
    if any(seq_len < 1 for seq_len in seq_lens):
        raise app.UsageError(f"--seq_lens must be positive; got {seq_lens}")
    if repeats < 1:
        raise app.UsageError(f"--repeats={repeats} must be >= 1")
    run_benchmark(seq_lens, models, repeats, reference, output)


if __name__ == "__main__":
    app.run(main)
