"""Runs in a subprocess with 8 simulated CPU devices (set before JAX starts); used by
tests/test_sequence_parallel.py. Compares the sequence-sharded ops and a BASED model's loss and
gradients with one device, counts the collectives of a compiled train step, and prints one JSON
line with what it measured."""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys

if __name__ == "__main__":  # before JAX starts; importing this module changes nothing
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jaxbased import LanguageModel, ModelConfig

#: Meshes (data, fsdp, tensor, sequence): the sequence axis alone and with the others.
#: The ops cover sequence = 2, 4, 8 alone and with data x tensor; the model 8 alone and 4 and 2
#: with the other axes (each model compile takes seconds on a CI machine).
OP_MESHES = [(1, 1, 1, 2), (1, 1, 1, 4), (1, 1, 1, 8), (2, 1, 2, 2)]
MODEL_MESHES = [(1, 1, 1, 8), (2, 1, 1, 4), (1, 2, 2, 2)]
#: Train steps whose collectives are counted: sequence alone and with data.
HLO_MESHES = [(2, 1, 1, 4)]

#: A BASED model with one layer of each of its mixers; T = 72 is 4.5 chunks of 16 and splits
#: into 9-token slices on 8 shards (the window's 7 earlier keys and the conv's 2 inputs fit).
SEQ_LEN = 72
BASED_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=3,
    layer_pattern=("base_conv", "based", "sliding_window"),
    based=dict(heads=4, feature_dim=4, chunk_size=16),
    sliding_window=dict(heads=4, window=8),
    mlp=dict(inner_dim=64),
)
#: The decayed linear-attention family (RetNet decay, Mamba-2's SSD, TransNormerLLM with LRPE in
#: its first layer) on the same length: per-head and per-step decays across slices.
DECAY_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=3,
    layer_pattern=("decay_attention", "mamba2", "transnormer"),
    decay_attention=dict(heads=4, chunk_size=16),
    mamba2=dict(state_dim=8, head_dim=16, chunk_size=16),
    transnormer=dict(heads=4, chunk_size=16),
)
#: Meshes the decay model runs on (one compile each).
DECAY_MODEL_MESHES = [(2, 1, 1, 4)]


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def tree_error(actual, expected) -> float:
    """The largest relative error of any leaf (each leaf against its own largest entry)."""
    pairs = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    return max(relative_error(a, b) for a, b in pairs)


def mesh_name(shape) -> str:
    return "x".join(map(str, shape))


def op_cases() -> dict:
    """Value and gradients of each sharded op under every mesh vs no mesh."""
    from jaxbased.ops import linear_attention, short_conv, sliding_window_attention
    from jaxbased.ops.ssd import ssd
    from jaxbased.sharding import make_mesh

    rng = np.random.default_rng(0)
    batch, heads = 2, 4

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

    q, k = normal(batch, SEQ_LEN, heads, 4, scale=0.5), normal(batch, SEQ_LEN, heads, 4, scale=0.5)
    v = normal(batch, SEQ_LEN, heads, 8)
    x, weight = normal(batch, SEQ_LEN, 16), normal(3, 16)
    head_decay = jnp.asarray(np.log([0.5, 0.8, 0.95, 0.999]), jnp.float32)  # per head
    # SSD: 4 heads of 8 channels reading 2 groups of B and C, per-step decays exp(dt a).
    ssd_x, ssd_b, ssd_c = (
        normal(batch, SEQ_LEN, heads, 8),
        normal(batch, SEQ_LEN, 2, 4),
        normal(batch, SEQ_LEN, 2, 4),
    )
    ssd_dt = jnp.asarray(rng.uniform(0.05, 0.6, (batch, SEQ_LEN, heads)), jnp.float32)
    ssd_a = jnp.asarray([-0.5, -1.0, -2.0, -4.0], jnp.float32)
    ops = {
        "linear_attention": (lambda q, k, v: linear_attention(q, k, v, chunk_size=16), (q, k, v)),
        "decay_attention": (
            lambda q, k, v, d: linear_attention(
                q, k, v, chunk_size=16, log_decay=d, normalize=False
            ),
            (q, k, v, head_decay),
        ),
        "ssd": (
            lambda x, dt, b, c: ssd(x, dt, ssd_a, b, c, chunk_size=16),
            (ssd_x, ssd_dt, ssd_b, ssd_c),
        ),
        "sliding_window": (lambda q, k, v: sliding_window_attention(q, k, v, window=9), (q, k, v)),
        "short_conv": (short_conv, (x, weight)),
    }
    errors: dict = {}
    for name, (op, inputs) in ops.items():

        def loss(*args, op=op):
            return jnp.sum(jnp.sin(op(*args)))

        grad = jax.value_and_grad(loss, argnums=tuple(range(len(inputs))))
        expected = jax.jit(grad)(*inputs)
        errors[name] = {}
        for shape in OP_MESHES:
            with jax.set_mesh(make_mesh(shape)):
                actual = jax.jit(grad)(*inputs)
            errors[name][mesh_name(shape)] = tree_error(actual, expected)
    return errors


def model_loss_and_grads(model: LanguageModel, params, batch):
    from jaxbased.training.steps import token_losses

    def loss(params):
        return token_losses(model, params, batch)[0].mean()

    return jax.value_and_grad(loss)(params)


