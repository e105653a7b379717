"""Runs in a subprocess with 8 simulated CPU devices (set before JAX starts); used by
tests/test_sharding.py. Prints one JSON line with what it measured."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

if __name__ == "__main__":  # before JAX starts; importing this module changes nothing
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from jaxbased.training.checkpointing import load_for_inference
from jaxbased.training.loop import train
from tests.test_training import tiny_config

# Every dimension the rules split is divisible by 8, so each mesh really splits the arrays.
SHARDABLE_MODEL = dict(
    d_model=64,
    mlp=dict(inner_dim=128),
    based=dict(heads=8, feature_dim=4),
    sliding_window=dict(heads=8),
)


def config_for(data: pathlib.Path, mesh: tuple[int, int, int], steps: int, **train):
    config = tiny_config(data, num_steps=steps, **train)
    config.model.update(SHARDABLE_MODEL)
    config.data.batch_size = 8
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return config


def losses(workdir: pathlib.Path) -> list[float]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["split"] == "train"]


def max_param_difference(a: pathlib.Path, b: pathlib.Path) -> float:
    _, params_a, _ = load_for_inference(a)
    _, params_b, _ = load_for_inference(b)
    leaves = zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True)
    return max(float(np.max(np.abs(x - y))) for x, y in leaves)


def meshes(data: pathlib.Path, out: pathlib.Path) -> dict:
    """4 steps on one device and on every mesh; then the (1, 8, 1) run's step-2 checkpoint is
    continued on a (2, 2, 2) mesh and compared with the straight (1, 8, 1) run."""
    report: dict = {"losses": {}, "param_difference": {}}
    reference = out / "1x1x1"
    train(config_for(data, (1, 1, 1), 4, checkpoint_every=2), reference)
    report["losses"]["1x1x1"] = losses(reference)
    for mesh in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)]:
        name = "x".join(map(str, mesh))
        train(config_for(data, mesh, 4, checkpoint_every=2), out / name)
        report["losses"][name] = losses(out / name)
        report["param_difference"][name] = max_param_difference(out / name, reference)
    switched = out / "switched"
    shutil.copytree(out / "1x8x1", switched)
    shutil.rmtree(switched / "checkpoints" / "4")
    (switched / "metrics.jsonl").write_text(
        "".join(
            line + "\n"
            for line in (out / "1x8x1" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= 2
        )
    )
    train(config_for(data, (2, 2, 2), 4, checkpoint_every=2), switched)
    report["reshard"] = {
        "straight": losses(out / "1x8x1"),
        "switched": losses(switched),
        "param_difference": max_param_difference(out / "1x8x1", switched),
    }
    return report


def train_step_temp_bytes(
    config, mesh_shape: tuple[int, int, int], seq_len: int, batch_size: int
) -> int:
    """XLA's temporary bytes per device of the train step built as ``train`` builds it (its
    schedule and optimizer, state sharded by logical axes, batch over data x fsdp)."""
    from flax import linen as nn

    from jaxbased import LanguageModel, ModelConfig
    from jaxbased.sharding import (
        LOGICAL_RULES,
        batch_sharding,
        logical_shardings,
        make_mesh,
        with_shardings,
    )
    from jaxbased.training.optimizer import learning_rate_schedule, make_optimizer
    from jaxbased.training.state import TrainState
    from jaxbased.training.steps import make_train_step

    model = LanguageModel(ModelConfig.from_dict(config.model))
    schedule = learning_rate_schedule(peak=1e-3, final=0, warmup_steps=0, total_steps=2)
    optimizer = make_optimizer(schedule)
    mesh = make_mesh(mesh_shape)

    def boxed() -> TrainState:
        params = model.init(jax.random.key(0), jax.numpy.zeros((1, seq_len), "int32"))["params"]
        return TrainState(
            step=jax.numpy.zeros((), "int32"), params=params, opt_state=optimizer.init(params)
        )

    abstract = jax.eval_shape(boxed)
    state_shardings = logical_shardings(abstract, mesh)
    batch = batch_sharding(mesh)
    step = make_train_step(
        model, optimizer, schedule, state_shardings=state_shardings, batch_sharding=batch
    )
    state = with_shardings(abstract, state_shardings)
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len + 1), "int32", sharding=batch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        compiled = step.lower(state, tokens).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def shardings(data: pathlib.Path, out: pathlib.Path) -> dict:
    """The partition spec of some parameters and their Adam moments on a (2, 2, 2) mesh."""
    from flax import linen as nn

    from jaxbased import LanguageModel, ModelConfig
    from jaxbased.sharding import logical_shardings, make_mesh
    from jaxbased.training.optimizer import learning_rate_schedule, make_optimizer
    from jaxbased.training.state import TrainState

    config = config_for(data, (2, 2, 2), 1)
    model = LanguageModel(ModelConfig.from_dict(config.model))
    optimizer_schedule = learning_rate_schedule(peak=1e-3, final=0, warmup_steps=0, total_steps=2)
    optimizer = make_optimizer(optimizer_schedule)
    mesh = make_mesh((2, 2, 2))

    def boxed():
        params = model.init(jax.random.key(0), jax.numpy.zeros((1, 8), "int32"))["params"]
        return TrainState(
            step=jax.numpy.zeros((), "int32"), params=params, opt_state=optimizer.init(params)
        )

    abstract = jax.eval_shape(boxed)
    specs = logical_shardings(abstract, mesh)
    state = jax.jit(lambda: nn.meta.unbox(boxed()), out_shardings=specs)()
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    picks = {
        "embedding": state.params["embedding"],
        "qkv_kernel": state.params["layers_2"]["mixer"]["qkv_proj"]["kernel"],
        "qkv_kernel_mu": adam.mu["layers_2"]["mixer"]["qkv_proj"]["kernel"],
        "fc2_kernel_nu": adam.nu["layers_0"]["mlp"]["fc2"]["kernel"],
        "norm_weight": state.params["layers_0"]["norm1"]["weight"],
        "conv_weight": state.params["layers_0"]["mixer"]["conv_weight"],
    }
    from jaxbased.planning import plan_memory

    def device_bytes(tree) -> int:  # what device 0 really holds
        return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))

    plan = plan_memory(
        ModelConfig.from_dict(config.model),
        (2, 2, 2),
        seq_len=8,
        batch_size=8,
        optimizer=optimizer,
        generate_batch=4,
        max_len=64,
    )
    cache = LanguageModel(ModelConfig.from_dict(config.model)).init_cache(4, 64)
    planning = {
        "planned_parameters": plan.parameters,
        "real_parameters": device_bytes(state.params),
        "planned_optimizer_state": plan.optimizer_state,
        "real_optimizer_state": device_bytes(state.opt_state),
        "planned_caches": plan.caches,
        "real_caches_per_device": sum(leaf.nbytes for leaf in jax.tree.leaves(cache)) // 4,
        "planned_activations": plan.activations,
        "planned_activations_source": plan.activations_source,
        "real_activations": train_step_temp_bytes(config, (2, 2, 2), 8, 8),
        "one_device_estimate_ratio": {},
    }
    # The estimate for meshes larger than the host: the per-device batch on one device.
    from jaxbased.planning import _one_device_step_analysis

    for shape in [(8, 1, 1), (1, 1, 8)]:
        estimate = _one_device_step_analysis(
            model, optimizer, optimizer_schedule, seq_len=8, batch_size=8 // (shape[0] * shape[1])
        ).temp_size_in_bytes
        ratio = estimate / train_step_temp_bytes(config, shape, 8, 8)
        planning["one_device_estimate_ratio"]["x".join(map(str, shape))] = ratio
    from jaxbased.generation import generate

    prompts = [[5, 6, 7], [8, 9]]
    on_mesh = generate(model, state.params, prompts, max_new_tokens=6, temperature=0.0)
    local = jax.device_get(state.params)
    on_host = generate(model, local, prompts, max_new_tokens=6, temperature=0.0)
    planning["generate_sharded_equals_local"] = on_mesh.tokens == on_host.tokens
    return planning | {
        name: {
            "spec": [list(a) if isinstance(a, tuple) else a for a in array.sharding.spec],
            "shard_shape": list(array.addressable_shards[0].data.shape),
            "shape": list(array.shape),
        }
        for name, array in picks.items()
    }


if __name__ == "__main__":
    mode, data_path, output = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    result = {"meshes": meshes, "shardings": shardings}[mode](data_path, output)
    print("RESULT " + json.dumps(result), flush=True)
