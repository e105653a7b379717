"""Memory planning: per-device bytes of a training or generation run on a mesh, before running it.

- parameters and optimizer state: exact, from every leaf's shape, dtype and the sharding rules
  (``jaxbased.sharding``); a dimension a mesh axis does not divide stays whole, as in training;
- activations: the temporary buffers XLA assigns to one train step, from ``memory_analysis()``
  (``temp_size_in_bytes``). When this host has as many devices as the mesh, the step is the one
  ``train`` runs: compiled for the mesh with the state's shardings, so the number is what XLA
  assigns to one device of this backend. Otherwise it is the step of the per-device batch
  (``batch / (data * fsdp)`` sequences) compiled for one device, an estimate: on 8 CPU devices,
  for a 3-layer BASED model with ``seq_len`` 8, 32 and 128, it came to 0.88-1.11x the sharded
  step's on data- or FSDP-only meshes (the sharded step also holds gradient all-reduce and
  gathered-parameter buffers), 1.5-1.7x on a (2, 2, 2) mesh and 3.3-3.7x with tensor parallelism
  8 (which splits the activations further); ``tests/test_sharding.py`` checks two of these.
  With ``sequence`` = n the one-device step is that of a slice, ``T / n`` tokens, plus what the
  time-split mixers hold beyond it (boundary states and halos, the slice states' feature maps:
  :mod:`jaxbased.sequence_memory`); ``tests/test_plan_sequence.py`` checks it against the
  sharded step for n = 1, 2, 4, 8;
- caches: the generation cache of ``generate_batch`` sequences of ``max_len`` tokens, split over
  the batch axes (linear-attention and window states do not grow with ``max_len``).

Nothing is allocated: shapes come from ``jax.eval_shape``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxbased.config import ModelConfig
from jaxbased.model import LanguageModel
from jaxbased.sharding import (
    LOGICAL_RULES,
    MESH_AXES,
    SEQUENCE_AXIS,
    mesh_sizes_as_given,
    resolve_mesh_shape,
)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of each part of a run."""

    mesh: dict[str, int]
    parameters: int
    optimizer_state: int
    activations: int | None
    caches: int
    batch_per_device: int
    #: How ``activations`` was found: "sharded step" (compiled for the mesh on this host's
    #: devices), "one-device estimate" (the per-device batch on one device) or "not computed".
    activations_source: str = "not computed"
    #: Bytes one device sends over the ``sequence`` axis per train step (states and halos,
    #: forward and backward; 0 without the axis). Not memory: shown beside it.
    sequence_traffic: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer_state + (self.activations or 0) + self.caches

    def table(self) -> str:
        rows = [
            ("parameters", self.parameters),
            ("optimizer state", self.optimizer_state),
            (f"activations ({self.activations_source})", self.activations),
            ("generation caches", self.caches),
            ("total", self.total),
        ]
        mesh = " x ".join(f"{axis} {size}" for axis, size in self.mesh.items())
        lines = [f"per-device memory on mesh {mesh} ({self.batch_per_device} sequences/device)"]
        for name, value in rows:
            shown = "not computed" if value is None else f"{value / 2**20:12.2f} MiB"
            lines.append(f"  {name:<30} {shown}")
        if self.sequence_traffic:
            lines.append(
                f"  {'sent over sequence per step':<30} {self.sequence_traffic / 2**20:12.2f} MiB"
                " (states and halos, not memory)"
            )
        return "\n".join(lines)


def _mesh_sizes(mesh_shape: Mapping[str, int] | Sequence[int], device_count: int | None) -> dict:
    if device_count is None:
        sizes = mesh_sizes_as_given(mesh_shape)
        if any(size < 1 for size in sizes):
            raise ValueError(f"mesh {sizes}: give every size (no -1) when planning")
        device_count = math.prod(sizes)
    return dict(zip(MESH_AXES, resolve_mesh_shape(mesh_shape, device_count), strict=True))


