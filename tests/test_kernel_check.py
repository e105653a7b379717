"""The guard of ``implementation="auto"`` on a device (jaxbased/ops/kernel_check.py).

There is no accelerator here, so the tests pretend one: ``dispatch.kernel_target`` reports a
TPU (or GPU) platform while the kernels still run in Pallas' interpreter. The kernel is then
replaced by one that returns wrong values, or one that fails as a compiler would; ``auto`` must
fall back to XLA with exactly one warning naming the kernel and the error, give the XLA
result, and keep XLA for that class; ``pallas`` must raise in both cases. The verdict cache is
reset around every test.
"""

import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.linear_attention as pallas_linear_attention_module
from jaxbased.ops import dispatch, kernel_check, linear_attention
from jaxbased.ops.dispatch import KernelTarget
from jaxbased.ops.kernel_check import KernelCheckError, KernelClass

PRETEND_TPU = KernelTarget("tpu", "tpu", interpret=True)
PRETEND_GPU = KernelTarget("gpu", "tpu", interpret=True)  # GPU rules, TPU kernels interpreted
REAL_KERNEL = pallas_linear_attention_module.linear_attention


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.delenv(kernel_check.POLICY_VARIABLE, raising=False)
    kernel_check.reset_kernel_verdicts()
    yield
    kernel_check.reset_kernel_verdicts()


def pretend(monkeypatch, target: KernelTarget, kernel) -> None:
    monkeypatch.setattr(dispatch, "kernel_target", lambda: target)
    monkeypatch.setattr(pallas_linear_attention_module, "linear_attention", kernel)


def inputs(dtype=np.float32):
    rng = np.random.default_rng(0)
    q, k = (rng.uniform(0.1, 1.0, size=(1, 24, 2, 8)).astype(dtype) for _ in range(2))
    v = rng.normal(size=(1, 24, 2, 8)).astype(dtype)
    return q, k, v


def attention(implementation):
    return jax.jit(
        lambda q, k, v: linear_attention(
            q, k, v, feature_map="elu", chunk_size=16, implementation=implementation
        )
    )


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def wrong_kernel(*args, **kwargs):
    y, state = REAL_KERNEL(*args, **kwargs)
    return 1.5 * y, state


def failing_kernel(*args, **kwargs):
    raise RuntimeError("Mosaic failed to compile TPU kernel: unsupported shape cast")


def test_a_wrong_kernel_falls_back_to_xla_with_one_warning_and_pallas_raises(monkeypatch, caplog):
    pretend(monkeypatch, PRETEND_TPU, wrong_kernel)
    q, k, v = inputs()
    want = attention("xla")(q, k, v)
    with caplog.at_level(logging.WARNING):
        first = attention("auto")(q, k, v)
        second = jax.jit(lambda q: linear_attention(q, k, v, feature_map="elu", chunk_size=16))(q)
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(second, want)
    (warning,) = warnings_of(caplog)
    assert "Pallas kernel linear_attention (float32, feature_map=elu) on tpu" in warning
    assert "KernelMismatchError: result 0" in warning and "relative to XLA" in warning
    verdict = kernel_check.kernel_verdicts()[
        KernelClass("tpu", "linear_attention", "float32", "elu")
    ]
    assert not verdict.passed
    # pallas never falls back (that it runs the check itself: the float32-on-GPU case below)
    with pytest.raises(KernelCheckError, match=r"implementation=.pallas.*off by"):
        attention("pallas")(q, k, v)


def test_a_kernel_that_fails_to_compile_falls_back_the_same_way(monkeypatch, caplog):
    pretend(monkeypatch, PRETEND_TPU, failing_kernel)
    q, k, v = inputs()
    with caplog.at_level(logging.WARNING):
        got = attention("auto")(q, k, v)
        attention("auto")(q, k, v)
    np.testing.assert_array_equal(got, attention("xla")(q, k, v))
    (warning,) = warnings_of(caplog)
    assert "linear_attention" in warning
    assert "RuntimeError: Mosaic failed to compile TPU kernel" in warning
    with pytest.raises(KernelCheckError, match="RuntimeError: Mosaic failed to compile"):
        attention("pallas")(q, k, v)


def test_a_kernel_that_passes_its_check_runs(monkeypatch):
    calls = []

    def counted_kernel(*args, **kwargs):
        calls.append(kwargs["feature_map"])
        return REAL_KERNEL(*args, **kwargs)

    pretend(monkeypatch, PRETEND_TPU, counted_kernel)
    q, k, v = inputs()
    got = attention("auto")(q, k, v)
    assert kernel_check.kernel_verdicts()[
        KernelClass("tpu", "linear_attention", "float32", "elu")
    ].passed
    np.testing.assert_allclose(got, attention("xla")(q, k, v), rtol=1e-5, atol=1e-6)
    # The verdict is cached: another call of the class traces the kernel once, no probe.
    traced = len(calls)
    attention("auto")(q[:, :20], k[:, :20], v[:, :20])
    assert len(calls) == traced + 1


def test_policies_and_the_gpu_float32_rule(monkeypatch, caplog):
    q, k, v = inputs()
    pretend(monkeypatch, PRETEND_TPU, failing_kernel)
    monkeypatch.setenv(kernel_check.POLICY_VARIABLE, "off")
    attention("auto")(q, k, v)  # XLA, unchecked: the failing kernel never runs
    monkeypatch.setenv(kernel_check.POLICY_VARIABLE, "trust")
    with pytest.raises(RuntimeError, match="Mosaic failed"):  # trusted: no check, no fallback
        attention("auto")(q, k, v)
    monkeypatch.setenv(kernel_check.POLICY_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match="JAXBASED_KERNELS='sometimes' is not known; allowed"):
        attention("auto")(q, k, v)
    assert not kernel_check.kernel_verdicts()

    # On a GPU, auto keeps float32 on XLA without a check; bfloat16 is checked.
    monkeypatch.delenv(kernel_check.POLICY_VARIABLE)
    pretend(monkeypatch, PRETEND_GPU, failing_kernel)
    attention("auto")(q, k, v)
    assert not kernel_check.kernel_verdicts()
    with caplog.at_level(logging.WARNING):
        low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
        attention("auto")(*low)
    (warning,) = warnings_of(caplog)
    assert "(bfloat16, feature_map=elu) on gpu" in warning
    # implementation="pallas" forces the float32 kernel (checked, so it raises here)
    with pytest.raises(KernelCheckError, match=r"\(float32, feature_map=elu\) on gpu"):
        attention("pallas")(q, k, v)


def test_on_cpu_nothing_is_checked(monkeypatch):
    monkeypatch.setattr(pallas_linear_attention_module, "linear_attention", failing_kernel)
    q, k, v = inputs()
    attention("auto")(q, k, v)  # XLA on CPU
    with pytest.raises(RuntimeError, match="Mosaic failed"):  # interpreted, unchecked
        attention("pallas")(q, k, v)
    assert not kernel_check.kernel_verdicts()


def test_the_window_and_selective_scan_probes_pass_with_their_kernels():
    # The probes auto runs on a device, here with the real kernels interpreted: a correct
    # kernel passes (so a device check that fails means the compiled kernel differs).
    # (jaxbased.ops.selective_scan is also the name of the function jaxbased.ops exports.)
    selective_scan_module = importlib.import_module("jaxbased.ops.selective_scan")
    window_attention_module = importlib.import_module("jaxbased.ops.window_attention")
    window_attention_module._probe(jnp.dtype(jnp.float32), PRETEND_TPU)
    selective_scan_module._probe(jnp.dtype(jnp.bfloat16), PRETEND_TPU)
