"""Load test of jaxbased-serve: N streamed requests, C at a time, over 127.0.0.1.

For each model of the benchmark pair (``benchmarks/common.py``: BASED and Transformer++ of
about 8.6M parameters, random weights) and each prompt length, a real uvicorn server runs in
this process (the engine in its own thread) and an asyncio client in a separate process (so
that it does not hold the server's interpreter lock) sends ``--requests`` greedy streaming
completions of ``--new_tokens`` tokens on average (each between half and 1.5 times that, so
requests end at different steps), in three modes:

- ``continuous``: ``C`` slots, ``C`` requests in flight; a request joins the running batch as
  soon as a slot frees (continuous batching);
- ``one_at_a_time``: one slot, ``C`` requests in flight (they wait in the server's queue);
- ``static``: ``C`` slots, requests sent in batches of ``C``, each batch sent when the
  previous one has fully finished (a static batch waits for its longest request).

Measured per run: throughput (generated tokens / wall time), time to first token and
per-token latency (the gaps between a request's streamed tokens), p50 and p99. Each server
compiles on an untimed warm-up request first. The engine's own metrics split each run's
wall time into decode steps, prefills (with slot insertion and first token) and the rest
(the scheduler's and the HTTP streaming's host work, and waiting for requests). Before its
server starts, each engine's compiled programs are timed alone: one decode step over its slots
and one whole-prompt prefill, blocked on their results (medians). ``--repeats`` rounds run
every case again, the modes in reverse order on odd rounds, so that a change in the shared
machine's load falls on every mode; the ratios use the median throughput over the rounds.
The run stops by itself; results go to ``--output`` as JSON.

    .venv/bin/python benchmarks/serve_load.py --quick
    .venv/bin/python benchmarks/serve_load.py --requests=64 --concurrency=16 --prompts=256,4096
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("requests", 64, "Requests per run (N).")
flags.DEFINE_integer("concurrency", 16, "Requests in flight, and slots of the batched modes (C).")
flags.DEFINE_list("prompts", ["256", "4096"], "Prompt lengths (tokens).")
flags.DEFINE_integer("new_tokens", 128, "Mean tokens generated per request.")
flags.DEFINE_list("models", ["based", "transformer"], "Models, from: based, transformer.")
flags.DEFINE_list(
    "modes", ["continuous", "one_at_a_time", "static"], "Modes: continuous, one_at_a_time, static."
)
flags.DEFINE_integer("prefill_chunk", 0, "The engine's prefill_chunk (0: whole prompts).")
flags.DEFINE_float("timeout", 600.0, "Seconds a run may take before it is abandoned.")
flags.DEFINE_string("output", "benchmarks/results/serve_load.json", "Where the JSON goes.")
flags.DEFINE_bool("quick", False, "Smoke run: N 32, C 8, prompts 64 and 512, 24 new tokens.")
flags.DEFINE_integer("seed", 0, "Seed of the parameters and prompts.")
flags.DEFINE_integer(
    "repeats", 1, "Rounds over every (model, prompt, mode); the order of the modes alternates."
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402  (the benchmarks' shared models and helpers)
    MODEL_TITLES,
    VOCAB_SIZE,
    machine_info,
    model_config,
    write_json_atomic,
)

MODES = ("continuous", "one_at_a_time", "static")


def percentile(values: Sequence[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if len(values) else None


class LocalServer:
    """A uvicorn server for one engine on a free 127.0.0.1 port, in a daemon thread."""

    def __init__(self, engine: Any, model_name: str) -> None:
        import uvicorn

        from jaxbased.serving.app import Server, create_app

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        server = Server(engine, _NoTextTokenizer(), model_name=model_name, shutdown_timeout=5.0)
        config = uvicorn.Config(
            create_app(server), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the benchmark server failed to start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class _NoTextTokenizer:
    """Token ids in and out (the benchmark sends token-list prompts); text is the ids."""

    eos_id = None

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f" {int(token)}" for token in ids)


async def stream_one(client: Any, url: str, prompt: list[int], max_tokens: int) -> dict:
    """Send one streaming completion; its token arrival times."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"][0]["finish_reason"] is None:
                    arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals, "max_tokens": max_tokens}


async def drive(
    url: str, prompts: list[list[int]], lengths: list[int], mode: str, c: int, timeout: float
) -> dict:
    """Send the requests as ``mode`` does, ``c`` at a time; throughput and latency
    percentiles."""
    import httpx

    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        if mode == "static":
            results = []
            for first in range(0, len(prompts), c):
                batch = zip(prompts[first : first + c], lengths[first : first + c], strict=True)
                results += await asyncio.gather(
                    *(stream_one(client, url, prompt, length) for prompt, length in batch)
                )
        else:
            gate = asyncio.Semaphore(c)

            async def gated(prompt: list[int], length: int) -> dict:
                async with gate:
                    return await stream_one(client, url, prompt, length)

            results = await asyncio.gather(
                *(gated(prompt, length) for prompt, length in zip(prompts, lengths, strict=True))
            )
        wall = time.perf_counter() - start
    tokens = sum(len(result["arrivals"]) for result in results)
    expected = sum(lengths)
    if tokens != expected:
        raise RuntimeError(f"{mode}: {tokens} tokens streamed; {expected} were asked for")
    ttft = [result["arrivals"][0] - result["start"] for result in results]
    gaps = [
        later - earlier
        for result in results
        for earlier, later in zip(result["arrivals"], result["arrivals"][1:], strict=False)
    ]
    return {
        "wall_seconds": wall,
        "generated_tokens": tokens,
        "throughput_tokens_per_second": tokens / wall,
        "ttft_p50_seconds": percentile(ttft, 50),
        "ttft_p99_seconds": percentile(ttft, 99),
        "per_token_p50_seconds": percentile(gaps, 50),
        "per_token_p99_seconds": percentile(gaps, 99),
    }


