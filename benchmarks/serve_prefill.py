"""Prefill of one long prompt by the serving engine: whole vs chunked (docs/serving.md).

For each model of the benchmark pair (``benchmarks/common.py``, random weights), an engine
with one slot prefills a random prompt of ``--prompt`` tokens (a) whole, by the parallel
forms in one compiled program, and (b) chunked, as the server does by default: the first
``--chunk`` tokens by the parallel forms, then every further chunk by a compiled scan of the
recurrent decode step over its tokens. Each is timed after an untimed compiling call, blocked
on its results; both must give the same last logits (to float32 rounding), which is checked.

    .venv/bin/python benchmarks/serve_prefill.py --prompt=4096 --chunk=512
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("prompt", 4096, "Prompt length (tokens).")
flags.DEFINE_integer("chunk", 512, "The engine's prefill_chunk for the chunked prefill.")
flags.DEFINE_list("models", ["based", "transformer"], "Models, from: based, transformer.")
flags.DEFINE_string("output", "benchmarks/results/serve_prefill.json", "Where the JSON goes.")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402  (the benchmarks' shared models and helpers)
    VOCAB_SIZE,
    machine_info,
    model_config,
    write_json_atomic,
)


def timed(call: Any) -> tuple[float, Any]:
    """Seconds of ``call()`` (blocked on its result) after one untimed call, and its result."""
    import jax

    jax.block_until_ready(call())
    start = time.perf_counter()
    result = jax.block_until_ready(call())
    return time.perf_counter() - start, result


def measure(name: str) -> dict:
    """Whole and chunked prefill seconds of one prompt for the model ``name``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxbased.model import LanguageModel
    from jaxbased.serving.engine import Engine, EngineConfig

    model = LanguageModel(model_config(name))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = nn.meta.unbox(variables["params"])
    length, chunk = FLAGS.prompt, FLAGS.chunk
    config = EngineConfig(num_slots=1, max_len=length + 1, prefill_chunk=chunk)
    engine = Engine(model, params, config)
    prompt = np.random.default_rng(0).integers(0, VOCAB_SIZE, size=(1, length)).astype(np.int32)
    padded = np.zeros((1, engine._bucket(length)), np.int32)  # the engine's own buckets
    padded[0, :length] = prompt[0]

    def whole() -> Any:
        return engine._run_prefill(padded, length)[0]

    def chunked() -> Any:
        logits, cache = engine._run_prefill(prompt[:, :chunk], chunk)
        for start in range(chunk, length, chunk):
            count = min(chunk, length - start)
            piece = np.zeros((1, chunk), np.int32)
            piece[0, :count] = prompt[0, start : start + count]
            logits, cache = engine._run_extend(cache, logits, piece, count)
        return logits

    whole_seconds, whole_logits = timed(whole)
    chunked_seconds, chunked_logits = timed(chunked)
    difference = float(np.max(np.abs(np.asarray(whole_logits) - np.asarray(chunked_logits))))
    if difference > 1e-2:
        raise RuntimeError(f"{name}: whole and chunked prefill differ by {difference}")
    row = {
        "model": name,
        "prompt_length": length,
        "chunk": chunk,
        "whole_seconds": whole_seconds,
        "chunked_seconds": chunked_seconds,
        "chunked_over_whole": chunked_seconds / whole_seconds,
        "max_abs_logit_difference": difference,
        "load_average_after": os.getloadavg(),
    }
    print(
        f"{name:<12} prompt {length}: whole {whole_seconds:.2f} s, chunked by {chunk} "
        f"{chunked_seconds:.2f} s ({row['chunked_over_whole']:.1f}x)",
        flush=True,
    )
    return row


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if FLAGS.chunk < 16 or FLAGS.chunk & (FLAGS.chunk - 1) or FLAGS.chunk >= FLAGS.prompt:
        raise app.UsageError(
            f"--chunk={FLAGS.chunk} must be a power of two >= 16 and < --prompt={FLAGS.prompt}"
        )
    for name in FLAGS.models:
        model_config(name)  # validates the name
    payload = {
        "benchmark": "serve_prefill",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "runs": [measure(name) for name in FLAGS.models],
    }
    if FLAGS.output:
        write_json_atomic(FLAGS.output, payload)
        print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
