"""Runs in a subprocess with 8 simulated CPU devices (set before JAX starts); used by
tests/test_sequence_parallel_scan.py. Compares the sequence-sharded selective scan and EMA, and
Mamba-1 and SeqBoat models' loss and gradients (SeqBoat also with the window kernel per shard),
with one device, counts the collectives of their compiled train steps, and prints one JSON line
with what it measured."""

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
from tests.sequence_worker import (
    SEQ_LEN,
    collective_counts,
    compiled_train_steps,
    mesh_name,
    model_cases,
    relative_error,
    tree_error,
)

#: Meshes (data, fsdp, tensor, sequence) of the op checks: sequence 2, 4, 8 alone and with
#: data x tensor (the selective scan's channels split over tensor).
OP_MESHES = [(1, 1, 1, 2), (1, 1, 1, 4), (1, 1, 1, 8), (2, 1, 2, 2)]
#: Model meshes: sequence 8 alone and 2 with fsdp x tensor (each compile takes seconds; the
#: collective counts compile data 2 x sequence 4 too).
MODEL_MESHES = [(1, 1, 1, 8), (1, 2, 2, 2)]
#: Train steps whose collectives are counted.
HLO_MESHES = [(2, 1, 1, 4)]

#: Mamba-1 layers (T = 72: 9-token slices on 8 shards, not whole chunks of 16; the conv's 3
#: earlier inputs fit).
MAMBA_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    layer_pattern=("mamba", "mamba"),
    use_mlp=False,
    mamba=dict(state_dim=8, chunk_size=16),
)

#: SeqBoat layers on the same length: capacity 36 of 72 packed slots (capacity_bucket 1), a
#: window of 8 packed keys. The first layer's router is biased towards inactive
#: (:data:`SPARSE_ROUTER_BIAS`: about a quarter of the tokens active, two per 9-token slice,
#: so a query's 7 earlier keys come from several earlier slices); the second keeps its init
#: (about 70% active: tokens beyond the capacity are dropped).
SEQBOAT_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    layer_pattern=("seqboat", "seqboat"),
    use_mlp=False,
    residual_activation="silu",
    seqboat=dict(
        ema_dim=4,
        attention_dim=16,
        window=8,
        capacity_fraction=0.5,
        capacity_bucket=1,
        ema_chunk_size=16,
    ),
)
#: Added to the first SeqBoat layer's "inactive" router logit.
SPARSE_ROUTER_BIAS = 0.1
#: One SeqBoat layer with ``implementation="pallas"`` (the window kernel per shard,
#: interpreted), its router biased as the sparse layer's: about a quarter of the tokens active,
#: so that the 7 earlier packed keys come from several slices, and a capacity of 15 packed
#: slots (a fifth of 72) below the ~17 active tokens of a row, so that some are dropped. One
#: layer covers both: each compile of the interpreted kernels takes tens of seconds.
SEQBOAT_KERNEL_MODEL = dict(
    SEQBOAT_MODEL,
    num_layers=1,
    layer_pattern=("seqboat",),
    implementation="pallas",
    seqboat=dict(SEQBOAT_MODEL["seqboat"], capacity_fraction=0.2),
)
#: Meshes of the kernel model: sequence 2, 4 (with data) and 8.
KERNEL_MODEL_MESHES = [(1, 1, 1, 2), (2, 1, 1, 4), (1, 1, 1, 8)]


