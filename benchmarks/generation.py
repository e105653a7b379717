"""Generation speed and cache memory: BASED vs. Transformer++ of equal size, on the CPU.

The two models of ``benchmarks/common.py`` (d_model 256, vocabulary 256; BASED: 12 layers in the
released pattern with Taylor linear attention, a 129-key window and BaseConv; Transformer++:
10 full-attention layers; 8.58M and 8.59M parameters), random weights, greedy decoding, no stop
tokens (every row makes every token). Everything runs the compiled programs that
``jaxbased.generate`` runs (the jitted ragged prefill and the ``while_loop`` decode with donated
caches), compiled ahead of time (``.lower().compile()``) so that compilation is timed apart.

(a) Decode time per token against the context: one prompt of ``T`` tokens is prefilled
    (``T`` in ``--contexts``), its cache is copied to every row of a batch (``--decode_batches``),
    then ``--decode_steps`` tokens are decoded. Time per step = decode time / (steps - 1) (the
    first token comes from the prefill logits); best of ``--repeats`` runs.
(b) Throughput: ``batch x prompt`` random prompts (``--batches`` x ``--prompts``), prefill, then
    ``--new_tokens`` tokens per row; one timed run after compilation. Reported: prefill seconds,
    decode seconds, decode tokens/s, and end-to-end tokens/s (generated tokens over prefill +
    decode time).
(c) Decoding-cache bytes per sequence against the length it must hold (from shapes only).

Checks recorded in the JSON (the issue's expectations): BASED's per-token decode time at the
longest context within 1.25x of the shortest; BASED's decode throughput at the longest context
at least 4x Transformer++'s.

Usage (from the repository root)::

    python benchmarks/generation.py                  # full run, table + JSON
    python benchmarks/generation.py --quick          # smoke run, seconds
    python benchmarks/generation.py --new_tokens=256 --prompts=512 --output=/tmp/g.json

The markdown tables go to stdout; the JSON (machine, date, contention, configs, rows, checks)
to ``--output``, written atomically. Other ``benchmarks/`` processes running at the start or end
are recorded (``contention``), since they share the cores.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_list("contexts", ["256", "1024", "4096", "8192"], "(a) context lengths.")
flags.DEFINE_list("decode_batches", ["1", "16"], "(a) batch sizes decoded at each context.")
flags.DEFINE_integer("decode_steps", 64, "(a) tokens decoded per timed run.")
flags.DEFINE_integer("repeats", 3, "(a) timed runs per point (the best is kept).")
flags.DEFINE_list("batches", ["1", "16"], "(b) batch sizes.")
flags.DEFINE_list("prompts", ["512", "4096"], "(b) prompt lengths.")
flags.DEFINE_integer("new_tokens", 1024, "(b) tokens generated per row.")
flags.DEFINE_list("models", ["based", "transformer"], "Models, from: based, transformer.")
flags.DEFINE_list("sections", ["a", "b", "c"], "Sections to run, from: a, b, c.")
flags.DEFINE_string(
    "output", "benchmarks/results/generation.json", "Where the JSON goes ('' for none)."
)
flags.DEFINE_bool("quick", False, "Smoke run: tiny sizes, output /tmp/generation_quick.json.")
flags.DEFINE_integer("seed", 0, "Seed of the parameters and prompts.")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402  (the benchmarks' shared models and helpers)
    MODEL_TITLES,
    VOCAB_SIZE,
    machine_info,
    model_config,
    write_json_atomic,
)

MIB = 2**20


# Contention -------------------------------------------------------------------------------------
def other_benchmarks() -> list[str]:
    """Command lines of other running ``benchmarks/`` processes (they share the cores)."""
    try:
        listing = subprocess.run(
            ["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["(ps unavailable)"]
    found = []
    for line in listing.splitlines():
        pid, _, args = line.strip().partition(" ")
        if (
            "benchmarks/" in args
            and int(pid) != os.getpid()
            and "benchmarks/generation" not in args
        ):
            found.append(args[:160])
    return found


def busy_python_processes() -> list[str]:
    """Other Python processes (tests, benchmarks) using a CPU right now, as ``pid %cpu args``."""
    try:
        listing = subprocess.run(
            ["top", "-b", "-n", "1", "-w", "200", "-c"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    busy = []
    for line in listing.splitlines():
        fields = line.split(None, 11)
        if len(fields) == 12 and fields[0].isdigit() and int(fields[0]) != os.getpid():
            cpu = float(fields[8]) if fields[8].replace(".", "", 1).isdigit() else 0.0
            if cpu >= 20 and "python" in fields[11]:
                busy.append(f"{fields[0]} {cpu:.0f}% {fields[11][:120]}")
    return busy


def contention_snapshot() -> dict[str, Any]:
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_1m": os.getloadavg()[0],
        "other_benchmarks": other_benchmarks(),
        "busy_python_processes": busy_python_processes(),
    }


class ContentionSampler:
    """Samples :func:`contention_snapshot` every ``interval`` seconds in a daemon thread."""

    def __init__(self, interval: float = 15.0) -> None:
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.samples.append(contention_snapshot())

    def __enter__(self) -> ContentionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        loads = [s["load_average_1m"] for s in self.samples]
        contended = [s for s in self.samples if s["other_benchmarks"] or s["busy_python_processes"]]
        return {
            "samples": len(self.samples),
            "samples_with_other_busy_processes": len(contended),
            "load_average_1m_max": max(loads, default=None),
            "load_average_1m_mean": sum(loads) / len(loads) if loads else None,
        }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


# Measurements -----------------------------------------------------------------------------------
class Runner:
    """One model with its parameters and the compiled programs of ``jaxbased.generate``."""

    def __init__(self, name: str, seed: int) -> None:
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        import numpy as np

        from jaxbased import LanguageModel, count_parameters
        from jaxbased.generation import _programs_for

        self.name = name
        self.config = model_config(name)
        self.model = LanguageModel(self.config)
        variables = jax.jit(self.model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
        self.params = nn.meta.unbox(variables["params"])
        self.parameters = count_parameters(self.params)
        self.programs = _programs_for(self.model)
        self.rng = np.random.default_rng(seed)

    def prompts(self, batch: int, length: int):
        import jax.numpy as jnp

        tokens = self.rng.integers(0, VOCAB_SIZE, size=(batch, length), dtype="int32")
        return jnp.asarray(tokens), jnp.full((batch,), length, jnp.int32)

    def compile_prefill(self, tokens, lengths, max_len: int):
        start = time.perf_counter()
        compiled = self.programs.prefill.lower(
            self.params, tokens, lengths, max_len=max_len
        ).compile()
        return compiled, time.perf_counter() - start

    def decode_arguments(self, logits):
        import jax
        import jax.numpy as jnp

        return (
            logits,
            jax.random.key(0),
            jnp.float32(1.0),
            jnp.float32(1.0),
            jnp.zeros((self.config.padded_vocab_size,), bool),
            jnp.int32(-1),
        )

    def compile_decode(self, cache, logits, steps: int):
        from jaxbased.generation import _DecodeMode

        mode = _DecodeMode(steps, greedy=True, top_k=0, use_top_p=False, with_callback=False)
        start = time.perf_counter()
        compiled = self.programs.decode.lower(
            self.params, cache, *self.decode_arguments(logits), mode=mode
        ).compile()
        return compiled, time.perf_counter() - start


def _timed(function, *args):
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(function(*args))
    return out, time.perf_counter() - start


def measure_decode_vs_context(
    runner: Runner, contexts: Sequence[int], batches: Sequence[int], steps: int, repeats: int
) -> list[dict]:
    """(a): per-token decode time at each context and batch size."""
    import jax
    import jax.numpy as jnp

    from jaxbased.generation import _tree_bytes

    rows = []
    for context in contexts:
        tokens, lengths = runner.prompts(1, context)
        max_len = context + steps
        prefill, prefill_compile = runner.compile_prefill(tokens, lengths, max_len)
        jax.block_until_ready(prefill(runner.params, tokens, lengths))  # warm-up
        (logits, cache), prefill_seconds = _timed(prefill, runner.params, tokens, lengths)
        for batch in batches:

            def tiled(tree, batch=batch):
                return jax.tree.map(lambda x: jnp.repeat(x, batch, axis=0), tree)

            decode, decode_compile = runner.compile_decode(tiled(cache), tiled(logits), steps)
            times = []
            for _ in range(repeats + 1):  # the first run is a warm-up
                fresh_cache = jax.block_until_ready(tiled(cache))  # donated: a new copy per run
                (tokens_out, *_), seconds = _timed(
                    decode, runner.params, fresh_cache, *runner.decode_arguments(tiled(logits))
                )
                assert int((tokens_out >= 0).sum()) == batch * steps
                times.append(seconds)
            best = min(times[1:])
            per_token = best / (steps - 1)
            rows.append(
                {
                    "model": runner.name,
                    "context": context,
                    "batch": batch,
                    "decode_steps": steps,
                    "ms_per_step": 1e3 * per_token,
                    "decode_tokens_per_s": batch / per_token,
                    "decode_run_seconds": times,
                    "prefill_seconds_batch1": prefill_seconds,
                    "compile_seconds": {"prefill": prefill_compile, "decode": decode_compile},
                    "cache_bytes": _tree_bytes(tiled(cache)),
                }
            )
            print(
                f"  (a) {MODEL_TITLES[runner.name]:14s} T={context:5d} B={batch:2d}: "
                f"{1e3 * per_token:8.2f} ms/step, {batch / per_token:9.1f} tokens/s",
                flush=True,
            )
        del cache, logits
    return rows


def measure_throughput(
    runner: Runner, batches: Sequence[int], prompts: Sequence[int], new_tokens: int
) -> list[dict]:
    """(b): prefill + decode of ``new_tokens`` per row, for each batch and prompt length."""

    rows = []
    for prompt in prompts:
        for batch in batches:
            tokens, lengths = runner.prompts(batch, prompt)
            prefill, prefill_compile = runner.compile_prefill(tokens, lengths, prompt + new_tokens)
            (logits, cache), prefill_seconds = _timed(prefill, runner.params, tokens, lengths)
            decode, decode_compile = runner.compile_decode(cache, logits, new_tokens)
            (tokens_out, *_), decode_seconds = _timed(
                decode, runner.params, cache, *runner.decode_arguments(logits)
            )
            generated = int((tokens_out >= 0).sum())
            assert generated == batch * new_tokens
            rows.append(
                {
                    "model": runner.name,
                    "batch": batch,
                    "prompt": prompt,
                    "new_tokens": new_tokens,
                    "prefill_seconds": prefill_seconds,
                    "decode_seconds": decode_seconds,
                    "decode_tokens_per_s": generated / decode_seconds,
                    "end_to_end_tokens_per_s": generated / (prefill_seconds + decode_seconds),
                    "ms_per_step": 1e3 * decode_seconds / max(new_tokens - 1, 1),
                    "compile_seconds": {"prefill": prefill_compile, "decode": decode_compile},
                }
            )
            print(
                f"  (b) {MODEL_TITLES[runner.name]:14s} B={batch:2d} P={prompt:5d}: prefill "
                f"{prefill_seconds:7.2f} s, decode {decode_seconds:7.2f} s = "
                f"{generated / decode_seconds:8.1f} tokens/s",
                flush=True,
            )
            del cache, logits, tokens_out
    return rows


def measure_cache_bytes(runner: Runner, lengths: Sequence[int]) -> list[dict]:
    """(c): bytes of one sequence's decoding cache able to hold ``length`` tokens."""
    from jaxbased.generation import decode_cache_bytes

    return [
        {"model": runner.name, "length": n, "bytes": decode_cache_bytes(runner.model, 1, n)}
        for n in lengths
    ]