def drive_in_process(*args: Any) -> dict:
    """:func:`drive` run to completion (the entry point of the client process)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return asyncio.run(drive(*args))


def drive_elsewhere(*args: Any) -> dict:
    """:func:`drive` in a separate client process, so that the client's parsing of the
    streams does not hold the server process's interpreter lock (the server's event loop
    and the engine's thread share it)."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(drive_in_process, *args).result()


def engine_times(engine: Any) -> dict[str, float]:
    """The engine's totals so far, from its metrics: decode steps and their seconds (each
    with the copy of its outputs to the host), prefills and their seconds (each with the
    slot insertion and the first token), and scheduler iterations."""
    from jaxbased.serving.metrics import parse_metrics

    values = parse_metrics(engine.metrics.render())
    prefix = "jaxbased_serve_"
    return {
        "engine_decode_steps": values[f"{prefix}decode_step_seconds_count"],
        "engine_decode_seconds": values[f"{prefix}decode_step_seconds_sum"],
        "engine_prefills": values[f"{prefix}prefill_seconds_count"],
        "engine_prefill_seconds": values[f"{prefix}prefill_seconds_sum"],
        "engine_iterations": float(engine.iterations),
    }


def median_seconds(call: Any, repeats: int) -> float:
    """The median wall time of ``call()`` over ``repeats`` calls, after one untimed call."""
    import numpy as np

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def step_profile(engine: Any, prompt: list[int]) -> dict[str, float]:
    """Seconds of the engine's compiled programs alone (its thread not started): one decode
    step over every slot, with and without the device-to-host copy of its outputs, and one
    whole-prompt prefill of ``prompt``; each blocked on its results. The decode steps write
    only free slots (as :meth:`Engine.warmup` does)."""
    import jax
    import numpy as np

    programs = engine._programs  # the benchmark times the engine's own programs
    occupied = np.zeros((engine.config.num_slots,), bool)

    def decode_compiled() -> None:
        *outputs, engine._cache = programs.decode(
            engine.params, engine._cache, engine._tokens, occupied, *engine._sampling_arrays()
        )
        jax.block_until_ready(outputs)

    tokens = np.zeros((1, engine._bucket(len(prompt))), np.int32)
    tokens[0, : len(prompt)] = prompt

    def prefill() -> None:
        jax.block_until_ready(engine._run_prefill(tokens, len(prompt)))

    return {
        "decode_step_compiled_seconds": median_seconds(decode_compiled, 10),
        "decode_step_with_copy_seconds": median_seconds(engine._run_decode, 10),
        "prefill_seconds": median_seconds(prefill, 2),
    }


