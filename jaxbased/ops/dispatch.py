"""Choosing between the XLA reference and the Pallas kernels (``implementation=``).

- ``"xla"``: the XLA reference implementation (the source of truth), on every platform.
- ``"pallas"``: the Pallas kernel; on a TPU or GPU it is compiled for it, on CPU it runs in
  Pallas' interpreter (the TPU kernel, slowly: for tests). Arguments the kernel does not support
  raise ``ValueError`` with the reason; on a device, a kernel that fails its check (below)
  raises :class:`~jaxbased.ops.kernel_check.KernelCheckError`. It never falls back.
- ``"auto"`` (the default): XLA on CPU. On a TPU or GPU, the kernel when it supports the
  arguments and has passed its check for the class ``(platform, kernel, dtype, feature map)``
  (:mod:`jaxbased.ops.kernel_check`: compiled and compared with XLA on a small problem, once
  per process), else XLA. On a GPU, float32 inputs run on XLA: the float32 kernels compile to
  6-22 KiB of register spills per thread (``BENCHMARKS.md``); the kernels run for bfloat16 and
  float16 inputs (``implementation="pallas"`` forces them for float32).

``JAXBASED_KERNELS=check|trust|off`` sets the policy on devices: ``check`` (default) as above,
``trust`` skips the check, ``off`` makes ``auto`` always XLA.

Under an active mesh (``jax.set_mesh``), the kernels run inside ``jax.shard_map``: batch split
over the ``data`` and ``fsdp`` axes, heads over ``tensor`` (each only when present, larger than
one and dividing the dim), replicated over any other axis. A Pallas kernel is an opaque custom
call to XLA's partitioner, which would otherwise gather its inputs onto every device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxbased.ops.kernel_check import (
    KernelCheckError,
    KernelClass,
    check_kernel,
    kernel_policy,
)

IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla", "pallas")
_GPU_PLATFORMS = frozenset({"gpu", "cuda", "rocm"})
#: Mesh axes that split the batch, and the one that splits heads (docs/architecture.md#sharding).
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")
HEAD_AXIS = "tensor"


def check_implementation(implementation: str) -> None:
    """Raise ``ValueError`` unless ``implementation`` is one of :data:`IMPLEMENTATIONS`."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not known; allowed: {', '.join(IMPLEMENTATIONS)}"
        )


@dataclasses.dataclass(frozen=True)
class KernelTarget:
    """Where the kernels run in this process.

    Attributes:
      platform: the default JAX platform (``cpu``, ``gpu``, ``tpu``).
      backend: the kernel family, ``tpu`` or ``gpu`` (the TPU kernels on CPU).
      interpret: run the kernels in Pallas' interpreter (on CPU).
    """

    platform: str
    backend: str
    interpret: bool

    @property
    def on_device(self) -> bool:
        """Whether the kernels run on a GPU or TPU (where ``auto`` checks them)."""
        return self.platform in ("gpu", "tpu")


def kernel_target() -> KernelTarget:
    """The :class:`KernelTarget` of the default JAX platform: the GPU kernels on a GPU, the TPU
    kernels on a TPU, and the TPU kernels interpreted elsewhere."""
    platform = jax.default_backend()
    if platform in _GPU_PLATFORMS:
        return KernelTarget("gpu", "gpu", False)
    if platform == "tpu":
        return KernelTarget("tpu", "tpu", False)
    return KernelTarget(platform, "tpu", True)


def kernel_backend() -> tuple[str, bool]:
    """``(backend, interpret)`` of :func:`kernel_target`."""
    target = kernel_target()
    return target.backend, target.interpret


@dataclasses.dataclass(frozen=True)
class KernelRequest:
    """One call's kernel, for the check: its name, input dtype and feature map, and its probe.

    ``probe(target)`` runs the kernel on ``target`` and the XLA reference on a small problem of
    the class and raises when they differ
    (:func:`jaxbased.ops.kernel_check.compare_with_reference`). ``float32_on_gpu``: ``auto``
    runs float32 inputs on the GPU kernel too (a kernel without matmuls, whose float32 code
    does not spill); else they go to XLA on a GPU.
    """

    kernel: str
    dtype: Any
    probe: Callable[[KernelTarget], None]
    feature_map: str | None = None
    float32_on_gpu: bool = False

    def kernel_class(self, target: KernelTarget) -> KernelClass:
        return KernelClass(
            target.platform, self.kernel, jnp.dtype(self.dtype).name, self.feature_map
        )