# Summary and tables -----------------------------------------------------------------------------
def checks(decode_rows: list[dict]) -> dict[str, Any]:
    """The issue's two expectations, per decode batch size, from section (a)."""
    out: dict[str, Any] = {}
    if not decode_rows:
        return out
    contexts = sorted({row["context"] for row in decode_rows})
    short, long = contexts[0], contexts[-1]
    index = {(r["model"], r["context"], r["batch"]): r for r in decode_rows}
    for batch in sorted({row["batch"] for row in decode_rows}):
        based_short = index.get(("based", short, batch))
        based_long = index.get(("based", long, batch))
        attention_long = index.get(("transformer", long, batch))
        if based_short and based_long:
            ratio = based_long["ms_per_step"] / based_short["ms_per_step"]
            out[f"based_decode_time_ratio_T{long}_over_T{short}_B{batch}"] = {
                "value": ratio,
                "expected": "<= 1.25",
                "met": ratio <= 1.25,
            }
        if based_long and attention_long:
            ratio = based_long["decode_tokens_per_s"] / attention_long["decode_tokens_per_s"]
            out[f"based_over_transformer_decode_throughput_T{long}_B{batch}"] = {
                "value": ratio,
                "expected": ">= 4",
                "met": ratio >= 4.0,
            }
    return out