def run_case(name: str, params: Any, prompt_length: int, mode: str, rng: Any) -> dict:
    from jaxbased.model import LanguageModel
    from jaxbased.serving.engine import Engine, EngineConfig

    c, n, mean = FLAGS.concurrency, FLAGS.requests, FLAGS.new_tokens
    lengths = rng.integers(max(1, mean // 2), mean + mean // 2 + 1, size=n).tolist()
    prompts = rng.integers(0, VOCAB_SIZE, size=(n, prompt_length)).tolist()
    slots = 1 if mode == "one_at_a_time" else c
    max_len = prompt_length + max(lengths) + 1
    chunk = FLAGS.prefill_chunk if FLAGS.prefill_chunk <= max_len else 0
    engine_config = EngineConfig(
        num_slots=slots,
        max_len=max_len,
        max_queue=n + 1,
        prefill_token_budget=max(prompt_length, 2048),
        prefill_chunk=chunk,
    )
    engine = Engine(LanguageModel(model_config(name)), params, engine_config)
    profile = step_profile(engine, prompts[0])
    with LocalServer(engine, name) as server:
        compile_start = time.perf_counter()
        asyncio.run(drive(server.url, prompts[:1], [2], "continuous", 1, FLAGS.timeout))
        compile_seconds = time.perf_counter() - compile_start  # the programs compiled
        before = engine_times(engine)
        measured = drive_elsewhere(server.url, prompts, lengths, mode, c, FLAGS.timeout)
        after = engine_times(engine)
    spent = {name: after[name] - before[name] for name in after}
    spent["engine_other_seconds"] = (
        measured["wall_seconds"] - spent["engine_decode_seconds"] - spent["engine_prefill_seconds"]
    )
    row = {
        "model": name,
        "mode": mode,
        "prompt_length": prompt_length,
        "requests": n,
        "concurrency": c,
        "slots": slots,
        "mean_new_tokens": mean,
        "warmup_seconds": compile_seconds,
        **profile,
        **measured,
        **spent,
        "load_average_after": os.getloadavg(),
    }
    print(
        f"{MODEL_TITLES[name]:<14} prompt {prompt_length:>5} {mode:<14} "
        f"{row['throughput_tokens_per_second']:8.1f} tok/s  TTFT p50 "
        f"{row['ttft_p50_seconds']:.3f} s p99 {row['ttft_p99_seconds']:.3f} s  per token p50 "
        f"{1e3 * row['per_token_p50_seconds']:.1f} ms "
        f"p99 {1e3 * row['per_token_p99_seconds']:.1f} ms  (decode step "
        f"{1e3 * row['decode_step_compiled_seconds']:.1f} ms, prefill "
        f"{1e3 * row['prefill_seconds']:.0f} ms; in the run: decode "
        f"{row['engine_decode_seconds']:.1f} s over {row['engine_decode_steps']:.0f} steps, "
        f"prefill {row['engine_prefill_seconds']:.1f} s, other "
        f"{row['engine_other_seconds']:.1f} s)",
        flush=True,
    )
    return row


def ratios(rows: list[dict]) -> dict[str, float]:
    """Throughput of continuous batching over the other modes, and of BASED over
    Transformer++ (continuous), per prompt length; medians over the rounds."""
    import numpy as np

    rounds: dict[tuple[str, int, str], list[float]] = {}
    for r in rows:
        key = (r["model"], r["prompt_length"], r["mode"])
        rounds.setdefault(key, []).append(r["throughput_tokens_per_second"])
    by = {key: float(np.median(values)) for key, values in rounds.items()}
    out = {}
    for (model, length, mode), value in by.items():
        if mode != "continuous":
            out[f"{model}_prompt{length}_continuous_over_{mode}"] = (
                by.get((model, length, "continuous"), float("nan")) / value
            )
        elif model == "based" and ("transformer", length, mode) in by:
            out[f"prompt{length}_based_over_transformer"] = (
                value / by[("transformer", length, mode)]
            )
    return out


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    if FLAGS.quick:
        FLAGS.requests, FLAGS.concurrency, FLAGS.new_tokens = 32, 8, 24
        FLAGS.prompts = ["64", "512"]
        if FLAGS.output == "benchmarks/results/serve_load.json":
            FLAGS.output = "benchmarks/results/serve_load_quick.json"
    for mode in FLAGS.modes:
        if mode not in MODES:
            raise app.UsageError(f"--modes has {mode!r}; allowed: {', '.join(MODES)}")
    for name in FLAGS.models:
        model_config(name)  # validates the name
    if FLAGS.requests < 1 or FLAGS.concurrency < 1 or FLAGS.new_tokens < 2 or FLAGS.repeats < 1:
        raise app.UsageError(
            "--requests, --concurrency and --repeats must be >= 1, --new_tokens >= 2"
        )

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxbased import LanguageModel, count_parameters

    started = time.perf_counter()
    payload: dict[str, Any] = {
        "benchmark": "serve_load",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "requests": FLAGS.requests,
            "concurrency": FLAGS.concurrency,
            "prompts": [int(p) for p in FLAGS.prompts],
            "mean_new_tokens": FLAGS.new_tokens,
            "prefill_chunk": FLAGS.prefill_chunk,
            "repeats": FLAGS.repeats,
            "sampling": "greedy, streamed, end of text ignored",
            "client": "httpx.AsyncClient in a separate process, 127.0.0.1",
        },
        "parameters": {},
        "runs": [],
    }
    all_params = {}
    for name in FLAGS.models:
        model = LanguageModel(model_config(name))
        variables = jax.jit(model.init)(jax.random.key(FLAGS.seed), jnp.zeros((1, 8), jnp.int32))
        all_params[name] = nn.meta.unbox(variables["params"])
        payload["parameters"][name] = count_parameters(all_params[name])
    for round_index in range(FLAGS.repeats):
        modes = FLAGS.modes if round_index % 2 == 0 else FLAGS.modes[::-1]
        for name in FLAGS.models:
            for length in (int(p) for p in FLAGS.prompts):
                for mode in modes:
                    rng = np.random.default_rng(FLAGS.seed + length)  # the same requests per mode
                    row = run_case(name, all_params[name], length, mode, rng)
                    payload["runs"].append({"round": round_index, **row})
                    payload["ratios"] = ratios(payload["runs"])
                    if FLAGS.output:  # what has run so far survives an interruption
                        write_json_atomic(FLAGS.output, payload)
    payload["ratios"] = ratios(payload["runs"])
    payload["wall_seconds"] = time.perf_counter() - started
    print(json.dumps(payload["ratios"], indent=2))
    if FLAGS.output:
        write_json_atomic(FLAGS.output, payload)
        print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