def op_cases() -> dict:
    """Value and gradients of each sharded op under every mesh vs no mesh."""
    from jaxbased.ops.ema import multi_head_ema
    from jaxbased.ops.selective_scan import selective_scan
    from jaxbased.sharding import make_mesh

    rng = np.random.default_rng(0)
    batch, channels, state = 2, 8, 4

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

    u, b, c = (
        normal(batch, SEQ_LEN, channels),
        normal(batch, SEQ_LEN, state),
        normal(batch, SEQ_LEN, state),
    )
    delta = jnp.asarray(rng.uniform(0.01, 0.5, (batch, SEQ_LEN, channels)), jnp.float32)
    a = -jnp.asarray(rng.uniform(0.5, 4.0, (channels, state)), jnp.float32)
    x = normal(batch, SEQ_LEN, channels)
    ema_decay = jnp.asarray(rng.uniform(0.5, 0.99, (channels, state)), jnp.float32)
    ema_in, ema_out = normal(channels, state), normal(channels, state, scale=0.5)
    ops = {
        "selective_scan": (
            lambda *args: selective_scan(*args, chunk_size=16),
            (u, delta, a, b, c),
        ),
        "ema": (
            lambda *args: multi_head_ema(*args, chunk_size=16),
            (x, ema_decay, ema_in, ema_out),
        ),
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


def seqboat_model_cases(fields: dict, meshes: list) -> dict:
    """A SeqBoat model's loss, gradients and router metrics (activation rate and dropped tokens
    per layer) on every mesh vs one device running XLA (the first layer's router biased by
    :data:`SPARSE_ROUTER_BIAS`)."""
    from flax import linen as nn

    from jaxbased.sharding import LOGICAL_RULES, batch_sharding, logical_shardings, make_mesh
    from jaxbased.training.steps import token_losses

    config = ModelConfig.from_dict(fields)
    model = LanguageModel(config)
    reference = LanguageModel(config.replace(implementation="xla"))
    boxed = model.init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]
    params = nn.meta.unbox(boxed)
    router = params["layers_0"]["mixer"]["hx_proj"]
    router["bias"] = router["bias"].at[0].add(SPARSE_ROUTER_BIAS)
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(4, SEQ_LEN + 1)), jnp.int32)

    def make_step(model):
        def loss(params, batch):
            losses, _, metrics = token_losses(model, params, batch)
            return losses.mean(), metrics

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    step = make_step(model)
    (expected_loss, expected_metrics), expected_grads = make_step(reference)(params, batch)
    report: dict = {
        "metrics": {key: float(value) for key, value in expected_metrics.items()},
        "loss": {},
        "grads": {},
        "metric_errors": {},
    }
    for shape in meshes:
        mesh = make_mesh(shape)
        shardings = logical_shardings(jax.eval_shape(lambda: boxed), mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            placed = jax.device_put(params, shardings)
            (loss_value, metrics), grads = step(placed, jax.device_put(batch, batch_sharding(mesh)))
        report["loss"][mesh_name(shape)] = relative_error(loss_value, expected_loss)
        report["grads"][mesh_name(shape)] = tree_error(grads, expected_grads)
        report["metric_errors"][mesh_name(shape)] = tree_error(metrics, expected_metrics)
    return report


def counted_collectives(hlo: str) -> dict:
    """:func:`tests.sequence_worker.collective_counts`, with the all-reduces that sum the
    gradients of parameters a layer's ``shard_map`` reads whole split out: XLA combines those
    of several layers into one all-reduce (its metadata names them all), so
    ``shard_map_psums`` lists their operand shapes, and ``all_reduce`` counts the others."""
    report = collective_counts(hlo)
    psums, combined = [], 0
    for line in hlo.splitlines():
        if not re.search(r" all-reduce(?:-start)?\(", line) or "shard_map/psum" not in line:
            continue
        groups = re.search(r"replica_groups=\{\{([0-9,{}]*)\}\}", line)
        if groups is not None and all("," not in g for g in groups.group(1).split("},{")):
            continue  # groups of one device: moves nothing
        result = line.split("=", 1)[1].split(" all-reduce")[0]
        psums += re.findall(r"\w+\[[0-9,]*\]", result)
        combined += 1
    report["all_reduce"] -= combined - sum(report["psums_by_layer"].values())
    report["shard_map_psums"] = sorted(psums)
    del report["psums_by_layer"]
    return report


def hlo_cases() -> dict:
    """Collectives of the compiled train steps on sequence meshes."""
    report = {}
    for name, fields in (("mamba", MAMBA_MODEL), ("seqboat", SEQBOAT_MODEL)):
        compiled = compiled_train_steps(fields, HLO_MESHES)
        report[name] = {
            mesh_name(shape): counted_collectives(compiled[mesh_name(shape)])
            for shape in HLO_MESHES
        }
    return report


if __name__ == "__main__":
    import time

    result, seconds = {}, {}
    for name, case in [
        ("ops", op_cases),
        ("mamba_model", lambda: model_cases(MAMBA_MODEL, MODEL_MESHES)),
        ("seqboat_model", lambda: seqboat_model_cases(SEQBOAT_MODEL, MODEL_MESHES)),
        (
            "seqboat_kernel_model",
            lambda: seqboat_model_cases(SEQBOAT_KERNEL_MODEL, KERNEL_MODEL_MESHES),
        ),
        ("hlo", hlo_cases),
    ]:
        start = time.perf_counter()
        result[name] = case()
        seconds[name] = round(time.perf_counter() - start, 1)
    result["seconds"] = seconds
    print("RESULT " + json.dumps(result), flush=True)