def model_cases(fields: dict = BASED_MODEL, meshes: list = MODEL_MESHES) -> dict:
    """A model's loss and gradients on every mesh vs one device."""
    from flax import linen as nn

    from jaxbased.sharding import LOGICAL_RULES, batch_sharding, logical_shardings, make_mesh

    model = LanguageModel(ModelConfig.from_dict(fields))
    boxed = model.init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]
    params = nn.meta.unbox(boxed)
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(4, SEQ_LEN + 1)), jnp.int32)
    step = jax.jit(lambda params, batch: model_loss_and_grads(model, params, batch))
    expected_loss, expected_grads = step(params, batch)
    report: dict = {"loss": {}, "grads": {}}
    for shape in meshes:
        mesh = make_mesh(shape)
        shardings = logical_shardings(jax.eval_shape(lambda: boxed), mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            placed = jax.device_put(params, shardings)
            loss, grads = step(placed, jax.device_put(batch, batch_sharding(mesh)))
        report["loss"][mesh_name(shape)] = relative_error(loss, expected_loss)
        report["grads"][mesh_name(shape)] = tree_error(grads, expected_grads)
    return report


def collective_counts(hlo: str) -> dict:
    """The collectives of compiled HLO text (an async start/done pair counts once).

    ``permutes_by_layer``: collective-permutes inside each layer's ``shard_map`` (forward and
    backward), by the layer named in their metadata; ``other_permutes``: the element type of
    every other collective-permute; ``all_gather``, ``all_to_all``, ``reduce_scatter``: counts;
    ``psums_by_layer``: all-reduces of a layer's ``shard_map`` transpose (the gradient of a
    parameter it reads whole); ``all_reduce``: the other all-reduces. All-reduces whose replica
    groups hold one device each are left out: XLA keeps the transpose's psums over size-1
    axes, which move nothing.
    """
    report: dict = {
        "permutes_by_layer": {},
        "other_permutes": [],
        "psums_by_layer": {},
        "all_reduce": 0,
    }
    for kind in ("all-gather", "all-to-all", "reduce-scatter"):
        report[kind.replace("-", "_")] = 0
    kinds = "all-gather|all-to-all|reduce-scatter|all-reduce|collective-permute"
    for line in hlo.splitlines():
        match = re.search(rf"= \(?(\w+)\[.*? ({kinds})(?:-start)?\(", line)
        if not match:
            continue
        element, kind = match.group(1), match.group(2)
        if kind == "collective-permute":
            layer = re.search(r"/(layers_\d+)/mixer/\S*shard_map/ppermute", line)
            if layer:
                name = layer.group(1)
                report["permutes_by_layer"][name] = report["permutes_by_layer"].get(name, 0) + 1
            else:
                report["other_permutes"].append(element)
        elif kind == "all-reduce":
            groups = re.search(r"replica_groups=\{\{([0-9,{}]*)\}\}", line)
            alone = groups is not None and all(
                "," not in group for group in groups.group(1).split("},{")
            )
            layer = re.search(r"/(layers_\d+)/mixer/\S*shard_map/psum", line)
            if alone:
                continue
            if layer:  # the gradient of a parameter a shard_map reads whole
                name = layer.group(1)
                report["psums_by_layer"][name] = report["psums_by_layer"].get(name, 0) + 1
            else:
                report["all_reduce"] += 1
        else:
            report[kind.replace("-", "_")] += 1
    return report


def compiled_train_steps(fields: dict, meshes: list) -> dict:
    """``{mesh name: HLO text}`` of the compiled train step (as ``train`` builds it) of the
    model ``fields`` on every mesh, and ``parameter_leaves``: its parameter count in leaves."""
    from flax import linen as nn

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

    model = LanguageModel(ModelConfig.from_dict(fields))
    schedule = learning_rate_schedule(peak=1e-3, final=0, warmup_steps=0, total_steps=2)
    optimizer = make_optimizer(schedule)

    def boxed() -> TrainState:
        params = model.init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    abstract = jax.eval_shape(boxed)
    report: dict = {"parameter_leaves": len(jax.tree.leaves(nn.meta.unbox(abstract.params)))}
    for shape in meshes:
        mesh = make_mesh(shape)
        shardings = logical_shardings(abstract, mesh)
        batch = batch_sharding(mesh)
        step = make_train_step(
            model, optimizer, schedule, state_shardings=shardings, batch_sharding=batch
        )
        tokens = jax.ShapeDtypeStruct((4, SEQ_LEN + 1), jnp.int32, sharding=batch)
        state = with_shardings(abstract, shardings)
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            report[mesh_name(shape)] = step.lower(state, tokens).compile().as_text()
    return report


def hlo_cases() -> dict:
    """Collectives of the compiled train step (as ``train`` builds it) on sequence meshes."""
    report = compiled_train_steps(BASED_MODEL, HLO_MESHES)
    for shape in HLO_MESHES:
        report[mesh_name(shape)] = collective_counts(report[mesh_name(shape)])
    return report


def bad_input_cases(data: pathlib.Path) -> dict:
    """``train`` refuses sizes it cannot split, before it compiles anything."""
    from jaxbased.training.loop import train
    from tests.test_training import tiny_config

    messages = {}
    cases = {"seq_len": dict(seq_len=30, sequence=4), "window": dict(seq_len=48, sequence=8)}
    for name, case in cases.items():
        config = tiny_config(data, num_steps=1)
        config.model.update(BASED_MODEL)
        config.data.seq_len = case["seq_len"]
        config.mesh.update(data=1, sequence=case["sequence"])
        try:
            train(config, data.parent / f"refused_{name}")
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


if __name__ == "__main__":
    import time

    data_path = pathlib.Path(sys.argv[1])
    result, seconds = {}, {}
    for name, case in [
        ("ops", op_cases),
        ("model", model_cases),
        ("decay_model", lambda: model_cases(DECAY_MODEL, DECAY_MODEL_MESHES)),
        ("hlo", hlo_cases),
        ("bad_input", lambda: bad_input_cases(data_path)),
    ]:
        start = time.perf_counter()
        result[name] = case()
        seconds[name] = round(time.perf_counter() - start, 1)
    result["seconds"] = seconds
    print("RESULT " + json.dumps(result), flush=True)
