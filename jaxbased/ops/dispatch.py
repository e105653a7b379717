"""Choosing between the XLA reference and the Pallas kernels (``implementation=``).

- ``"xla"``: the XLA reference implementation (the source of truth), on every platform.
- ``"pallas"``: the Pallas kernel; on a TPU or GPU it is compiled for it, on CPU it runs in
  Pallas' interpreter (the TPU kernel, slowly: for tests). Arguments the kernel does not support
  raise ``ValueError`` with the reason.
- ``"auto"``: the kernel on TPU and GPU when it supports the arguments, else XLA (always XLA
  on CPU).
"""

from __future__ import annotations

import jax

IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla", "pallas")
_GPU_PLATFORMS = frozenset({"gpu", "cuda", "rocm"})


def check_implementation(implementation: str) -> None:
    """Raise ``ValueError`` unless ``implementation`` is one of :data:`IMPLEMENTATIONS`."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not known; allowed: {', '.join(IMPLEMENTATIONS)}"
        )


def kernel_backend() -> tuple[str, bool]:
    """``(backend, interpret)`` for the Pallas kernels on the default JAX platform: the GPU
    kernels on a GPU, the TPU kernels on a TPU, and the TPU kernels interpreted elsewhere."""
    platform = jax.default_backend()
    if platform in _GPU_PLATFORMS:
        return "gpu", False
    if platform == "tpu":
        return "tpu", False
    return "tpu", True


def use_pallas(implementation: str, unsupported: str | None) -> bool:
    """Whether to run the kernel, given the reason it cannot (``unsupported``, or None).

    ``"pallas"`` with a reason raises ``ValueError`` naming it.
    """
    check_implementation(implementation)
    if implementation == "xla":
        return False
    if implementation == "pallas":
        if unsupported is not None:
            raise ValueError(f"implementation='pallas' cannot run these arguments: {unsupported}")
        return True
    _, interpret = kernel_backend()
    return not interpret and unsupported is None
