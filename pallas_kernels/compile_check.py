"""Compile the Pallas kernels for the real hardware on a CPU host: the cases and the compilers.

``jax.export`` only runs Pallas' own lowering (to Triton IR for CUDA, to Mosaic for TPU); the
hardware compilers run later, on the accelerator machine, so a kernel that needs more on-chip
memory than the chip has, or that they cannot compile, would only fail there. This module runs
those compilers here:

- GPU: :func:`triton_kernels` takes each kernel's Triton IR out of a ``jax.export`` for CUDA (the
  ``__gpu$xla.gpu.triton`` custom calls, with their ``num_warps``/``num_stages``) and
  :func:`compile_for_cuda` compiles it with the ``triton`` package for ``sm_90`` (H100/H200),
  reporting per kernel the shared memory per block, registers per thread and stack bytes per
  thread (spills and local arrays, ``cuobjdump``'s ``STACK``). The wheel pins its own Triton, not
  the one inside jaxlib's XLA, so the numbers are close to, not exactly, what XLA builds.
- TPU: :func:`compile_for_tpu` compiles the whole differentiated call ahead of time for a TPU
  topology with ``libtpu`` and no TPU attached (``jax.experimental.topologies``), for v4, v5e,
  v5p and v6e; this runs Mosaic's layout passes and the VMEM allocation that ``jax.export`` skips.

:data:`GPU_CASES` and :data:`TPU_CASES` are the op calls checked. ``benchmarks/compile_kernels.py``
is the command line that compiles them all and writes a report; ``tests/test_pallas_compile.py``
asserts every case compiles within the limits. Only JAX and ``pallas_kernels`` are imported (no
``jaxbased``); ``triton`` and libtpu are loaded when first used.

libtpu goes beside the environment's packages (:data:`LIBTPU_DIR`), not among them: with it
importable, JAX would try to start a TPU backend in every process, which on a host without a
TPU prints errors at start-up. Here it is loaded only by :func:`compile_for_tpu`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

# libtpu takes a lock file when it loads (once per machine); several compiling processes may run.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import linear_attention as pallas_linear_attention
from pallas_kernels.selective_scan import selective_scan as pallas_selective_scan
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
#: The kernels of one differentiated call of each op, in the order the call runs them.
ATTENTION_KERNELS = ("forward", "backward_query", "backward_key_value")
SCAN_KERNELS = ("forward", "backward")


@dataclasses.dataclass(frozen=True)
class Case:
    """A differentiated op call whose kernels (forward and backward) are compiled: ``function``
    of arrays shaped as ``args``; ``kernels``: the suffixes of the kernels' names it runs."""

    name: str
    function: Callable
    args: tuple[jax.ShapeDtypeStruct, ...]
    kernels: tuple[str, ...] = ATTENTION_KERNELS


def linear_case(
    backend: str,
    feature_map: str = "taylor",
    feature_dim: int = 16,
    value_dim: int = 64,
    dtype=jnp.bfloat16,
    decay: bool = False,
    chunk: int | None = None,
    normalize: bool = True,
    groups: int | None = None,
) -> Case:
    """Gradients of linear attention (output and final state) through the kernels; ``groups``
    query/key groups for the 2 heads (None: one per head)."""
    shape = (1, 300, 2)
    q = jax.ShapeDtypeStruct((*shape[:2], groups or shape[2], feature_dim), dtype)
    v = jax.ShapeDtypeStruct((*shape, value_dim), dtype)
    log_decay = jax.ShapeDtypeStruct(shape, jnp.float32)

    def gradients(q, k, v, log_decay):
        def loss(q, k, v, log_decay):
            y, (kv_state, _) = pallas_linear_attention(
                q,
                k,
                v,
                log_decay=log_decay if decay else None,
                normalize=normalize,
                feature_map=feature_map,
                chunk_size=chunk,
                backend=backend,
            )
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(kv_state)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, log_decay)

    name = (
        f"linear {feature_map} F={feature_dim} Dv={value_dim} {jnp.dtype(dtype).name}"
        + (" decay" if decay else "")
        + ("" if normalize else " unnormalized")
        + (f" groups={groups}" if groups else "")
        + (f" chunk={chunk}" if chunk else "")
    )
    return Case(name, gradients, (q, q, v, log_decay))


def scan_case(backend: str, state_dim: int = 16, channels: int = 256, dtype=jnp.bfloat16) -> Case:
    """Gradients of the selective scan (output and final state) through the kernels; ``delta``
    and ``a`` float32 as the Mamba layer computes them."""
    u = jax.ShapeDtypeStruct((1, 300, channels), dtype)
    delta = jax.ShapeDtypeStruct((1, 300, channels), jnp.float32)
    a = jax.ShapeDtypeStruct((channels, state_dim), jnp.float32)
    bc = jax.ShapeDtypeStruct((1, 300, state_dim), dtype)

    def gradients(u, delta, a, b, c):
        def loss(u, delta, a, b, c):
            y, state = pallas_selective_scan(u, delta, a, b, c, backend=backend)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(u, delta, a, b, c)

    name = f"selective_scan N={state_dim} D={channels} {jnp.dtype(dtype).name}"
    return Case(name, gradients, (u, delta, a, bc, bc), SCAN_KERNELS)


def window_case(
    backend: str,
    head_dim: int = 64,
    window: int | None = 129,
    dtype=jnp.bfloat16,
    block_size: int | None = None,
) -> Case:
    """Gradients of windowed softmax attention through the kernels."""
    q = jax.ShapeDtypeStruct((1, 300, 2, head_dim), dtype)

    def gradients(q, k, v):
        def loss(q, k, v):
            out = pallas_window_attention(
                q, k, v, window=window, block_size=block_size, backend=backend
            )
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    name = f"window {window} D={head_dim} {jnp.dtype(dtype).name}" + (
        f" block={block_size}" if block_size else ""
    )
    return Case(name, gradients, (q, q, q))


