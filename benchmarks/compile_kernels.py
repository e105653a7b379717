"""Compile every Pallas kernel for the real hardware on a CPU host, GPU and TPU, and report.

The cases and the compilers are :mod:`pallas_kernels.compile_check` (which its docstring
explains); this is the command line that compiles them all, prints tables and writes a JSON
report. Timings still need the hardware (``benchmarks/gpu_check.sh``).
``tests/test_pallas_compile.py`` asserts every case compiles within the limits.

Usage (repository root; needs the test extra's ``triton`` and libtpu, Linux x86_64)::

    .venv/bin/python benchmarks/compile_kernels.py --install_libtpu   # once (make install does)
    .venv/bin/python benchmarks/compile_kernels.py
    # prints tables, writes benchmarks/results/compile_kernels.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from pallas_kernels.compile_check import (
    GPU_CASES,
    LIBTPU_DIR,
    SHARED_MEMORY_PER_BLOCK,
    TPU_CASES,
    TPU_TOPOLOGIES,
    check,
    compile_for_cuda,
    compile_for_tpu,
    install_libtpu,
    libtpu_path,
    libtpu_requirement,
    triton_kernels,
)


def _gpu_report(arch: int) -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    print(f"## GPU kernels compiled for sm_{arch} (triton)\n")
    print("| case | kernel | warps | stages | shared KiB | registers | stack B |")
    print("|---|---|---|---|---|---|---|")
    for case in GPU_CASES:
        for kernel in triton_kernels(case.function, *case.args):
            report = compile_for_cuda(kernel, arch=arch)
            problems += check(report, arch)
            rows.append({"case": case.name, **dataclasses.asdict(report)})
            print(
                f"| {case.name} | {report.name} | {report.num_warps} | {report.num_stages} | "
                f"{report.shared_bytes / 1024:.1f} | {report.registers} | {report.stack_bytes} |",
                flush=True,
            )
    return rows, problems


def _tpu_report() -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    generations = list(TPU_TOPOLOGIES)
    print("\n## TPU kernels compiled by libtpu (seconds, or the error)\n")
    print(f"| case | {' | '.join(generations)} |")
    print(f"|---|{'---|' * len(generations)}")
    for case in TPU_CASES:
        cells = []
        for generation in generations:
            try:
                seconds = compile_for_tpu(case, generation)
            except Exception as error:  # reported, and the exit status is 1
                problems.append(f"{case.name} on {generation}: {type(error).__name__}: {error}")
                rows.append({"case": case.name, "generation": generation, "error": str(error)})
                cells.append("FAILED")
            else:
                rows.append({"case": case.name, "generation": generation, "seconds": seconds})
                cells.append(f"ok ({seconds:.1f} s)")
        print(f"| {case.name} | {' | '.join(cells)} |", flush=True)
    return rows, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_PER_BLOCK))
    parser.add_argument("--backends", default="gpu,tpu", help="comma-separated: gpu, tpu")
    parser.add_argument(
        "--install_libtpu",
        action="store_true",
        help=f"only install the libtpu matching jax into {LIBTPU_DIR} (Linux x86_64), then exit",
    )
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(__file__), "results", "compile_kernels.json"),
    )
    arguments = parser.parse_args()
    if arguments.install_libtpu:
        if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
            print(f"libtpu has wheels for Linux x86_64 only; not installed on {platform.system()}")
            return 0
        print(f"libtpu installed: {install_libtpu()}")
        return 0
    backends = arguments.backends.split(",")
    if not set(backends) <= {"gpu", "tpu"}:
        parser.error(f"--backends={arguments.backends!r}: allowed gpu, tpu")
    result: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "jax": jax.__version__,
    }
    problems: list[str] = []
    if "gpu" in backends:
        import triton

        rows, gpu_problems = _gpu_report(arguments.arch)
        problems += gpu_problems
        result["gpu"] = {
            "arch": f"sm_{arguments.arch}",
            "triton": triton.__version__,
            "shared_memory_per_block": SHARED_MEMORY_PER_BLOCK[arguments.arch],
            "kernels": rows,
        }
    if "tpu" in backends:
        rows, tpu_problems = _tpu_report()
        problems += tpu_problems
        from importlib.metadata import distributions

        versions = [d.version for d in distributions(path=[LIBTPU_DIR]) if d.name == "libtpu"]
        result["tpu"] = {
            "libtpu": libtpu_path(),
            "libtpu_version": versions[0] if versions else None,
            "requirement": libtpu_requirement(),
            "topologies": TPU_TOPOLOGIES,
            "cases": rows,
        }
    result["problems"] = problems
    os.makedirs(os.path.dirname(os.path.abspath(arguments.output)), exist_ok=True)
    temporary = f"{arguments.output}.tmp"
    with open(temporary, "w") as file:
        json.dump(result, file, indent=1)
    os.replace(temporary, arguments.output)
    for problem in problems:
        print(f"FAILED: {problem}")
    print(f"wrote {arguments.output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
