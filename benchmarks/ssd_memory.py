"""Temporary memory of SSD's XLA path as heads grow over fixed groups (``memory_analysis``).

Mamba-2's ``b`` and ``c`` are ``[B, T, G, N]``, shared by the ``H / G`` heads of a group. This
compiles ``jaxbased.ops.ssd`` (``implementation="xla"``, the chunked algorithm) forward and
forward+backward for the CPU, for ``H / G`` in ``--ratios`` at fixed ``G``, and reports XLA's
``compiled.memory_analysis()``: ``temp_size_in_bytes`` (scratch the program allocates besides
its arguments and outputs), argument and output bytes. Memory sizes are deterministic for a
given jax version and shapes, so a shared CPU is fine.

Two sweeps: ``fixed_width`` keeps the inner width ``H * P`` (so ``x`` and ``y``) constant, as a
Mamba-2 layer of one ``d_model`` with a smaller ``head_dim``; ``fixed_head_dim`` keeps ``P`` and
grows the width with the heads.

Usage (repository root)::

    python benchmarks/ssd_memory.py            # prints a table, writes results/ssd_memory.json
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks.common import machine_info, write_json_atomic
from jaxbased.ops import ssd


def _ssd_options() -> dict:
    # Older revisions had no implementation argument (always XLA): measure either.
    if "implementation" in inspect.signature(ssd).parameters:
        return {"implementation": "xla"}
    return {}


def measure(batch, seq, heads, head_dim, groups, state_dim, chunk) -> dict:
    """``memory_analysis`` of the jitted forward and forward+backward of one SSD call."""
    x = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.float32)
    dt = jax.ShapeDtypeStruct((batch, seq, heads), jnp.float32)
    a = jax.ShapeDtypeStruct((heads,), jnp.float32)
    bc = jax.ShapeDtypeStruct((batch, seq, groups, state_dim), jnp.float32)
    options = _ssd_options()

    def forward(x, dt, a, b, c):
        return ssd(x, dt, a, b, c, chunk_size=chunk, **options)

    def loss(x, dt, a, b, c):
        return jnp.sum(forward(x, dt, a, b, c) ** 2)

    row = {
        "batch": batch,
        "seq": seq,
        "heads": heads,
        "head_dim": head_dim,
        "groups": groups,
        "state_dim": state_dim,
        "chunk": chunk,
    }
    for name, function in (
        ("forward", forward),
        ("forward_backward", jax.grad(loss, argnums=(0, 1, 2, 3, 4))),
    ):
        memory = jax.jit(function).lower(x, dt, a, bc, bc).compile().memory_analysis()
        row[name] = {
            "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
        }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--state_dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--width", type=int, default=512, help="H * P of the fixed_width sweep")
    parser.add_argument("--head_dim", type=int, default=64, help="P of the fixed_head_dim sweep")
    parser.add_argument("--ratios", default="1,2,4,8", help="heads / groups")
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(__file__), "results", "ssd_memory.json"),
    )
    args = parser.parse_args(argv)
    ratios = [int(r) for r in args.ratios.split(",")]
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    rows = []
    print("| sweep | H | P | G | forward temp MiB | fwd+bwd temp MiB |")
    print("|---|---|---|---|---|---|")
    for sweep in ("fixed_width", "fixed_head_dim"):
        for ratio in ratios:
            heads = ratio * args.groups
            head_dim = args.width // heads if sweep == "fixed_width" else args.head_dim
            row = measure(
                args.batch, args.seq, heads, head_dim, args.groups, args.state_dim, args.chunk
            )
            row["sweep"] = sweep
            rows.append(row)
            print(
                f"| {sweep} | {heads} | {head_dim} | {args.groups} | "
                f"{row['forward']['temp_bytes'] / 2**20:.2f} | "
                f"{row['forward_backward']['temp_bytes'] / 2**20:.2f} |",
                flush=True,
            )
    write_json_atomic(args.output, {"machine": machine_info(), "revision": revision, "rows": rows})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
