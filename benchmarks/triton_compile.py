"""Compile the GPU (Triton) kernels for Hopper on a CPU host and report what each one uses.

``jax.export`` for CUDA runs Pallas' lowering to Triton IR on any host, but the rest (Triton's
passes, PTX, ``ptxas``) happens inside XLA on a GPU machine, so a kernel that needs more shared
memory than a block may have, or that Triton cannot compile, would only fail there. This script
takes each kernel's Triton IR out of the exported module (the ``__gpu$xla.gpu.triton`` custom
calls, with the kernel's ``num_warps`` and ``num_stages``) and compiles it with the ``triton``
package for ``sm_90`` (H100/H200), then reports per kernel: shared memory per block, registers per
thread and stack bytes per thread (spills and local arrays; ``cuobjdump``'s ``STACK``).

The ``triton`` wheel pins its own Triton, not the one inside jaxlib's XLA, so the numbers are
close to, not exactly, what XLA builds; timings need the GPU (``benchmarks/gpu_check.sh``).
``tests/test_pallas_gpu_compile.py`` asserts every case below compiles within the limits.

Usage (repository root; needs ``pip install triton``, Linux x86_64)::

    .venv/bin/python benchmarks/triton_compile.py
    # prints a table, writes benchmarks/results/triton_compile_sm90.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.linear_attention import linear_attention as pallas_linear_attention
from pallas_kernels.window_attention import window_attention as pallas_window_attention

TRITON_CALL_TARGET = "__gpu$xla.gpu.triton"
#: Dynamic shared memory one block may use on sm_90 (H100/H200): 227 KiB.
SHARED_MEMORY_PER_BLOCK = {90: 227 * 1024}
#: Registers one thread may use on every CUDA GPU since Kepler.
REGISTERS_PER_THREAD = 255


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Pallas GPU kernel as XLA receives it: its name, Triton IR (MLIR text) and launch
    parameters."""

    name: str
    ir: str
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What a kernel compiled for ``arch`` uses (bytes per block, registers and bytes per
    thread)."""

    name: str
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    stack_bytes: int


def triton_kernels(function: Callable, *args: jax.ShapeDtypeStruct) -> list[TritonKernel]:
    """Export ``jax.jit(function)(*args)`` for CUDA and return its Pallas kernels, in order.

    Uses jaxlib's MLIR bindings and Triton dialect (``jax._src``; a changed internal raises here
    rather than skipping a check).
    """
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as triton_dialect

    exported = jax.export.export(
        jax.jit(function),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)],
    )(*args)
    context = mlir.make_ir_context()
    triton_dialect.register_dialect(context)
    kernels: list[TritonKernel] = []
    with context:
        module = ir.Module.parse(exported.mlir_module())
        for operation in _walk(module.operation):
            if operation.name != "stablehlo.custom_call":
                continue
            target = ir.StringAttr(operation.attributes["call_target_name"]).value
            if target != TRITON_CALL_TARGET:
                continue
            config = ir.DictAttr(operation.attributes["mhlo.backend_config"])
            kernel_module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
            kernels.append(
                TritonKernel(
                    name=ir.StringAttr(config["name"]).value,
                    ir=kernel_module.operation.get_asm(enable_debug_info=False),
                    num_warps=ir.IntegerAttr(config["num_warps"]).value,
                    num_stages=ir.IntegerAttr(config["num_stages"]).value,
                )
            )
    if not kernels:
        raise ValueError(f"no {TRITON_CALL_TARGET} custom call in the exported module")
    return kernels


def _walk(operation):
    yield operation
    for region in operation.regions:
        for block in region:
            for inner in block:
                yield from _walk(inner.operation)


def compile_for_cuda(kernel: TritonKernel, arch: int = 90) -> CompileReport:
    """Compile ``kernel`` with the ``triton`` package for ``sm_<arch>`` and read its resources.

    Raises whatever Triton raises when the IR does not compile.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # XLA's Triton fuses multiply-adds
    with tempfile.TemporaryDirectory() as directory:
        source = os.path.join(directory, f"{kernel.name}.ttir")
        with open(source, "w") as file:
            file.write(kernel.ir)
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages},
        )
        cubin = os.path.join(directory, "kernel.cubin")
        with open(cubin, "wb") as file:
            file.write(compiled.asm["cubin"])
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        usage = subprocess.run(
            [os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if match is None:
        raise ValueError(f"cuobjdump printed no resource usage for {kernel.name}: {usage!r}")
    return CompileReport(
        name=kernel.name,
        num_warps=kernel.num_warps,
        num_stages=kernel.num_stages,
        shared_bytes=int(compiled.metadata.shared),
        registers=int(match.group(1)),
        stack_bytes=int(match.group(2)),
    )


# The cases: forward + backward of each op at the shapes the models and gpu_check use. ----------
@dataclasses.dataclass(frozen=True)
class Case:
    """A differentiated op call whose kernels (forward and backward) are compiled."""

    name: str
    function: Callable
    args: tuple[jax.ShapeDtypeStruct, ...]


def _linear_case(
    feature_map="taylor", feature_dim=16, value_dim=64, dtype=jnp.bfloat16, decay=False, chunk=None
) -> Case:
    shape = (1, 300, 2)
    q = jax.ShapeDtypeStruct((*shape, feature_dim), dtype)
    v = jax.ShapeDtypeStruct((*shape, value_dim), dtype)
    log_decay = jax.ShapeDtypeStruct(shape, jnp.float32)

    def gradients(q, k, v, log_decay):
        def loss(q, k, v, log_decay):
            y, (kv_state, _) = pallas_linear_attention(
                q,
                k,
                v,
                log_decay=log_decay if decay else None,
                feature_map=feature_map,
                chunk_size=chunk,
                backend="gpu",
            )
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(kv_state)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, log_decay)

    name = (
        f"linear {feature_map} F={feature_dim} Dv={value_dim} {jnp.dtype(dtype).name}"
        + (" decay" if decay else "")
        + (f" chunk={chunk}" if chunk else "")
    )
    return Case(name, gradients, (q, q, v, log_decay))


def _window_case(head_dim=64, window=129, dtype=jnp.bfloat16, block_size=None) -> Case:
    q = jax.ShapeDtypeStruct((1, 300, 2, head_dim), dtype)

    def gradients(q, k, v):
        def loss(q, k, v):
            out = pallas_window_attention(
                q, k, v, window=window, block_size=block_size, backend="gpu"
            )
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    name = f"window {window} D={head_dim} {jnp.dtype(dtype).name}" + (
        f" block={block_size}" if block_size else ""
    )
    return Case(name, gradients, (q, q, q))


CASES: tuple[Case, ...] = (
    *(_linear_case(feature_dim=feature_dim) for feature_dim in (8, 16, 24, 32)),
    _linear_case(value_dim=112),
    _linear_case(feature_map="taylor_symmetric"),
    _linear_case(dtype=jnp.float32),
    _linear_case(feature_dim=32, value_dim=112, dtype=jnp.float32),
    _linear_case(decay=True),
    *(_linear_case(chunk=chunk) for chunk in (32, 64)),
    *(_window_case(head_dim=head_dim) for head_dim in (64, 112, 128)),
    _window_case(window=None),
    _window_case(dtype=jnp.float32),
    _window_case(head_dim=128, block_size=128),
)


def check(report: CompileReport, arch: int = 90) -> list[str]:
    """The limits ``report`` breaks on ``sm_<arch>`` (empty when it fits)."""
    problems = []
    if report.shared_bytes > SHARED_MEMORY_PER_BLOCK[arch]:
        problems.append(
            f"{report.name}: {report.shared_bytes} bytes of shared memory > "
            f"{SHARED_MEMORY_PER_BLOCK[arch]} per block on sm_{arch}"
        )
    if report.registers > REGISTERS_PER_THREAD:
        problems.append(f"{report.name}: {report.registers} registers > {REGISTERS_PER_THREAD}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_PER_BLOCK))
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(__file__), "results", "triton_compile_sm90.json"),
    )
    arguments = parser.parse_args()
    import triton

    rows, problems = [], []
    print("| case | kernel | warps | stages | shared KiB | registers | stack B |")
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        for kernel in triton_kernels(case.function, *case.args):
            report = compile_for_cuda(kernel, arch=arguments.arch)
            problems += check(report, arguments.arch)
            rows.append({"case": case.name, **dataclasses.asdict(report)})
            print(
                f"| {case.name} | {report.name} | {report.num_warps} | {report.num_stages} | "
                f"{report.shared_bytes / 1024:.1f} | {report.registers} | {report.stack_bytes} |",
                flush=True,
            )
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "arch": f"sm_{arguments.arch}",
        "jax": jax.__version__,
        "triton": triton.__version__,
        "shared_memory_per_block": SHARED_MEMORY_PER_BLOCK[arguments.arch],
        "kernels": rows,
        "problems": problems,
    }
    os.makedirs(os.path.dirname(os.path.abspath(arguments.output)), exist_ok=True)
    temporary = f"{arguments.output}.tmp"
    with open(temporary, "w") as file:
        json.dump(result, file, indent=1)
    os.replace(temporary, arguments.output)
    for problem in problems:
        print(f"OVER THE LIMIT: {problem}")
    print(f"wrote {arguments.output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
