"""How the host's C allocator treats the large buffers XLA:CPU allocates on every call.

XLA's CPU runtime allocates the buffers of a compiled program with ``malloc`` at every call and
frees them when the call ends. glibc serves an allocation above its mmap threshold (at most
32 MiB on 64-bit Linux) with a fresh ``mmap`` and returns it with ``munmap``, and it trims or
unmaps the free tops of its heaps; either way the next call touches fresh pages, and the kernel
zero-fills each of them (a minor page fault). For a model whose activations are tens of MiB per
buffer (BASED at 16k tokens: ``[T, 4d]`` BaseConv projections of 64 MiB), that is hundreds of MiB
of page faults per forward call and a tenth or more of its time (docs/performance.md,
BENCHMARKS.md).

:func:`keep_freed_host_memory` tells glibc to keep what it frees for the next call: one arena,
no ``mmap`` for large blocks, no trimming. The process then holds its high-water mark of host
memory for as long as it lives, which is what a training or serving process does anyway. It
changes no result, only where memory comes from. The command-line programs call it at start
(``JAXBASED_HOST_MALLOC=system`` leaves glibc as it is); a library user may call it once at the
start of a program, before JAX starts its backend. Other C libraries (musl, macOS) and a
preloaded tcmalloc or jemalloc, which keep freed memory by themselves, are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from absl import logging

#: ``JAXBASED_HOST_MALLOC``: ``keep`` (the default) or ``system``.
ENVIRONMENT_VARIABLE = "JAXBASED_HOST_MALLOC"
POLICIES = ("keep", "system")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold mallopt accepts (an int): 2 GiB - 1 byte.
_NEVER_TRIM = 2**31 - 1


def host_malloc_policy() -> str:
    """``JAXBASED_HOST_MALLOC`` (``keep`` when unset); ``ValueError`` for another value."""
    policy = os.environ.get(ENVIRONMENT_VARIABLE, "keep").strip().lower() or "keep"
    if policy not in POLICIES:
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE}={os.environ[ENVIRONMENT_VARIABLE]!r} is not a policy; "
            f"allowed: {', '.join(POLICIES)}"
        )
    return policy


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    return library if hasattr(library, "mallopt") else None


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); True when it did.

    Call it before JAX's backend starts (the first ``jax.devices()`` or computation): threads
    that already hold an arena of their own keep it.
    """
    library = _glibc()
    if library is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    applied = all(library.mallopt(parameter, value) == 1 for parameter, value in settings)
    if not applied:
        logging.warning("glibc refused a mallopt setting; host memory is left to its defaults")
    return applied


def apply_host_malloc_policy() -> bool:
    """What the command-line programs call at start: :func:`keep_freed_host_memory` unless
    ``JAXBASED_HOST_MALLOC=system``. True when glibc was told to keep freed memory."""
    if host_malloc_policy() == "system":
        return False
    return keep_freed_host_memory()
