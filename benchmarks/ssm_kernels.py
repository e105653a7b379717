"""Time the state-space kernels (issue 16): SSD and the selective scan, Pallas vs XLA vs mamba_ssm.

- SSD (Mamba-2): ``jaxbased.ops.ssd`` with ``implementation="pallas"`` (the linear-attention
  kernel, identity map, ``b, c`` read by group, the kernels' own chunk) and ``"xla"`` (the
  chunked scan, chunk 256), and mamba_ssm's Triton ``mamba_chunk_scan_combined`` (chunk 256)
  when PyTorch and mamba_ssm are importable with CUDA. Shapes: Mamba-2's ``N = 128``, ``P = 64``,
  one group, ``B x T x H`` below, bfloat16 ``x, b, c``, float32 ``dt``.
- Selective scan (Mamba-1): ``jaxbased.ops.selective_scan`` with ``"pallas"`` and ``"xla"``
  (chunked, chunk 64), and mamba_ssm's CUDA ``selective_scan_fn``; ``N = 16``, ``D`` channels,
  bfloat16 ``u, b, c``, float32 ``delta``.

Forward and forward+backward (a VJP with a random cotangent), median of ``--repeats`` calls after
one warm-up, compile outside the timed region (``benchmarks/kernels.py``'s ``time_call``).
mamba_ssm's inputs are laid out as it wants them outside the timed region. The correctness of
the kernels is the test suite's job (``benchmarks/gpu_check.sh`` runs it first).

Usage (repository root; on a GPU or TPU machine)::

    python benchmarks/ssm_kernels.py                 # table on stdout, JSON in results/
    python benchmarks/ssm_kernels.py --quick         # CPU smoke run (interpreted kernels)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks.common import machine_info, write_json_atomic
from benchmarks.kernels import random_arrays, time_call
from jaxbased.ops import selective_scan, ssd

GPU_PLATFORMS = {"gpu", "cuda", "rocm"}


def ssd_functions(chunk: int) -> dict[str, Callable]:
    def run(implementation):
        def function(x, dt, a, b, c):
            return ssd(x, dt, a, b, c, chunk_size=chunk, implementation=implementation)

        return function

    return {"pallas": run("pallas"), f"xla chunked (C={chunk})": run("xla")}


def scan_functions(chunk: int) -> dict[str, Callable]:
    def run(implementation):
        def function(u, delta, a, b, c):
            return selective_scan(
                u, delta, a, b, c, chunk_size=chunk, implementation=implementation
            )

        return function

    return {"pallas": run("pallas"), f"xla chunked (C={chunk})": run("xla")}


def ssd_inputs(batch, seq, heads, state_dim, head_dim=64):
    x, b, c = random_arrays(
        1, [(batch, seq, heads, head_dim), (batch, seq, 1, state_dim), (batch, seq, 1, state_dim)],
        jnp.bfloat16,
    )  # fmt: skip
    keys = jax.random.split(jax.random.key(2), 2)
    dt = jax.nn.softplus(jax.random.normal(keys[0], (batch, seq, heads)) - 3.0)
    a = -jnp.exp(jax.random.uniform(keys[1], (heads,), minval=0.0, maxval=2.7))
    return x, dt, a, b, c


def scan_inputs(batch, seq, channels, state_dim):
    u, b, c = random_arrays(
        3, [(batch, seq, channels), (batch, seq, state_dim), (batch, seq, state_dim)],
        jnp.bfloat16,
    )  # fmt: skip
    keys = jax.random.split(jax.random.key(4), 2)
    delta = jax.nn.softplus(jax.random.normal(keys[0], (batch, seq, channels)) - 3.0)
    a = -jnp.broadcast_to(jnp.arange(1, state_dim + 1, dtype=jnp.float32), (channels, state_dim))
    return u, delta, a, b, c


def gradients(function: Callable, cotangent: jax.Array) -> Callable:
    """Every input's cotangent of ``function`` for a fixed output cotangent."""

    def run(*arrays):
        out, pullback = jax.vjp(function, *arrays)
        return pullback(cotangent.astype(out.dtype))

    return run


def time_torch(call: Callable[[], Any], repeats: int) -> dict[str, float]:
    import torch

    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "min_ms": min(times)}