def _shard_bytes(abstract_boxed: Any, mesh: dict[str, int]) -> int:
    """Sum over leaves of the bytes of one shard (the largest, when a split is uneven)."""
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), LOGICAL_RULES)
    leaves = nn.meta.unbox(abstract_boxed)
    total = 0
    for spec, leaf in zip(
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        jax.tree.leaves(leaves),
        strict=True,
    ):
        shape = list(leaf.shape)
        for index, axes in enumerate(tuple(spec)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            parts = math.prod(mesh[axis] for axis in axes)
            if shape[index] % parts == 0:
                shape[index] //= parts
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def plan_memory(
    config: ModelConfig,
    mesh_shape: Mapping[str, int] | Sequence[int],
    *,
    seq_len: int,
    batch_size: int,
    optimizer: Any = None,
    generate_batch: int = 1,
    max_len: int | None = None,
    activations: bool = True,
    device_count: int | None = None,
    on_mesh: bool | None = None,
) -> MemoryPlan:
    """The per-device :class:`MemoryPlan` of ``config`` on a ``(data, fsdp, tensor, sequence)``
    mesh (three sizes: ``sequence`` 1).

    ``batch_size`` is the global training batch (sequences); ``max_len`` (default ``seq_len``) the
    generation length. ``optimizer`` defaults to the training optimizer (AdamW + clipping).
    Parameters and optimizer state are replicated over ``sequence``. A ``sequence`` size the
    model or ``seq_len`` cannot split raises ``ValueError`` before any compile
    (:func:`jaxbased.sequence_sharding.check_sequence_sharding`). ``on_mesh`` chooses how the
    activations are found: True compiles the step for the mesh on this host's devices, False the
    one-device estimate, None (default) the former when this host has the mesh's devices.
    """
    import optax

    from jaxbased.sequence_memory import sequence_bytes
    from jaxbased.sequence_sharding import check_sequence_sharding
    from jaxbased.training.optimizer import make_optimizer

    mesh = _mesh_sizes(mesh_shape, device_count)
    check_sequence_sharding(config, mesh[SEQUENCE_AXIS], seq_len)
    batch_shards = mesh["data"] * mesh["fsdp"]
    if batch_size % batch_shards:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by data x fsdp = {batch_shards}"
        )
    optimizer = optimizer or make_optimizer(optax.constant_schedule(1e-3))
    model = LanguageModel(config)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    boxed_params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    boxed_opt_state = jax.eval_shape(optimizer.init, boxed_params)
    per_device_batch = batch_size // batch_shards
    sequence = sequence_bytes(
        config, shards=mesh[SEQUENCE_AXIS], seq_len=seq_len, tensor=mesh["tensor"]
    )

    activation_bytes, activations_source = None, "not computed"
    if activations:
        schedule = optax.constant_schedule(1e-3)
        if on_mesh is None:
            on_mesh = jax.device_count() >= math.prod(mesh.values())
        if on_mesh:
            analysis = _sharded_step_analysis(
                model, optimizer, schedule, mesh, seq_len=seq_len, batch_size=batch_size
            )
            activations_source = "sharded step"
        else:
            analysis = _one_device_step_analysis(
                model,
                optimizer,
                schedule,
                seq_len=sequence.slice_tokens,
                batch_size=per_device_batch,
            )
            activations_source = "one-device estimate"
        if analysis is not None:
            activation_bytes = int(analysis.temp_size_in_bytes)
            if activations_source == "one-device estimate":
                activation_bytes += per_device_batch * sequence.memory_per_row
        else:
            activations_source = "not computed"

    cache = jax.eval_shape(lambda: model.init_cache(generate_batch, max_len or seq_len))
    cache_bytes = sum(
        math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)
    )
    return MemoryPlan(
        mesh=mesh,
        parameters=_shard_bytes(boxed_params, mesh),
        optimizer_state=_shard_bytes(boxed_opt_state, mesh),
        activations=activation_bytes,
        caches=cache_bytes // batch_shards if generate_batch % batch_shards == 0 else cache_bytes,
        batch_per_device=per_device_batch,
        activations_source=activations_source,
        sequence_traffic=per_device_batch * sequence.sent_per_row,
    )


def _one_device_step_analysis(
    model: LanguageModel, optimizer: Any, schedule: Any, *, seq_len: int, batch_size: int
) -> Any:
    """``memory_analysis()`` of the train step of ``batch_size`` sequences on one device."""
    from jaxbased.training.state import TrainState
    from jaxbased.training.steps import make_train_step

    step = make_train_step(model, optimizer, schedule)
    state = jax.eval_shape(
        lambda: TrainState.create(
            nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]),
            optimizer,
        )
    )
    batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
    return step.lower(state, batch).compile().memory_analysis()


def _sharded_step_analysis(
    model: LanguageModel,
    optimizer: Any,
    schedule: Any,
    mesh: dict[str, int],
    *,
    seq_len: int,
    batch_size: int,
) -> Any:
    """``memory_analysis()`` of :func:`compile_sharded_step`."""
    return compile_sharded_step(
        model, optimizer, schedule, mesh, seq_len=seq_len, batch_size=batch_size
    ).memory_analysis()


def compile_sharded_step(
    model: LanguageModel,
    optimizer: Any,
    schedule: Any,
    mesh: dict[str, int],
    *,
    seq_len: int,
    batch_size: int,
) -> Any:
    """The train step as ``train`` compiles it for ``mesh`` (sizes by axis, on this host's first
    devices): the state sharded by its logical axes, the ``[batch_size, seq_len + 1]`` int32
    batch over data x fsdp. Returns the ``jax.stages.Compiled``."""
    from jaxbased.sharding import batch_sharding, logical_shardings, make_mesh, with_shardings
    from jaxbased.training.state import TrainState
    from jaxbased.training.steps import make_train_step

    device_mesh = make_mesh([mesh[axis] for axis in MESH_AXES])

    def boxed_state() -> TrainState:
        params = model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    abstract = jax.eval_shape(boxed_state)
    shardings = logical_shardings(abstract, device_mesh)
    batch = batch_sharding(device_mesh)
    step = make_train_step(
        model, optimizer, schedule, state_shardings=shardings, batch_sharding=batch
    )
    state = with_shardings(abstract, shardings)  # unboxed outside the rules' context
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32, sharding=batch)
    with jax.set_mesh(device_mesh), nn.logical_axis_rules(LOGICAL_RULES):
        lowered = step.lower(state, tokens)
    return lowered.compile()