def cases(backend: str) -> tuple[Case, ...]:
    """Feature dims 8-32, value dims 64/112, both dtypes, decay, the chunk/block sweeps of
    gpu_check, the elementwise maps (SSD's identity at Mamba-2's N = 128, P = 64 with one
    group of b, c for two heads; elu), windows and full causal attention, head dims 64-128,
    and the selective scan (Mamba-1's N = 16) in both dtypes."""
    sweeps = {"gpu": ((32, 64), 128), "tpu": ((128,), 256)}
    if backend not in sweeps:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(sweeps)}")
    chunks, blocks = sweeps[backend]
    return (
        *(linear_case(backend, feature_dim=feature_dim) for feature_dim in (8, 16, 24, 32)),
        linear_case(backend, value_dim=112),
        linear_case(backend, feature_map="taylor_symmetric"),
        linear_case(backend, dtype=jnp.float32),
        linear_case(backend, feature_dim=32, value_dim=112, dtype=jnp.float32),
        linear_case(backend, decay=True),
        *(linear_case(backend, chunk=chunk) for chunk in chunks),
        linear_case(backend, "identity", 128, 64, decay=True, normalize=False, groups=1),
        linear_case(backend, "elu", decay=True),
        *(window_case(backend, head_dim=head_dim) for head_dim in (64, 112, 128)),
        window_case(backend, window=None),
        window_case(backend, dtype=jnp.float32),
        window_case(backend, head_dim=128, block_size=blocks),
        scan_case(backend),
        scan_case(backend, dtype=jnp.float32),
    )


GPU_CASES = cases("gpu")
TPU_CASES = cases("tpu")

#: The float32 kernels at F = 32 take Triton minutes to compile from a cold cache (their operands
#: spill to the stack; 7 minutes on a loaded 2-core host for Dv = 112), so the test suite holds
#: the float32 path to the limits at F = 16 and F = 32 at bf16, and leaves this case to the
#: report of ``benchmarks/compile_kernels.py``; likewise the float32 selective scan, whose
#: unrolled backward compiles like the bfloat16 one (same float32 arithmetic) but slower.
SLOW_GPU_CASES = frozenset(
    {"linear taylor F=32 Dv=112 float32", "selective_scan N=16 D=256 float32"}
)

#: A small topology per TPU generation (deviceless compilation needs a whole host's chips).
TPU_TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


#: Where ``--install_libtpu`` puts libtpu: beside the environment's packages, not among them, so
#: that JAX never loads it as a backend (on a host without a TPU that prints errors at start-up).
LIBTPU_DIR = os.path.join(sys.prefix, "libtpu")
LIBTPU_PATH_VARIABLE = "JAXBASED_LIBTPU"


def libtpu_requirement() -> str:
    """The libtpu version the installed jax asks for with its ``tpu`` extra."""
    from importlib.metadata import requires

    for requirement in requires("jax") or ():
        if requirement.startswith("libtpu"):
            return requirement.split(";")[0].strip()
    raise ValueError(f"jax {jax.__version__} names no libtpu requirement")


def install_libtpu() -> str:
    """``pip install --target`` :data:`LIBTPU_DIR` the libtpu matching jax; the library's path."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade"]
    subprocess.run([*command, "--target", LIBTPU_DIR, libtpu_requirement()], check=True)
    return libtpu_path()


def libtpu_path() -> str:
    """libtpu.so: ``$JAXBASED_LIBTPU``, else :data:`LIBTPU_DIR`'s, else an installed ``libtpu``
    package's. Raises ``FileNotFoundError`` saying how to install it."""
    candidates = [
        os.environ.get(LIBTPU_PATH_VARIABLE),
        os.path.join(LIBTPU_DIR, "libtpu", "libtpu.so"),
    ]
    try:
        import libtpu

        candidates.append(libtpu.get_library_path())
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"no libtpu.so (looked at ${LIBTPU_PATH_VARIABLE}, {LIBTPU_DIR}, the libtpu package); "
        "run `python benchmarks/compile_kernels.py --install_libtpu` (make install does)"
    )


def _tpu_topology(generation: str):
    """The topology of ``generation``, loading libtpu as a PJRT plugin on first use (after the
    CPU backend is up, so that JAX's own backends stay as they were)."""
    from jax._src import xla_bridge
    from jax.experimental import topologies

    if generation not in TPU_TOPOLOGIES:
        raise ValueError(f"generation={generation!r}; allowed: {', '.join(TPU_TOPOLOGIES)}")
    jax.devices()  # initialise JAX's backends first: the plugin must not become one of them
    if not xla_bridge.xla_client.pjrt_plugin_loaded("tpu"):
        xla_bridge.xla_client.load_pjrt_plugin_dynamically("tpu", libtpu_path())
    return topologies.get_topology_desc(topology_name=TPU_TOPOLOGIES[generation], platform="tpu")


def compile_for_tpu(case: Case, generation: str) -> float:
    """Compile ``case`` for one chip of ``generation`` with libtpu (no TPU needed); seconds.

    Raises what the TPU compiler raises (e.g. ``RESOURCE_EXHAUSTED`` when a kernel's blocks do
    not fit in VMEM).
    """
    import numpy as np

    topology = _tpu_topology(generation)
    mesh = jax.sharding.Mesh(np.array(topology.devices[:1]), ("chip",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = [jax.ShapeDtypeStruct(arg.shape, arg.dtype, sharding=sharding) for arg in case.args]
    start = time.perf_counter()
    jax.jit(case.function).lower(*args).compile()
    return time.perf_counter() - start


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