def tables(payload: dict) -> str:
    lines = []
    decode = payload["decode_vs_context"]
    if decode:
        models = [m for m in payload["models"] if any(r["model"] == m for r in decode)]
        lines += [
            "(a) decode time per token (ms/step; tokens/s = batch / time) against the context",
            "",
            "| context | batch | "
            + " | ".join(f"{MODEL_TITLES[m]} ms/step | {MODEL_TITLES[m]} tok/s" for m in models)
            + " | BASED speed-up |",
            "|---:|---:|" + "---:|---:|" * len(models) + "---:|",
        ]
        index = {(r["model"], r["context"], r["batch"]): r for r in decode}
        for context in sorted({r["context"] for r in decode}):
            for batch in sorted({r["batch"] for r in decode}):
                cells = []
                for m in models:
                    r = index.get((m, context, batch))
                    cells += (
                        [f"{r['ms_per_step']:.2f}", f"{r['decode_tokens_per_s']:.0f}"]
                        if r
                        else ["", ""]
                    )
                b, t = (
                    index.get(("based", context, batch)),
                    index.get(("transformer", context, batch)),
                )
                speedup = f"{t['ms_per_step'] / b['ms_per_step']:.2f}x" if b and t else ""
                lines.append(f"| {context} | {batch} | " + " | ".join(cells) + f" | {speedup} |")
        lines.append("")
    throughput = payload["throughput"]
    if throughput:
        lines += [
            f"(b) throughput, {throughput[0]['new_tokens']} new tokens per row",
            "",
            "| model | batch | prompt | prefill s | decode s | decode tok/s | end-to-end tok/s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in throughput:
            lines.append(
                f"| {MODEL_TITLES[r['model']]} | {r['batch']} | {r['prompt']} | "
                f"{r['prefill_seconds']:.2f} | {r['decode_seconds']:.2f} | "
                f"{r['decode_tokens_per_s']:.0f} | {r['end_to_end_tokens_per_s']:.0f} |"
            )
        lines.append("")
    cache = payload["cache_bytes_per_sequence"]
    if cache:
        lengths = sorted({r["length"] for r in cache})
        index = {(r["model"], r["length"]): r["bytes"] for r in cache}
        lines += [
            "(c) decoding-cache memory per sequence (MiB) against the length it holds",
            "",
            "| model | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|" + "---:|" * len(lengths),
        ]
        for m in payload["models"]:
            if any((m, n) in index for n in lengths):
                cells = [f"{index[(m, n)] / MIB:.2f}" if (m, n) in index else "" for n in lengths]
                lines.append(f"| {MODEL_TITLES[m]} | " + " | ".join(cells) + " |")
        lines.append("")
    for name, check in payload["checks"].items():
        lines.append(
            f"- {name}: {check['value']:.2f} (expected {check['expected']}): "
            + ("met" if check["met"] else "NOT met")
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    contexts = [int(x) for x in FLAGS.contexts]
    decode_batches = [int(x) for x in FLAGS.decode_batches]
    batches = [int(x) for x in FLAGS.batches]
    prompts = [int(x) for x in FLAGS.prompts]
    new_tokens, steps, repeats, output = (
        FLAGS.new_tokens,
        FLAGS.decode_steps,
        FLAGS.repeats,
        FLAGS.output,
    )
    if FLAGS.quick:
        contexts, decode_batches, batches, prompts = [64, 256], [1, 4], [1, 4], [64]
        new_tokens, steps, repeats = 32, 16, 1
        if output == "benchmarks/results/generation.json":
            output = "/tmp/generation_quick.json"
    for name in FLAGS.models:
        model_config(name)  # validates the name
    if steps < 2:
        raise app.UsageError("--decode_steps must be >= 2")

    started = time.perf_counter()
    payload: dict[str, Any] = {
        "benchmark": "generation",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "machine": machine_info(),
        "contention": {"start": contention_snapshot()},
        "models": list(FLAGS.models),
        "configs": {},
        "parameters": {},
        "settings": {
            "contexts": contexts,
            "decode_batches": decode_batches,
            "decode_steps": steps,
            "repeats": repeats,
            "batches": batches,
            "prompts": prompts,
            "new_tokens": new_tokens,
            "sampling": "greedy, no stop tokens",
        },
        "decode_vs_context": [],
        "throughput": [],
        "cache_bytes_per_sequence": [],
    }
    if payload["contention"]["start"]["other_benchmarks"]:
        print(
            "WARNING: other benchmarks are running and share the cores:\n  "
            + "\n  ".join(payload["contention"]["start"]["other_benchmarks"]),
            flush=True,
        )
    with ContentionSampler() as sampler:
        for name in FLAGS.models:
            runner = Runner(name, FLAGS.seed)
            payload["configs"][name] = runner.config.to_dict()
            payload["parameters"][name] = runner.parameters
            print(f"{MODEL_TITLES[name]}: {runner.parameters:,} parameters", flush=True)
            if "c" in FLAGS.sections:
                payload["cache_bytes_per_sequence"] += measure_cache_bytes(
                    runner, [*contexts, 32768, 131072]
                )
            if "a" in FLAGS.sections:
                payload["decode_vs_context"] += measure_decode_vs_context(
                    runner, contexts, decode_batches, steps, repeats
                )
            if "b" in FLAGS.sections:
                payload["throughput"] += measure_throughput(runner, batches, prompts, new_tokens)
            del runner
    payload["checks"] = checks(payload["decode_vs_context"])
    payload["contention"]["end"] = contention_snapshot()
    payload["contention"]["during"] = sampler.summary()
    payload["contention"]["samples"] = sampler.samples
    payload["wall_seconds"] = time.perf_counter() - started
    print()
    print(tables(payload))
    print(
        f"\nwall time {payload['wall_seconds']:.0f} s; "
        f"contention during the run: {payload['contention']['during']}"
    )
    if output:
        write_json_atomic(output, payload)
        print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
