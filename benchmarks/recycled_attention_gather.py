"""What a Recycled Attention step's pieces cost on this backend, one layer at a time: the
gather of a set of ``K`` keys and values at scattered slots (as after a refresh) against ``K``
consecutive slots (the local-only set), the refresh's ``lax.top_k`` over a full cache's
scores, and a full step's ``q . k`` over every slot (docs/recycled_attention.md#cost).

Shapes are one layer of the demo Transformer++ under ``benchmarks/recycled_attention.py``:
``[batch, heads, context, head_dim] = [8, 4, 4096, 32]`` float32 keys and values by default.
Each piece is jitted, run once to compile, then timed ``--repeats`` times over 10 calls; the
fastest mean per call is reported (the least disturbed on a shared machine).

Usage (from the repository root)::

    python benchmarks/recycled_attention_gather.py
    python benchmarks/recycled_attention_gather.py --context=8192 --batch=4
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "Rows (windows) of the batch.")
flags.DEFINE_integer("heads", 4, "Heads.")
flags.DEFINE_integer("context", 4096, "Cache slots (filled positions).")
flags.DEFINE_integer("head_dim", 32, "Channels per head.")
flags.DEFINE_list("top_k", ["64", "256", "1024"], "Set sizes K.")
flags.DEFINE_integer("repeats", 5, "Timed rounds of 10 calls each.")
flags.DEFINE_string(
    "output", "benchmarks/results/recycled_attention_gather.json", "The JSON ('' for none)."
)


def fastest_ms(function: Callable[..., Any], *arguments: Any, repeats: int) -> float:
    """The fastest mean milliseconds per call of the jitted ``function`` over ``repeats``
    rounds of 10 calls (after one call that compiles)."""
    import jax

    compiled = jax.jit(function)
    jax.block_until_ready(compiled(*arguments))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            result = compiled(*arguments)
        jax.block_until_ready(result)
        best = min(best, (time.perf_counter() - start) / 10)
    return 1e3 * best


def measure(batch: int, heads: int, context: int, head_dim: int, sizes: list[int], repeats: int):
    """One row per ``K``: milliseconds of the gathers, the top-k and the full ``q . k``."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    shape = (batch, heads, context, head_dim)
    keys = jnp.asarray(rng.normal(size=shape), jnp.float32)
    values = jnp.asarray(rng.normal(size=shape), jnp.float32)
    query = jnp.asarray(rng.normal(size=(batch, heads, head_dim)), jnp.float32)
    scores = jnp.asarray(rng.random((batch, heads, context)), jnp.float32)

    def gather(keys: Any, values: Any, slots: Any) -> tuple[Any, Any]:
        index = slots[..., None]
        return (
            jnp.take_along_axis(keys, index, axis=2),
            jnp.take_along_axis(values, index, axis=2),
        )

    full_ms = fastest_ms(
        lambda k, q: jnp.einsum("bhsd,bhd->bhs", k, q), keys, query, repeats=repeats
    )
    rows = []
    for size in sizes:
        scattered = rng.permuted(np.tile(np.arange(context), (batch, heads, 1)), axis=-1)
        scattered = jnp.asarray(scattered[..., :size], jnp.int32)
        recent = jnp.asarray(
            np.broadcast_to(np.arange(context - size, context), (batch, heads, size)), jnp.int32
        )
        row = {
            "top_k": size,
            "gather_scattered_ms": fastest_ms(gather, keys, values, scattered, repeats=repeats),
            "gather_consecutive_ms": fastest_ms(gather, keys, values, recent, repeats=repeats),
            "top_k_ms": fastest_ms(
                functools.partial(jax.lax.top_k, k=size), scores, repeats=repeats
            ),
            "full_query_key_ms": full_ms,
        }
        rows_gathered = 2 * batch * heads * size
        row["scattered_ns_per_row"] = 1e6 * row["gather_scattered_ms"] / rows_gathered
        row["consecutive_ns_per_row"] = 1e6 * row["gather_consecutive_ms"] / rows_gathered
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    sizes = [int(k) for k in FLAGS.top_k]
    if any(not 1 <= k <= FLAGS.context for k in sizes):
        raise app.UsageError(f"--top_k={FLAGS.top_k} must lie in [1, --context={FLAGS.context}]")
    rows = measure(FLAGS.batch, FLAGS.heads, FLAGS.context, FLAGS.head_dim, sizes, FLAGS.repeats)
    print(
        "| K | gather, scattered ms | gather, consecutive ms | ns/row scattered | "
        "ns/row consecutive | top_k ms | full q.k ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['top_k']} | {row['gather_scattered_ms']:.2f} | "
            f"{row['gather_consecutive_ms']:.2f} | {row['scattered_ns_per_row']:.0f} | "
            f"{row['consecutive_ns_per_row']:.0f} | {row['top_k_ms']:.2f} | "
            f"{row['full_query_key_ms']:.2f} |"
        )
    if FLAGS.output:
        settings = {
            "batch": FLAGS.batch,
            "heads": FLAGS.heads,
            "context": FLAGS.context,
            "head_dim": FLAGS.head_dim,
            "repeats": FLAGS.repeats,
        }
        write_json_atomic(
            FLAGS.output, {"machine": machine_info(), "settings": settings, "rows": rows}
        )


if __name__ == "__main__":
    app.run(main)
