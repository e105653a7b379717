"""Choosing between the XLA reference and the Pallas kernels (``implementation=``).

- ``"xla"``: the XLA reference implementation (the source of truth), on every platform.
- ``"pallas"``: the Pallas kernel; on a TPU or GPU it is compiled for it, on CPU it runs in
  Pallas' interpreter (the TPU kernel, slowly: for tests). Arguments the kernel does not support
  raise ``ValueError`` with the reason.
- ``"auto"``: the kernel on TPU and GPU when it supports the arguments, else XLA (always XLA
  on CPU).

Under an active mesh (``jax.set_mesh``), the kernels run inside ``jax.shard_map``: batch split
over the ``data`` and ``fsdp`` axes, heads over ``tensor`` (each only when present, larger than
one and dividing the dim), replicated over any other axis. A Pallas kernel is an opaque custom
call to XLA's partitioner, which would otherwise gather its inputs onto every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec

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
    """Keep the leading (batch) axis of an activation split over the active mesh's batch axes.

    Used at block boundaries so that XLA never gathers the batch; a no-op without a mesh or
    when the batch does not divide."""
    partition = mesh_partition(x.shape[0], 1)
    if partition is None or partition[0] is None:
        return x
    spec = PartitionSpec(partition[0], *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)
