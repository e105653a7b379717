"""Check, then time, the Pallas kernels against the XLA reference and the peers (issue 6).

1. Correctness first: every kernel (chunked Taylor linear attention, ``taylor`` and
   ``taylor_symmetric``; windowed softmax, window 129 and full causal) on random inputs, forward
   and gradients (and the final state), float32 and bfloat16, with and without an initial state,
   ``T`` not a multiple of the block, against the XLA reference run at ``highest`` matmul
   precision. Tolerances: float32 1e-5 relative, bfloat16 2e-2 (max abs error / max abs value).
   If a check fails the timings are skipped and the exit status is 1.
2. Timings: forward and forward+backward (a VJP with a random cotangent) for
   ``B=8, H=16, T in {2k, 8k, 16k}, F=16, Dv in {64, 112}``, bfloat16:
   - linear attention: the Pallas kernel (both feature maps), the XLA chunked ``lax.scan``, and
     flash-linear-attention's Triton ``fused_chunk_based`` / ``parallel_based`` when PyTorch
     and ``fla`` are installed (CUDA events);
   - window attention (129 keys, head dim = Dv): the Pallas kernel, the XLA blocked reference
     and ``jax.nn.dot_product_attention(implementation="cudnn", local_window_size=(128, 0))``;
   - at ``T = 8k, Dv = 64`` a sweep of the GPU kernel's chunk size (16, 32, 64) and of 4 vs 8
     warps at chunk 16.
   Each timing compiles outside the timed region, runs one warm-up and reports the median of
   ``--repeats`` calls; a time budget (``--time_budget``) skips what would not fit.
3. Roofline: the peak bfloat16 matmul rate and the memory bandwidth are *measured* at start
   (an 8192^3 matmul, a 4 GiB elementwise pass); each timing reports achieved TFLOP/s, GB/s and
   the fraction of ``max(flops / peak_flops, bytes / peak_bandwidth)`` it reaches. FLOP and byte
   models are in :func:`linear_attention_cost` and :func:`window_attention_cost`.

Output: a markdown table on stdout and JSON (machine, date, peaks, checks, timings) at
``--output``. ``--quick`` is a smoke run for CPU (kernels in interpret mode, tiny shapes, about a
minute); its numbers say nothing about accelerator speed.

Usage (repository root)::

    bash benchmarks/gpu_check.sh                 # on a GPU (or TPU) machine, < 8 minutes
    python benchmarks/kernels.py --quick         # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxbased.ops import (
    LinearAttentionState,
    expanded_dim,
    sliding_window_attention,
)
from jaxbased.ops import linear_attention as xla_linear_attention
from pallas_kernels.linear_attention import DEFAULT_CHUNK_SIZE
from pallas_kernels.linear_attention import linear_attention as pallas_linear_attention
from pallas_kernels.window_attention import window_attention as pallas_window_attention

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
GPU_PLATFORMS = {"gpu", "cuda", "rocm"}


@dataclasses.dataclass
class Settings:
    quick: bool
    platform: str
    interpret: bool
    batch: int
    heads: int
    seq_lens: list[int]
    value_dims: list[int]
    feature_dim: int
    window: int
    repeats: int
    time_budget: float
    started: float
    save: Callable[[], None] = lambda: None  # writes the JSON so far (called after each row)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def relative_error(actual, expected) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def random_arrays(seed: int, shapes: list[tuple[int, ...]], dtype) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [
        jax.random.normal(key, shape, jnp.float32).astype(dtype)
        for key, shape in zip(keys, shapes, strict=True)
    ]


def time_call(function: Callable, arguments: tuple, repeats: int) -> dict[str, Any]:
    """Compile (untimed), warm up once, then the median wall time of ``repeats`` calls."""
    start = time.perf_counter()
    compiled = jax.jit(function).lower(*arguments).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(*arguments))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*arguments))
        times.append(time.perf_counter() - start)
    return {
        "ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "compile_s": compile_seconds,
    }


def forward_backward(function: Callable, cotangent: jax.Array) -> Callable:
    """``(q, k, v) -> (dq, dk, dv)`` of ``function`` for a fixed output cotangent."""

    def run(q, k, v):
        _, pullback = jax.vjp(function, q, k, v)
        return pullback(cotangent.astype(q.dtype))

    return run


# ---------------------------------------------------------------------------------------------
# Cost models (for the roofline)
# ---------------------------------------------------------------------------------------------
def linear_attention_cost(batch, heads, seq, feature_dim, value_dim, chunk, itemsize):
    """FLOPs and HBM bytes of chunked Taylor linear attention (kernel algorithm, no padding).

    The useful work: the symmetric expansion ``D' = 1 + F + F (F + 1) / 2`` (153 for F = 16),
    which the kernels compute for both feature maps; the XLA ``taylor`` path does the 273-feature
    work for the same result and is held to the same count.

    Forward FLOPs per token: ``2 (C F + C Dv + 2 D' Dv)`` (intra-chunk ``q k^T`` and ``A v`` on
    full ``C x C`` tiles, state read ``phi(q) S`` and update ``phi(k)^T v``). Backward: twice
    the forward (each matmul has two gradient matmuls), so forward+backward = 3x forward.
    Bytes: read q, k, v and write y (forward); read q, k, v, y, dy twice and write dq, dk, dv
    (backward). Expanded features and states never touch HBM.
    """
    expanded = expanded_dim("taylor_symmetric", feature_dim)
    tokens = batch * heads * seq
    forward_flops = (
        2 * tokens * (chunk * feature_dim + chunk * value_dim + 2 * expanded * value_dim)
    )
    forward_bytes = tokens * (2 * feature_dim + 2 * value_dim) * itemsize + tokens * 4
    backward_bytes = (
        tokens * itemsize * (2 * (2 * feature_dim + 3 * value_dim) + 2 * feature_dim + value_dim)
    )
    return {
        "forward": (forward_flops, forward_bytes),
        "forward_backward": (3 * forward_flops, forward_bytes + backward_bytes),
    }


def window_attention_cost(batch, heads, seq, head_dim, window, itemsize):
    """FLOPs and bytes of causal windowed attention counting only visible (query, key) pairs.

    Pairs ``P = sum_i min(window, i + 1)``; forward ``4 P D`` (``q k^T`` and ``p v``),
    forward+backward ``3.5x`` that (FlashAttention-2 convention). Bytes: q, k, v, o (forward);
    plus q, k, v, o, do read and dq, dk, dv written (backward).
    """
    positions = np.arange(seq)
    pairs = int(np.minimum(window if window else seq, positions + 1).sum())
    forward_flops = 4 * batch * heads * pairs * head_dim
    tokens = batch * heads * seq
    forward_bytes = tokens * 4 * head_dim * itemsize + tokens * 4
    backward_bytes = tokens * 8 * head_dim * itemsize
    return {
        "forward": (forward_flops, forward_bytes),
        "forward_backward": (int(3.5 * forward_flops), forward_bytes + backward_bytes),
    }


def measure_peaks(quick: bool) -> dict[str, float]:
    """Measured peak bfloat16 matmul FLOP/s and memory bandwidth (bytes/s) of device 0."""
    size = 1024 if quick else 8192
    a, b = random_arrays(0, [(size, size), (size, size)], jnp.bfloat16)
    matmul = time_call(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32), (a, b), 5)
    flops = 2 * size**3 / (matmul["min_ms"] / 1e3)
    elements = (1 << 24) if quick else (1 << 31)  # 32 MiB / 4 GiB of bfloat16
    (x,) = random_arrays(1, [(elements,)], jnp.bfloat16)
    copy = time_call(lambda x: x * 2, (x,), 5)
    bandwidth = 2 * elements * 2 / (copy["min_ms"] / 1e3)  # read + write
    del a, b, x
    return {"bf16_matmul_flops": flops, "memory_bytes_per_s": bandwidth}


def roofline_fields(flops, bytes_moved, milliseconds, peaks) -> dict[str, float]:
    seconds = milliseconds / 1e3
    bound = max(flops / peaks["bf16_matmul_flops"], bytes_moved / peaks["memory_bytes_per_s"])
    return {
        "tflops": flops / seconds / 1e12,
        "gb_per_s": bytes_moved / seconds / 1e9,
        "roofline_fraction": bound / seconds,
        "bound": "compute"
        if flops / peaks["bf16_matmul_flops"] >= bytes_moved / peaks["memory_bytes_per_s"]
        else "memory",
    }


# ---------------------------------------------------------------------------------------------
# The implementations under test
# ---------------------------------------------------------------------------------------------
def pallas_linear(
    settings: Settings, feature_map="taylor", chunk_size=None, initial_state=None, num_warps=None
):
    def run(q, k, v):
        return pallas_linear_attention(
            q,
            k,
            v,
            initial_state,
            feature_map=feature_map,
            chunk_size=chunk_size,
            interpret=settings.interpret,
            num_warps=num_warps,
        )[0]

    return run


def reference_linear(feature_map="taylor", chunk_size=64, initial_state=None):
    state = None if initial_state is None else LinearAttentionState(*initial_state)

    def run(q, k, v):
        return xla_linear_attention(
            q,
            k,
            v,
            feature_map=feature_map,
            chunk_size=chunk_size,
            initial_state=state,
            implementation="xla",
        )

    return run


def pallas_window(settings: Settings, window, block_size=None):
    def run(q, k, v):
        return pallas_window_attention(
            q, k, v, window=window, block_size=block_size, interpret=settings.interpret
        )

    return run


def reference_window(window):
    def run(q, k, v):
        return sliding_window_attention(q, k, v, window=window, implementation="xla")

    return run


def cudnn_window(window):
    def run(q, k, v):
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=local, implementation="cudnn"
        )

    return run


# ---------------------------------------------------------------------------------------------
# 1. Correctness
# ---------------------------------------------------------------------------------------------
def check(name: str, pairs: list[tuple[str, Any, Any]], dtype: str) -> dict[str, Any]:
    errors = {label: relative_error(got, want) for label, got, want in pairs}
    worst = max(errors.values())
    passed = bool(np.isfinite(worst) and worst <= TOLERANCE[dtype])
    status = "PASS" if passed else "FAIL"
    print(f"  {status} {name:<58} worst rel. error {worst:.2e} (tol {TOLERANCE[dtype]:.0e})")
    return {"name": name, "dtype": dtype, "errors": errors, "passed": passed}


def check_linear(
    settings: Settings, shapes, feature_map, dtype_name, with_state, with_decay=False
) -> dict:
    batch, seq, heads, feature_dim, value_dim = shapes
    dtype = jnp.dtype(dtype_name)
    q, k, v, cotangent = random_arrays(
        2,
        [(batch, seq, heads, feature_dim)] * 2 + [(batch, seq, heads, value_dim)] * 2,
        jnp.float32,
    )
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    initial = None
    if with_state:
        expanded = expanded_dim(feature_map, feature_dim)
        kv_state, k_state = random_arrays(
            3, [(batch, heads, expanded, value_dim), (batch, heads, expanded)], jnp.float32
        )
        initial = (0.1 * kv_state, jnp.abs(k_state))
    log_decay = None  # a decay per step and head, a in [0.9, 1]
    if with_decay:
        (uniform,) = random_arrays(5, [(batch, seq, heads)], jnp.float32)
        log_decay = jnp.log(1.0 - 0.1 * jax.nn.sigmoid(uniform))

    def kernel(q, k, v, initial, log_decay):
        return pallas_linear_attention(
            q,
            k,
            v,
            initial,
            log_decay=log_decay,
            feature_map=feature_map,
            interpret=settings.interpret,
        )

    def reference(q, k, v, initial, log_decay):
        state = None if initial is None else LinearAttentionState(*initial)
        y, final = xla_linear_attention(
            q,
            k,
            v,
            feature_map=feature_map,
            initial_state=state,
            return_state=True,
            implementation="xla",
            log_decay=log_decay,
        )
        return y, (final.kv_state, final.k_state)

    argnums = [0, 1, 2] + ([3] if initial is not None else []) + ([4] if with_decay else [])

    def gradients(function):
        def loss(q, k, v, initial, log_decay):
            y, (kv_state, k_state) = function(q, k, v, initial, log_decay)
            return (
                jnp.sum(y.astype(jnp.float32) * cotangent)
                + 1e-3 * jnp.sum(kv_state)
                + 1e-3 * jnp.sum(k_state)
            )

        return jax.jit(jax.grad(loss, argnums=tuple(argnums)))(q, k, v, initial, log_decay)

    with jax.default_matmul_precision("highest"):
        want_y, want_state = jax.jit(reference)(q, k, v, initial, log_decay)
        want_grads = gradients(reference)
    got_y, got_state = jax.jit(kernel)(q, k, v, initial, log_decay)
    got_grads = gradients(kernel)
    names = ["dq", "dk", "dv"] + (["d_kv_state0", "d_k_state0"] if initial is not None else [])
    names += ["d_log_decay"] if with_decay else []
    pairs = [
        ("y", got_y, want_y),
        ("kv_state", got_state[0], want_state[0]),
        ("k_state", got_state[1], want_state[1]),
    ]
    pairs += [
        (names[i], got, want)
        for i, (got, want) in enumerate(
            zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True)
        )
    ]
    label = (
        f"linear {feature_map} T={seq} F={feature_dim} Dv={value_dim} "
        f"{'state' if with_state else 'no state'}{' decay' if with_decay else ''}"
    )
    return check(label, pairs, dtype_name)


def check_window(settings: Settings, shapes, window, dtype_name) -> dict:
    batch, seq, heads, head_dim = shapes
    dtype = jnp.dtype(dtype_name)
    q, k, v, cotangent = random_arrays(4, [(batch, seq, heads, head_dim)] * 4, jnp.float32)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    kernel, reference = pallas_window(settings, window), reference_window(window)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(reference)(q, k, v)
        want_grads = jax.jit(forward_backward(reference, cotangent))(q, k, v)
    got = jax.jit(kernel)(q, k, v)
    got_grads = jax.jit(forward_backward(kernel, cotangent))(q, k, v)
    pairs = [("o", got, want)] + [
        (name, g, w) for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads, strict=True)
    ]
    return check(f"window {window} T={seq} D={head_dim}", pairs, dtype_name)


def check_cudnn_window(shapes, window) -> dict:
    """The peer's window semantics equal ours (so that the timings compare the same function)."""
    q, k, v = random_arrays(7, [shapes] * 3, jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(reference_window(window))(q, k, v)
    got = jax.jit(cudnn_window(window))(q, k, v)
    result = check(
        f"peer: cudnn window {window} T={shapes[1]} D={shapes[-1]}", [("o", got, want)], "bfloat16"
    )
    return result | {"peer": True}


def run_checks(settings: Settings) -> list[dict]:
    print("\n## Correctness (Pallas kernel vs XLA reference at highest precision)\n")
    if settings.quick:
        batch, seq, heads = 1, 70, 2
    else:
        batch, seq, heads = 2, 1000, 4
    results = []
    for value_dim in settings.value_dims:
        for dtype in ("float32", "bfloat16"):
            for feature_map in ("taylor", "taylor_symmetric"):
                for with_state in (False, True):
                    if (settings.quick or value_dim != settings.value_dims[0]) and (
                        feature_map == "taylor_symmetric" or with_state != (dtype == "float32")
                    ):
                        continue  # the other combinations once, at the first value dim
                    shapes = (batch, seq, heads, settings.feature_dim, value_dim)
                    results.append(
                        _guarded(check_linear, settings, shapes, feature_map, dtype, with_state)
                    )
            if value_dim == settings.value_dims[0]:  # with a decay per step and head
                shapes = (batch, seq, heads, settings.feature_dim, value_dim)
                results.append(
                    _guarded(check_linear, settings, shapes, "taylor", dtype, True, True)
                )
            for window in (settings.window, None):
                if window is None and value_dim != settings.value_dims[0]:
                    continue
                results.append(
                    _guarded(check_window, settings, (batch, seq, heads, value_dim), window, dtype)
                )
        if settings.platform in GPU_PLATFORMS:
            shapes = (batch, seq, heads, value_dim)
            results.append(_guarded(check_cudnn_window, shapes, settings.window) | {"peer": True})
    return results


def _guarded(function, *args) -> dict:
    try:
        return function(*args)
    except Exception as error:  # a crash is a failed check, reported with its reason
        traceback.print_exc()
        name = f"{function.__name__}{args[1:]}"
        print(f"  FAIL {name}: {type(error).__name__}: {error}")
        return {"name": name, "passed": False, "error": f"{type(error).__name__}: {error}"}


# ---------------------------------------------------------------------------------------------
# 2. Timings
# ---------------------------------------------------------------------------------------------
def out_of_time(settings: Settings) -> bool:
    return time.perf_counter() - settings.started > settings.time_budget


def time_jax(settings, rows, peaks, label, implementation, function, arguments, cost, meta):
    cotangent = random_arrays(9, [arguments[2].shape], jnp.float32)[0]
    for mode, fn in (
        ("forward", function),
        ("forward_backward", forward_backward(function, cotangent)),
    ):
        row = {"kernel": label, "implementation": implementation, "pass": mode, **meta}
        if out_of_time(settings):
            row["skipped"] = "time budget"
            rows.append(row)
            settings.save()
            continue
        try:
            row.update(time_call(fn, arguments, settings.repeats))
            row.update(roofline_fields(*cost[mode], row["ms"], peaks))
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows.append(row)
        settings.save()
        print_row(row)


def time_fla(settings, rows, peaks, shapes, cost, meta):
    """flash-linear-attention's Triton Based kernels (PyTorch), when installed."""
    try:
        import torch
        from fla.ops.based import fused_chunk_based, parallel_based
    except Exception as error:
        rows.append(
            {
                "kernel": "linear",
                "implementation": "fla",
                **meta,
                "skipped": f"fla not available: {error}",
            }
        )
        return
    if not torch.cuda.is_available():
        rows.append(
            {"kernel": "linear", "implementation": "fla", **meta, "skipped": "no CUDA for PyTorch"}
        )
        return
    batch, seq, heads, feature_dim, value_dim = shapes
    for name, function in (
        ("fla fused_chunk_based", fused_chunk_based),
        ("fla parallel_based", parallel_based),
    ):
        for mode in ("forward", "forward_backward"):
            row = {"kernel": "linear", "implementation": name, "pass": mode, **meta}
            if out_of_time(settings):
                row["skipped"] = "time budget"
                rows.append(row)
                settings.save()
                continue
            try:
                generator = torch.Generator(device="cuda").manual_seed(0)

                def tensor(last, grad, generator=generator):
                    x = torch.randn(
                        batch,
                        seq,
                        heads,
                        last,
                        device="cuda",
                        dtype=torch.bfloat16,
                        generator=generator,
                    )
                    return x.requires_grad_(grad)

                grad = mode == "forward_backward"
                q, k, v = (
                    tensor(feature_dim, grad),
                    tensor(feature_dim, grad),
                    tensor(value_dim, grad),
                )
                cotangent = tensor(value_dim, False)

                def call(function=function, q=q, k=k, v=v, grad=grad, cotangent=cotangent):
                    out = function(q, k, v)  # [B, T, H, Dv] (head_first=False, the default)
                    if grad:
                        out.backward(cotangent)
                    return out

                call()
                torch.cuda.synchronize()
                times = []
                for _ in range(settings.repeats):
                    start, end = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    start.record()
                    call()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                row["ms"] = statistics.median(times)
                row["min_ms"] = min(times)
                row.update(roofline_fields(*cost[mode], row["ms"], peaks))
                del q, k, v, cotangent
                torch.cuda.empty_cache()
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            rows.append(row)
            settings.save()
            print_row(row)


TABLE_HEADER = (
    "| kernel | implementation | pass | T | Dv | ms | TFLOP/s | GB/s | roofline |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def print_row(row: dict) -> None:
    head = f"| {row['kernel']} | {row['implementation']} | {row.get('pass', '')} | {row['T']} "
    if "ms" in row:
        print(
            f"{head}| {row['Dv']} | {row['ms']:.3f} | {row['tflops']:.2f} | {row['gb_per_s']:.1f} "
            f"| {100 * row['roofline_fraction']:.1f}% ({row['bound']}) |",
            flush=True,
        )
    else:
        reason = row.get("error") or row.get("skipped")
        print(f"{head}| {row['Dv']} | {reason} | | | |", flush=True)


def run_timings(settings: Settings, peaks: dict, rows: list[dict]) -> list[dict]:
    """Append one row per timing to ``rows`` (saved as it grows) and return it."""
    print("\n## Timings (bfloat16; median ms)\n")
    print(TABLE_HEADER)
    dtype = jnp.bfloat16
    itemsize = 2
    on_gpu = settings.platform in GPU_PLATFORMS
    batch, heads, feature_dim = settings.batch, settings.heads, settings.feature_dim
    for seq in settings.seq_lens:
        for value_dim in settings.value_dims:
            meta = {
                "B": batch,
                "H": heads,
                "T": seq,
                "F": feature_dim,
                "Dv": value_dim,
                "dtype": "bfloat16",
            }
            q, k, v = random_arrays(
                5, [(batch, seq, heads, feature_dim)] * 2 + [(batch, seq, heads, value_dim)], dtype
            )
            # One timing: both feature maps run the same (symmetric) kernel.
            chunk = DEFAULT_CHUNK_SIZE["gpu" if on_gpu else "tpu"]
            cost = linear_attention_cost(batch, heads, seq, feature_dim, value_dim, chunk, itemsize)
            time_jax(
                settings,
                rows,
                peaks,
                "linear",
                "pallas",
                pallas_linear(settings, "taylor"),
                (q, k, v),
                cost,
                {**meta, "chunk": chunk},
            )
            cost = linear_attention_cost(batch, heads, seq, feature_dim, value_dim, 64, itemsize)
            time_jax(
                settings,
                rows,
                peaks,
                "linear",
                "xla chunked (C=64)",
                reference_linear(),
                (q, k, v),
                cost,
                {**meta, "chunk": 64},
            )
            if on_gpu:
                time_fla(
                    settings, rows, peaks, (batch, seq, heads, feature_dim, value_dim), cost, meta
                )
            if on_gpu and seq == 8192 and value_dim == 64:
                # chunk sizes; 8 warps at chunk 16 (4 spill: benchmarks/compile_kernels.py)
                for chunk, warps in ((32, None), (64, None), (16, 8)):
                    cost = linear_attention_cost(
                        batch, heads, seq, feature_dim, value_dim, chunk, itemsize
                    )
                    time_jax(
                        settings,
                        rows,
                        peaks,
                        "linear",
                        f"pallas C={chunk}" + (f" warps={warps}" if warps else ""),
                        pallas_linear(settings, "taylor", chunk, num_warps=warps),
                        (q, k, v),
                        cost,
                        {**meta, "chunk": chunk, "num_warps": warps},
                    )
            del q, k, v
            # Window attention: head dim = Dv, 129 keys.
            q, k, v = random_arrays(6, [(batch, seq, heads, value_dim)] * 3, dtype)
            cost = window_attention_cost(batch, heads, seq, value_dim, settings.window, itemsize)
            window_meta = {**meta, "window": settings.window}
            time_jax(
                settings,
                rows,
                peaks,
                "window",
                "pallas",
                pallas_window(settings, settings.window),
                (q, k, v),
                cost,
                window_meta,
            )
            time_jax(
                settings,
                rows,
                peaks,
                "window",
                "xla blocked",
                reference_window(settings.window),
                (q, k, v),
                cost,
                window_meta,
            )
            if on_gpu:
                time_jax(
                    settings,
                    rows,
                    peaks,
                    "window",
                    "cudnn dot_product_attention",
                    cudnn_window(settings.window),
                    (q, k, v),
                    cost,
                    window_meta,
                )
            del q, k, v
    return rows


# ---------------------------------------------------------------------------------------------
def machine_info(settings: Settings) -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "platform": settings.platform,
        "device_kind": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "interpret": settings.interpret,
    }


def write_json(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(payload, handle, indent=1)
        temporary = handle.name
    os.replace(temporary, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CPU smoke run (interpret mode, tiny shapes)"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON path (default: benchmarks/results/kernels.json, or a temp file with --quick)",
    )
    parser.add_argument("--seq_lens", default="2048,8192,16384")
    parser.add_argument("--value_dims", default="64,112")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--time_budget", type=float, default=420.0, help="seconds; later timings are skipped"
    )
    parser.add_argument("--skip_checks", action="store_true", help="time even if a check fails")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    platform_name = jax.default_backend()
    accelerator = platform_name in GPU_PLATFORMS or platform_name == "tpu"
    if not accelerator and not args.quick:
        print(f"No GPU/TPU (platform {platform_name!r}): running the --quick smoke path instead.")
        args.quick = True
    if args.quick:
        settings = Settings(
            True,
            platform_name,
            not accelerator,
            1,
            2,
            [256],
            [64],
            16,
            129,
            2,
            300.0,
            time.perf_counter(),
        )
    else:
        settings = Settings(
            False,
            platform_name,
            False,
            args.batch,
            args.heads,
            [int(x) for x in args.seq_lens.split(",")],
            [int(x) for x in args.value_dims.split(",")],
            16,
            129,
            args.repeats,
            args.time_budget,
            time.perf_counter(),
        )
    output = args.output or (
        os.path.join(tempfile.gettempdir(), "jaxbased_kernels_quick.json")
        if args.quick
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.json")
    )
    info = machine_info(settings)
    print(
        f"# Pallas kernel check — {info['device_kind']} ({info['platform']}), "
        f"JAX {info['jax']}, {info['date']}"
    )
    if settings.interpret:
        print(
            "(interpret mode: correctness smoke run; timings measure the interpreter, not a kernel)"
        )

    payload: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "machine": info,
        "settings": {
            key: value
            for key, value in dataclasses.asdict(settings).items()
            if key not in ("started", "save")
        },
        "peaks": None,
        "checks": [],
        "timings": [],
        "elapsed_s": 0.0,
    }

    def save() -> None:
        payload["elapsed_s"] = time.perf_counter() - settings.started
        write_json(output, payload)

    settings.save = save
    payload["checks"] = run_checks(settings)
    save()
    all_passed = all(result["passed"] for result in payload["checks"] if not result.get("peer"))
    peaks = measure_peaks(settings.quick)
    payload["peaks"] = peaks
    print(
        f"\nMeasured peaks: bf16 matmul {peaks['bf16_matmul_flops'] / 1e12:.1f} TFLOP/s, "
        f"memory {peaks['memory_bytes_per_s'] / 1e9:.0f} GB/s"
    )
    if all_passed or args.skip_checks:
        run_timings(settings, peaks, payload["timings"])
    else:
        print("\nA correctness check failed: timings skipped (pass --skip_checks to time anyway).")
    save()
    print(f"\nJSON written to {output} ({payload['elapsed_s']:.0f} s)")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
