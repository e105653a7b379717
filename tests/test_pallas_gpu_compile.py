"""The GPU kernels compile for Hopper (sm_90) within its per-block limits, checked on a CPU host.

``jax.export`` for CUDA stops at Triton IR (tests/test_pallas_linear_attention.py); here each
kernel's IR is compiled on to a cubin by the ``triton`` package's compiler for sm_90 (H100/H200),
the step XLA would run on the GPU, and its shared memory and registers are held against the
hardware's limits. A kernel over them would fail at launch on the GPU (e.g. the full 273/1057-row
Taylor state at F = 32 needed 375 KiB of shared memory before the kernels switched to the
symmetric expansion). The ``triton`` wheel has its own Triton version, not XLA's, so this is a
close proxy for, not a replacement of, ``benchmarks/gpu_check.sh`` on the hardware.
"""

import platform

import pytest

from benchmarks.triton_compile import (
    CASES,
    REGISTERS_PER_THREAD,
    SHARED_MEMORY_PER_BLOCK,
    check,
    compile_for_cuda,
    triton_kernels,
)

pytest.importorskip(
    "triton",
    reason=f"the triton compiler has wheels for Linux x86_64 only (this is {platform.system()} "
    f"{platform.machine()}); setup.cfg installs it there with the test extra",
)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_kernels_compile_for_sm90_within_its_limits(case):
    kernels = triton_kernels(case.function, *case.args)
    # the forward, the query-gradient and the key/value-gradient kernels
    suffixes = ["forward", "backward_query", "backward_key_value"]
    assert [kernel.name.split("_attention_")[-1] for kernel in kernels] == suffixes
    for kernel in kernels:
        report = compile_for_cuda(kernel, arch=90)
        assert 0 < report.shared_bytes <= SHARED_MEMORY_PER_BLOCK[90], report
        assert 0 < report.registers <= REGISTERS_PER_THREAD, report
        assert check(report, 90) == []


def test_the_limit_check_reports_a_kernel_over_the_limits():
    from benchmarks.triton_compile import CompileReport

    over = CompileReport("k", 4, 2, SHARED_MEMORY_PER_BLOCK[90] + 1, 255, 0)
    assert check(over, 90) == [
        f"k: {SHARED_MEMORY_PER_BLOCK[90] + 1} bytes of shared memory > "
        f"{SHARED_MEMORY_PER_BLOCK[90]} per block on sm_90"
    ]
