"""Device meshes and the rules that map logical axis names to mesh axes.

The mesh has four axes, ``("data", "fsdp", "tensor", "sequence")``:

- ``data``: pure data parallelism (batch split, parameters replicated);
- ``fsdp``: batch split *and* parameters / optimizer state split along their ``embed`` axis
  (fully sharded data parallelism, gathered by XLA where used);
- ``tensor``: heads, MLP and conv channels and the vocabulary split (tensor parallelism);
- ``sequence``: the time axis of activations split into contiguous slices (sequence
  parallelism; parameters replicated over it). The mixers exchange only what crosses a slice
  boundary (:mod:`jaxbased.ops.sequence_parallel`, docs/sequence_parallelism.md). Size 1 (the
  default) changes nothing.

Parameters carry logical names (``nn.with_logical_partitioning`` in the layers); ``LOGICAL_RULES``
maps them to mesh axes. A dimension that a mesh axis does not divide is left unsplit on that axis
(``fit_to_shape``), so small models still run on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, str, str, str] = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")
#: The mesh axis that splits the time axis of activations.
SEQUENCE_AXIS = "sequence"

#: Logical axis name -> mesh axes. Names not listed are replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_channels", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("feature", None),
    ("norm", None),
    ("conv_kernel", None),
    ("layers", None),  # the leading axis of scanned layers' stacked parameters
)


def mesh_sizes_as_given(shape: Mapping[str, int] | Sequence[int]) -> list[int]:
    """Sizes of ``MESH_AXES`` as written, before -1 is filled: a mapping names some axes (a
    missing one is 1), a sequence gives ``(data, fsdp, tensor)`` or all four sizes (three:
    ``sequence`` is 1). Raises ``ValueError`` naming an unknown axis or a wrong count."""
    if isinstance(shape, Mapping) or hasattr(shape, "keys"):  # a dict or a ConfigDict
        unknown = sorted(set(shape.keys()) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"mesh has unknown axes {unknown}; allowed: {MESH_AXES}")
        return [int(shape[axis]) if axis in shape else 1 for axis in MESH_AXES]
    sizes = [int(size) for size in shape]
    if len(sizes) == len(MESH_AXES) - 1:
        sizes.append(1)
    if len(sizes) != len(MESH_AXES):
        raise ValueError(
            f"mesh shape {sizes} must give sizes for {MESH_AXES} (or the first three of them)"
        )
    return sizes


def resolve_mesh_shape(
    shape: Mapping[str, int] | Sequence[int], device_count: int
) -> tuple[int, ...]:
    """Sizes of ``(data, fsdp, tensor, sequence)``; one size may be -1 (fill the remaining
    devices). ``shape`` is read by :func:`mesh_sizes_as_given`.

    A mesh may use fewer devices than there are (the first ones). Raises ``ValueError`` naming
    the shape when it needs more than ``device_count``.
    """
    sizes = mesh_sizes_as_given(shape)
    if any(size == 0 or size < -1 for size in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {sizes}: sizes must be >= 1, with at most one -1 (fill)")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if device_count % known:
            raise ValueError(f"mesh shape {sizes} cannot fill {device_count} devices")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) > device_count:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} "
            f"devices; {device_count} are available"
        )
    return tuple(sizes)


def make_mesh(
    shape: Mapping[str, int] | Sequence[int], devices: Sequence[Any] | None = None
) -> Mesh:
    """A ``("data", "fsdp", "tensor", "sequence")`` mesh over the first devices of ``devices``
    (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    chosen = devices[: math.prod(sizes)]
    return Mesh(np.asarray(chosen, dtype=object).reshape(sizes), MESH_AXES)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        return mesh.shape[axes]
    return math.prod(mesh.shape[axis] for axis in axes)


def fit_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """``spec`` with every mesh axis that does not divide its dimension dropped (replicated)."""
    fitted = []
    for index, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is not None and shape[index] % _axis_size(mesh, axes):
            axes = None
        fitted.append(axes)
    return PartitionSpec(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """``NamedSharding`` of every leaf of a (boxed) abstract pytree, from its logical names.

    ``abstract_tree`` is what ``jax.eval_shape`` gives for a tree holding ``nn.Partitioned``
    boxes (parameters, or optimizer state built from boxed parameters); unboxed leaves are
    replicated. The result has the structure of the unboxed tree.
    """
    logical_specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    shapes = nn.meta.unbox(abstract_tree)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, fit_to_shape(spec, leaf.shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches ``[B, ...]`` are split over ``data`` and ``fsdp``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def token_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches ``[B, n (L + 1)]`` (slice windows, :mod:`jaxbased.data.sequence_slices`)
    are split over ``data`` and ``fsdp`` by rows and over ``sequence`` by time slices."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, SEQUENCE_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves carrying ``shardings`` (targets for a sharded restore)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        nn.meta.unbox(abstract_tree),
        shardings,
    )


def global_batch(local_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global batch array from this process's rows (each process passes its own part)."""
    return jax.make_array_from_process_local_data(sharding, local_batch)
