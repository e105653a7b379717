"""Every Pallas kernel compiles for the real hardware, on a CPU host, within its on-chip limits.

``jax.export`` stops at Pallas' own lowering (tests/test_pallas_linear_attention.py); here the
hardware compilers run too (pallas_kernels/compile_check.py):

- GPU: each kernel's Triton IR is compiled to a cubin for sm_90 (H100/H200) by the ``triton``
  package, and its shared memory and registers are held to the chip's per-block limits. This
  caught the full 273/1057-row Taylor state at F = 32 needing up to 375 KiB of shared memory
  (227 KiB allowed) before the kernels switched to the symmetric expansion.
- TPU: the whole differentiated call is compiled ahead of time by libtpu for one chip of
  TPU v4, v5e, v5p and v6e with no TPU attached, which runs Mosaic's layout passes and VMEM
  allocation (a block too big for VMEM fails here: see the last test).

The ``triton`` wheel has its own Triton version, not XLA's, and libtpu compiles but never runs
the kernels: close proxies for, not replacements of, ``benchmarks/gpu_check.sh`` on the hardware.
"""

import platform

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.compile_check import (
    GPU_CASES,
    REGISTERS_PER_THREAD,
    SHARED_MEMORY_PER_BLOCK,
    SLOW_GPU_CASES,
    TPU_CASES,
    TPU_TOPOLOGIES,
    Case,
    CompileReport,
    check,
    compile_for_cuda,
    compile_for_tpu,
    triton_kernels,
)

LINUX_X86 = platform.system() == "Linux" and platform.machine() == "x86_64"
NOT_LINUX_X86 = (
    f"the triton compiler and libtpu have wheels for Linux x86_64 only (this is "
    f"{platform.system()} {platform.machine()}); setup.cfg's test extra installs them there"
)
needs_linux_x86 = pytest.mark.skipif(not LINUX_X86, reason=NOT_LINUX_X86)


SUITE_GPU_CASES = [case for case in GPU_CASES if case.name not in SLOW_GPU_CASES]


def test_the_suite_leaves_out_only_the_named_slow_cases():
    assert {case.name for case in GPU_CASES} - {case.name for case in SUITE_GPU_CASES} == set(
        SLOW_GPU_CASES
    )


@needs_linux_x86
@pytest.mark.parametrize("case", SUITE_GPU_CASES, ids=[case.name for case in SUITE_GPU_CASES])
def test_gpu_kernels_compile_for_sm90_within_its_limits(case):
    kernels = triton_kernels(case.function, *case.args)
    # attention: the forward, the query-gradient and the key/value-gradient kernels; the
    # selective scan: forward and backward
    assert len(kernels) == len(case.kernels)
    for kernel, suffix in zip(kernels, case.kernels, strict=True):
        assert kernel.name.endswith(f"_{suffix}"), (kernel.name, suffix)
    for kernel in kernels:
        report = compile_for_cuda(kernel, arch=90)
        assert 0 < report.shared_bytes <= SHARED_MEMORY_PER_BLOCK[90], report
        assert 0 < report.registers <= REGISTERS_PER_THREAD, report
        assert check(report, 90) == []


def test_the_gpu_limit_check_reports_a_kernel_over_the_limits():
    over = CompileReport("k", 4, 2, SHARED_MEMORY_PER_BLOCK[90] + 1, 255, 0)
    assert check(over, 90) == [
        f"k: {SHARED_MEMORY_PER_BLOCK[90] + 1} bytes of shared memory > "
        f"{SHARED_MEMORY_PER_BLOCK[90]} per block on sm_90"
    ]


@needs_linux_x86
@pytest.mark.parametrize("case", TPU_CASES, ids=[case.name for case in TPU_CASES])
def test_tpu_kernels_compile_for_every_tpu_generation(case):
    for generation in TPU_TOPOLOGIES:
        assert compile_for_tpu(case, generation) > 0


def _doubling_kernel(rows: int) -> Case:
    def kernel(x_ref, out_ref):
        out_ref[...] = x_ref[...] * 2

    def double(x):
        spec = pl.BlockSpec((rows, 1024), lambda i: (i, 0))
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            grid=(x.shape[0] // rows,),
            in_specs=[spec],
            out_specs=spec,
        )(x)

    return Case(f"double {rows} rows", double, (jax.ShapeDtypeStruct((8192, 1024), jnp.float32),))


@needs_linux_x86
def test_the_tpu_compiler_rejects_blocks_that_do_not_fit_in_vmem():
    # 512 x 1024 float32 blocks (2 MiB, double-buffered in and out) fit; 8192 rows (32 MiB
    # each, 64 MiB in all) exceed v5e's 16 MiB of scoped VMEM: the check can fail.
    assert compile_for_tpu(_doubling_kernel(512), "v5e") > 0
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"RESOURCE_EXHAUSTED: .*ScopedVmemOom"):
        compile_for_tpu(_doubling_kernel(8192), "v5e")
