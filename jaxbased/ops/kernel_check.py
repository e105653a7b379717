"""The check that guards ``implementation="auto"`` (and ``"pallas"``) on a device.

No kernel of this project may run compiled on a GPU or TPU for the first time inside a user's
model. So the first time a kernel is about to run compiled on a device, for a class
:class:`KernelClass` ``(platform, kernel, dtype, feature map)``, the op compiles it, runs it on a
small problem of that class (its *probe*: random inputs, forward and gradients) and compares
the results with the XLA reference computed at ``highest`` matmul precision
(:func:`compare_with_reference`). The verdict is cached for the rest of the process:

- passed: the kernel runs for every later call of the class;
- failed (a mismatch, or any error while compiling or running it): ``auto`` logs one warning
  naming the kernel and the error and uses XLA for that class from then on;
  ``implementation="pallas"`` never falls back: it raises :class:`KernelCheckError`.

``JAXBASED_KERNELS`` selects the policy (:func:`kernel_policy`): ``check`` (default), ``trust``
(no check: kernels run where they support the arguments) or ``off`` (``auto`` never uses a
kernel; ``pallas`` still does, unchecked). On CPU nothing is checked: kernels run only in
Pallas' interpreter there, for tests.

The one piece of global state is the per-process verdict cache, ``_VERDICTS`` below, read
through :func:`kernel_verdicts` and cleared by :func:`reset_kernel_verdicts` (tests).

A probe checks the class, not every shape: a kernel that compiles for the probe may still fail
for another shape (e.g. out of VMEM); that error is raised by XLA when it compiles the caller.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

POLICY_VARIABLE = "JAXBASED_KERNELS"
POLICIES: tuple[str, ...] = ("check", "trust", "off")
#: Largest ``max |kernel - reference| / max |reference|`` a probe accepts, per input dtype: 10x
#: the tolerance of the interpret-mode tests (a broken kernel is off by O(1)).
PROBE_TOLERANCE: dict[str, float] = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}


class KernelCheckError(RuntimeError):
    """A kernel failed its check (``implementation="pallas"`` raises this, ``auto`` falls
    back to XLA)."""


class KernelMismatchError(ValueError):
    """A probe's kernel results differ from the XLA reference beyond the tolerance."""


@dataclasses.dataclass(frozen=True)
class KernelClass:
    """What one verdict covers.

    Attributes:
      platform: the JAX platform (``gpu``, ``tpu``).
      kernel: the kernel's name (``linear_attention``, ``window_attention``,
        ``selective_scan``).
      dtype: the inputs' dtype name (``float32``, ``bfloat16``, ``float16``).
      feature_map: the feature map (linear attention), else None.
    """

    platform: str
    kernel: str
    dtype: str
    feature_map: str | None = None

    def describe(self) -> str:
        feature_map = "" if self.feature_map is None else f", feature_map={self.feature_map}"
        return f"Pallas kernel {self.kernel} ({self.dtype}{feature_map}) on {self.platform}"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A class's check result: ``passed``, else the ``error`` (type and message)."""

    passed: bool
    error: str | None = None


#: The per-process cache of verdicts (the module's only mutable state).
_VERDICTS: dict[KernelClass, Verdict] = {}


def kernel_policy() -> str:
    """``$JAXBASED_KERNELS`` (``check`` when unset); ``ValueError`` for any other value."""
    policy = os.environ.get(POLICY_VARIABLE, "check")
    if policy not in POLICIES:
        raise ValueError(
            f"{POLICY_VARIABLE}={policy!r} is not known; allowed: {', '.join(POLICIES)}"
        )
    return policy


def kernel_verdicts() -> Mapping[KernelClass, Verdict]:
    """A read-only view of this process's verdicts."""
    return MappingProxyType(_VERDICTS)


def reset_kernel_verdicts() -> None:
    """Forget every verdict (tests; a new process starts empty)."""
    _VERDICTS.clear()


def check_kernel(kernel_class: KernelClass, probe: Callable[[], None]) -> Verdict:
    """The cached verdict of ``kernel_class``, running ``probe()`` the first time.

    ``probe`` raises (:class:`KernelMismatchError`, or whatever compiling or running the kernel
    raises) when the kernel fails. It runs in a thread of its own: JAX's tracing state is per
    thread, so the probe compiles and runs at the top level even when this is called while the
    caller's function is being traced (as the ops do), and outside the caller's mesh and config
    contexts. A failure is logged once, as a warning naming the kernel and the error.
    """
    verdict = _VERDICTS.get(kernel_class)
    if verdict is not None:
        return verdict
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
            executor.submit(probe).result()
    except Exception as error:  # any failure of the kernel is the verdict, not a crash
        verdict = Verdict(False, f"{type(error).__name__}: {error}")
        logging.warning(
            "%s failed its check against XLA, so XLA runs it for the rest of this process: "
            "%s (%s=trust skips the check; implementation='pallas' raises instead)",
            kernel_class.describe(),
            verdict.error,
            POLICY_VARIABLE,
        )
    else:
        verdict = Verdict(True)
    _VERDICTS[kernel_class] = verdict
    return verdict


def compare_with_reference(
    kernel: Callable[..., Any],
    reference: Callable[..., Any],
    inputs: tuple[Any, ...],
    dtype: str,
    seed: int = 0,
) -> None:
    """Run ``kernel`` and ``reference`` (same signature, a pytree of arrays out) on ``inputs``,
    forward and the gradients of a random linear function of every floating output with
    respect to every input, each jitted; raise :class:`KernelMismatchError` naming the first output
    or gradient off by more than :data:`PROBE_TOLERANCE` (relative to its largest value).

    The reference runs at ``highest`` matmul precision (no TF32 or bfloat16 passes).
    """
    tolerance = PROBE_TOLERANCE[dtype]
    shapes = jax.eval_shape(reference, *inputs)
    rng = np.random.default_rng(seed)
    weights = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)

    def results(function):
        def loss(*args):
            outputs = function(*args)
            products = jax.tree.map(
                lambda out, weight: jnp.sum(out.astype(jnp.float32) * weight), outputs, weights
            )
            return sum(jax.tree.leaves(products))

        argnums = tuple(range(len(inputs)))
        return jax.jit(lambda *args: (function(*args), jax.grad(loss, argnums=argnums)(*args)))

    got = results(kernel)(*inputs)
    with jax.default_matmul_precision("highest"):
        want = results(reference)(*inputs)
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    if len(got_leaves) != len(want_leaves):
        raise KernelMismatchError(
            f"{len(got_leaves)} results; the reference has {len(want_leaves)}"
        )
    for index, (got_leaf, want_leaf) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        got_array = np.asarray(jnp.asarray(got_leaf, jnp.float32), np.float64)
        want_array = np.asarray(jnp.asarray(want_leaf, jnp.float32), np.float64)
        if got_array.shape != want_array.shape:
            raise KernelMismatchError(
                f"result {index} has shape {got_array.shape}; the reference {want_array.shape}"
            )
        scale = max(float(np.max(np.abs(want_array), initial=0.0)), 1e-30)
        error = float(np.max(np.abs(got_array - want_array), initial=0.0)) / scale
        if not error <= tolerance:  # NaN fails too
            raise KernelMismatchError(
                f"result {index} of {len(got_leaves)} (outputs, then gradients) is off by "
                f"{error:.3g} relative to XLA (tolerance {tolerance:g} for {dtype})"
            )
