"""Runs in a subprocess with 8 simulated CPU devices (set before JAX starts); used by
tests/test_sequence_parallel_attention.py. Compares sequence-sharded full causal attention and
CCA-Attention, a Transformer++ and a Mamba-2 hybrid (mamba2, attention and cca_attention
layers) with one device, counts the collectives of their compiled train steps per layer, and
prints one JSON line with what it measured."""

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

from tests.sequence_worker import (
    OP_MESHES,
    SEQ_LEN,
    compiled_train_steps,
    mesh_name,
    model_cases,
    tree_error,
)

#: Meshes (data, fsdp, tensor, sequence) the models run on: sequence 8 alone, with data and
#: with fsdp x tensor (the hybrid, whose compiles are the slowest, skips data x sequence 4,
#: which its train step's collectives are counted on).
MODEL_MESHES = [(1, 1, 1, 8), (2, 1, 1, 4), (1, 2, 2, 2)]
HYBRID_MESHES = [(1, 1, 1, 8), (1, 2, 2, 2)]
#: Train steps whose collectives are counted.
HLO_MESHES = [(2, 1, 1, 4)]

#: Blocks of 4 queries and keys: T = 72 on 8 shards gives 9-token slices, not whole blocks.
FULL_BLOCK = 4
#: CCA groups of 3 and a local window of 6: a slice needs 3 + 6 - 2 = 7 raw keys before it, and
#: 9-token slices (8 shards) are whole groups.
CCA = dict(group_size=3, local_window=6, block_size=4)

#: Transformer++ in small: full attention with rotary on half of each head, and an MLP.
TRANSFORMER_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    layer_pattern=("attention", "attention"),
    attention=dict(heads=4, rotary_fraction=0.5),
    mlp=dict(inner_dim=64),
)
#: A Mamba-2 hybrid: SSD, full attention (full rotary), an MLP layer and CCA-Attention.
HYBRID_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=4,
    layer_pattern=("mamba2", "attention", "mlp", "cca_attention"),
    use_mlp=False,
    attention=dict(heads=4),
    cca_attention=dict(heads=4, group_size=3, local_window=6),
    mamba2=dict(state_dim=8, head_dim=16, chunk_size=16),
    mlp=dict(inner_dim=64),
)


def op_cases() -> dict:
    """Value and gradients of each op under every mesh of ``OP_MESHES`` vs no mesh."""
    from jaxbased.layers.cca_attention import cca_attention
    from jaxbased.ops import sliding_window_attention
    from jaxbased.sharding import make_mesh

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, SEQ_LEN, 4, 8)), jnp.float32) for _ in range(3))
    ops = {
        "full_attention": lambda q, k, v: sliding_window_attention(
            q, k, v, window=None, block_size=FULL_BLOCK
        ),
        "cca_attention": lambda q, k, v: cca_attention(q, k, v, **CCA),
    }
    errors: dict = {}
    for name, op in ops.items():

        def loss(q, k, v, op=op):
            return jnp.sum(jnp.sin(op(q, k, v)))

        grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
        expected = jax.jit(grad)(q, k, v)
        errors[name] = {}
        for shape in OP_MESHES:
            with jax.set_mesh(make_mesh(shape)):
                actual = jax.jit(grad)(q, k, v)
            errors[name][mesh_name(shape)] = tree_error(actual, expected)
    return errors


def collectives_by_layer(hlo: str) -> dict:
    """``{layer or "outside": {kind: count}}`` of the collectives in compiled HLO text (an async
    start/done pair counts once), a collective belonging to the layer named in its metadata
    (``layers_<i>``) when it comes from that layer's ``shard_map``. All-reduces whose replica
    groups hold one device each move nothing and are left out."""
    kinds = "all-gather|all-to-all|reduce-scatter|all-reduce|collective-permute"
    counts: dict = {}
    for line in hlo.splitlines():
        match = re.search(rf"= \(?\w+\[.*? ({kinds})(?:-start)?\(", line)
        if not match:
            continue
        kind = match.group(1)
        groups = re.search(r"replica_groups=\{\{([0-9,{}]*)\}\}", line)
        alone = groups is not None and all(
            "," not in group for group in groups.group(1).split("},{")
        )
        if kind == "all-reduce" and alone:
            continue
        layer = re.search(r"/(layers_\d+)/mixer/\S*shard_map/", line)
        where = layer.group(1) if layer else "outside"
        counts.setdefault(where, {})
        counts[where][kind] = counts[where].get(kind, 0) + 1
    return counts


def hlo_cases() -> dict:
    """Collectives per layer of both models' compiled train steps."""
    report = {}
    for name, fields in (("transformer", TRANSFORMER_MODEL), ("hybrid", HYBRID_MODEL)):
        steps = compiled_train_steps(fields, HLO_MESHES)
        report[name] = {
            mesh_name(shape): collectives_by_layer(steps[mesh_name(shape)]) for shape in HLO_MESHES
        }
    return report


def bad_input_cases() -> dict:
    """The sharded CCA op refuses slices that are not whole groups or miss their halo."""
    from jaxbased.layers.cca_attention import cca_attention
    from jaxbased.sharding import make_mesh

    messages = {}
    cases = {"group": (1, 1, 1, 8, 80), "halo": (1, 1, 1, 8, 48)}  # 10- and 6-token slices
    for name, (*shape, seq) in cases.items():
        x = jnp.zeros((1, seq, 2, 4), jnp.float32)
        try:
            with jax.set_mesh(make_mesh(tuple(shape))):
                jax.jit(lambda x: cca_attention(x, x, x, **CCA)).lower(x)
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


if __name__ == "__main__":
    import time

    result, seconds = {}, {}
    for name, case in [
        ("ops", op_cases),
        ("transformer", lambda: model_cases(TRANSFORMER_MODEL, MODEL_MESHES)),
        ("hybrid", lambda: model_cases(HYBRID_MODEL, HYBRID_MESHES)),
        ("hlo", hlo_cases),
        ("bad_input", bad_input_cases),
    ]:
        start = time.perf_counter()
        result[name] = case()
        seconds[name] = round(time.perf_counter() - start, 1)
    result["seconds"] = seconds
    print("RESULT " + json.dumps(result), flush=True)