def mamba_ssm_calls(op: str, arrays, chunk: int) -> dict[str, Callable] | str:
    """``{"forward": call, "forward_backward": call}`` of mamba_ssm's kernel for ``op`` on
    copies of ``arrays`` in its layout, or the reason it is not available."""
    try:
        import numpy as np
        import torch

        if not torch.cuda.is_available():
            return "no CUDA for PyTorch"
        if op == "ssd":
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        else:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:
        return f"mamba_ssm not available: {type(error).__name__}: {error}"

    def tensor(array, dtype, grad):
        host = np.asarray(jnp.asarray(array, jnp.float32))
        return torch.tensor(host, device="cuda", dtype=dtype).requires_grad_(grad)

    calls = {}
    for mode in ("forward", "forward_backward"):
        grad = mode == "forward_backward"
        x, dt, a, b, c = arrays
        if op == "ssd":  # x [B, T, H, P], dt [B, T, H], A [H], B, C [B, T, G, N]
            args = (
                tensor(x, torch.bfloat16, grad), tensor(dt, torch.float32, grad),
                tensor(a, torch.float32, grad), tensor(b, torch.bfloat16, grad),
                tensor(c, torch.bfloat16, grad),
            )  # fmt: skip

            def run(args=args):
                return mamba_chunk_scan_combined(*args, chunk_size=chunk)
        else:  # u, delta [B, D, T], A [D, N], B, C [B, N, T]
            u, delta, b_t, c_t = (jnp.swapaxes(arr, 1, 2) for arr in (x, dt, b, c))
            args = (
                tensor(u, torch.bfloat16, grad), tensor(delta, torch.float32, grad),
                tensor(a, torch.float32, grad), tensor(b_t, torch.bfloat16, grad),
                tensor(c_t, torch.bfloat16, grad),
            )  # fmt: skip

            def run(args=args):
                return selective_scan_fn(*args)

        if grad:
            cotangent = torch.randn_like(run().detach())

            def call(run=run, cotangent=cotangent):
                run().backward(cotangent)
        else:
            call = run
        calls[mode] = call
    return calls


def time_op(args, rows, op, functions, arrays, meta, started) -> None:
    cotangent = random_arrays(9, [arrays[0].shape], jnp.float32)[0]
    for implementation, function in functions.items():
        for mode, fn in (
            ("forward", function),
            ("forward_backward", gradients(function, cotangent)),
        ):
            row = {"op": op, "implementation": implementation, "pass": mode, **meta}
            if time.perf_counter() - started > args.time_budget:
                rows.append({**row, "skipped": "time budget"})
                continue
            try:
                row.update(time_call(fn, arrays, args.repeats))
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            rows.append(row)
            print_row(row)
    if not args.peers:
        return
    calls = mamba_ssm_calls(op, arrays, args.ssd_chunk)
    name = "mamba_ssm " + ("mamba_chunk_scan_combined" if op == "ssd" else "selective_scan_fn")
    if isinstance(calls, str):
        row = {"op": op, "implementation": name, **meta, "skipped": calls}
        rows.append(row)
        print_row(row)
        return
    for mode, call in calls.items():
        row = {"op": op, "implementation": name, "pass": mode, **meta}
        try:
            row.update(time_torch(call, args.repeats))
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows.append(row)
        print_row(row)


def print_row(row: dict) -> None:
    head = f"| {row['op']} | {row['implementation']} | {row.get('pass', '')} | {row['T']} "
    value = f"{row['ms']:.3f}" if "ms" in row else row.get("error") or row.get("skipped")
    print(f"{head}| {value} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run, tiny shapes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_lens", default="2048,8192")
    parser.add_argument("--heads", type=int, default=32, help="SSD heads (P = 64)")
    parser.add_argument("--channels", type=int, default=2048, help="selective-scan D")
    parser.add_argument("--ssd_chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--time_budget", type=float, default=150.0, help="seconds")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    platform_name = jax.default_backend()
    if platform_name not in GPU_PLATFORMS | {"tpu"} and not args.quick:
        print(f"No GPU/TPU (platform {platform_name!r}): running the --quick smoke path instead.")
        args.quick = True
    if args.quick:
        args.batch, args.seq_lens, args.heads, args.channels = 1, "64", 2, 32
        args.repeats, args.ssd_chunk = 2, 32
    args.peers = platform_name in GPU_PLATFORMS
    output = args.output or (
        os.path.join(tempfile.gettempdir(), "jaxbased_ssm_kernels_quick.json")
        if args.quick
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ssm_kernels.json")
    )
    started = time.perf_counter()
    rows: list[dict] = []
    print("| op | implementation | pass | T | median ms |\n|---|---|---|---|---|")
    for seq in (int(s) for s in args.seq_lens.split(",")):
        meta = {"B": args.batch, "T": seq, "H": args.heads, "P": 64, "N": 128, "G": 1}
        arrays = ssd_inputs(args.batch, seq, args.heads, 128)
        time_op(args, rows, "ssd", ssd_functions(args.ssd_chunk), arrays, meta, started)
        del arrays
        meta = {"B": args.batch, "T": seq, "D": args.channels, "N": 16}
        arrays = scan_inputs(args.batch, seq, args.channels, 16)
        time_op(args, rows, "selective_scan", scan_functions(64), arrays, meta, started)
        del arrays
    payload = {
        "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]),
        "machine": {**machine_info(), "device_kind": jax.devices()[0].device_kind},
        "quick": args.quick,
        "rows": rows,
        "elapsed_s": time.perf_counter() - started,
    }
    write_json_atomic(output, payload)
    print(f"\nJSON written to {output} ({payload['elapsed_s']:.0f} s)")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