def use_pallas(implementation: str, unsupported: str | None, request: KernelRequest) -> bool:
    """Whether to run the kernel, given the reason it cannot (``unsupported``, or None).

    ``"pallas"`` with a reason raises ``ValueError`` naming it, and on a device under the
    ``check`` policy raises :class:`KernelCheckError` if ``request``'s class fails its check.
    ``"auto"``: see the module docstring.
    """
    check_implementation(implementation)
    if implementation == "xla":
        return False
    target = kernel_target()
    if implementation == "pallas":
        if unsupported is not None:
            raise ValueError(f"implementation='pallas' cannot run these arguments: {unsupported}")
        if target.on_device and kernel_policy() == "check":
            kernel_class = request.kernel_class(target)
            verdict = check_kernel(kernel_class, lambda: request.probe(target))
            if not verdict.passed:
                raise KernelCheckError(
                    f"implementation='pallas': {kernel_class.describe()} failed its check "
                    f"against XLA: {verdict.error}"
                )
        return True
    if not target.on_device or unsupported is not None:
        return False
    policy = kernel_policy()
    if policy == "off":
        return False
    float32 = jnp.dtype(request.dtype) == jnp.float32
    if target.platform == "gpu" and float32 and not request.float32_on_gpu:
        return False  # the float32 GPU matmul kernels spill registers: XLA is the better default
    if policy == "trust":
        return True
    kernel_class = request.kernel_class(target)
    return check_kernel(kernel_class, lambda: request.probe(target)).passed


def mesh_partition(batch: int, heads: int) -> tuple[Any, Any] | None:
    """``(batch axes, head axis)`` of the active mesh for arrays with these dims, or None when
    no mesh is active or nothing can be split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    batch_axes = tuple(axis for axis in BATCH_AXES if sizes.get(axis, 1) > 1)
    if batch_axes and batch % math.prod(sizes[axis] for axis in batch_axes):
        batch_axes = ()
    head_axis = HEAD_AXIS if sizes.get(HEAD_AXIS, 1) > 1 else None
    if head_axis is not None and heads % sizes[HEAD_AXIS]:
        head_axis = None
    if not batch_axes and head_axis is None:
        return None
    return (batch_axes or None), head_axis


def token_spec(partition: tuple[Any, Any]) -> PartitionSpec:
    """Spec of a batch-major ``[B, T, H, X]`` array."""
    batch_axes, head_axis = partition
    return PartitionSpec(batch_axes, None, head_axis, None)


def head_spec(partition: tuple[Any, Any], ndim: int) -> PartitionSpec:
    """Spec of a ``[B, H, ...]`` array of rank ``ndim`` (a recurrent state)."""
    batch_axes, head_axis = partition
    return PartitionSpec(batch_axes, head_axis, *([None] * (ndim - 2)))


def shard_kernel(
    function: Callable, partition: tuple[Any, Any] | None, in_specs: Any, out_specs: Any
) -> Callable:
    """``function`` itself without a partition, else wrapped in ``jax.shard_map`` over the
    active mesh (each device runs the kernel on its shard; no communication)."""
    if partition is None:
        return function
    return jax.shard_map(function, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def constrain_batch(x: jax.Array) -> jax.Array:
    """Keep the leading (batch) axis of an activation split over the active mesh's batch axes,
    and its time axis (the second) over ``sequence`` when the mesh has that axis larger than one
    and it divides ``T`` (:mod:`jaxbased.ops.sequence_parallel`).

    Used at block boundaries so that XLA never gathers the batch or the sequence; a no-op
    without a mesh or when nothing divides."""
    from jaxbased.ops.sequence_parallel import constrain_sequence

    partition = mesh_partition(x.shape[0], 1)
    batch_axes = None if partition is None else partition[0]
    spec = constrain_sequence(x, batch_axes)
    if spec is None:
        if batch_axes is None:
            return x
        spec = PartitionSpec(batch_axes, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)
