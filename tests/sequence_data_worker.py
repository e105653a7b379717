"""Runs in a subprocess with 8 simulated CPU devices (set before JAX starts); used by
tests/test_sequence_data.py. Feeds the training pipeline's pieces (each process's rows and time
slices) of several meshes, with the 8 devices shared out among pretended processes, and checks
the assembled global batch against the unsliced one; and counts the collectives of a train step
fed slice windows. Prints one JSON line with what it measured."""

from __future__ import annotations

import json
import os
import pathlib
import sys

if __name__ == "__main__":  # before JAX starts; importing this module changes nothing
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np

#: (mesh (data, fsdp, tensor, sequence), pretended processes): device ``d`` belongs to process
#: ``d // (8 / processes)``. The time axis over 8, 4 and 2 devices, alone and with the batch and
#: tensor axes, over 1 to 8 processes; and a mesh without ``sequence`` (whole rows).
PIECE_CASES = [
    ((1, 1, 1, 8), 1),
    ((1, 1, 1, 8), 2),
    ((2, 1, 1, 4), 2),
    ((2, 1, 1, 4), 4),
    ((1, 2, 2, 2), 8),
    ((2, 1, 2, 2), 2),
    ((4, 1, 2, 1), 2),
]
BATCH_SIZE, SEQ_LEN, BATCHES = 4, 24, 3


def case_name(mesh, processes: int) -> str:
    return "x".join(map(str, mesh)) + f"/{processes}"


def piece_cases(data: pathlib.Path) -> dict:
    """For every case: each pretended process's piece and host shape, and whether the global
    batch assembled from the pieces, and its inputs and targets, equal the unsliced batch."""
    from jaxbased.data import TokenDataset
    from jaxbased.data.pipeline import make_iterator, training_batches
    from jaxbased.data.sequence_slices import (
        assemble_global_batch,
        next_token_pairs,
        process_piece,
        slice_windows,
    )
    from jaxbased.sharding import make_mesh, token_batch_sharding

    dataset = TokenDataset.open(data)
    settings = dict(seq_len=SEQ_LEN, batch_size=BATCH_SIZE, seed=5)
    whole = make_iterator(training_batches(dataset, **settings))
    unsliced = [next(whole) for _ in range(BATCHES)]
    report = {}
    for mesh_shape, processes in PIECE_CASES:
        slices = mesh_shape[3]
        sharding = token_batch_sharding(make_mesh(mesh_shape))
        per_process = 8 // processes

        def owner(device, per_process=per_process):
            return device.id // per_process

        pieces = {
            index: process_piece(
                sharding, BATCH_SIZE, SEQ_LEN, slices, process_index=index, process_of=owner
            )
            for index in range(processes)
        }
        iterators = {
            index: make_iterator(training_batches(dataset, **settings, piece=piece))
            for index, piece in pieces.items()
        }
        pairs = jax.jit(lambda batch, slices=slices: next_token_pairs(batch, slices))
        equal = {"batch": True, "inputs": True, "targets": True}
        host_shapes = {}
        for expected in unsliced:
            hosts = {index: next(iterator) for index, iterator in iterators.items()}
            host_shapes = {index: list(host.shape) for index, host in hosts.items()}
            global_shape = (BATCH_SIZE, slices * (SEQ_LEN // slices + 1))
            assembled = assemble_global_batch(
                sharding,
                global_shape,
                {index: (pieces[index], hosts[index]) for index in pieces},
                process_of=owner,
            )
            inputs, targets = pairs(assembled)
            equal["batch"] &= bool(
                np.array_equal(np.asarray(assembled), slice_windows(expected, slices))
            )
            equal["inputs"] &= bool(np.array_equal(np.asarray(inputs), expected[:, :-1]))
            equal["targets"] &= bool(np.array_equal(np.asarray(targets), expected[:, 1:]))
        report[case_name(mesh_shape, processes)] = {
            "equal": equal,
            "pieces": {
                index: [piece.row_start, piece.row_stop, piece.slice_start, piece.slice_stop]
                for index, piece in pieces.items()
            },
            "host_shapes": host_shapes,
            "inputs_spec": [str(axis) for axis in inputs.sharding.spec],
        }
    return report


def refused_layouts() -> dict:
    """What :func:`process_piece` says of devices that do not hold one box of the batch."""
    from jaxbased.data.sequence_slices import process_piece
    from jaxbased.sharding import make_mesh, token_batch_sharding

    sharding = token_batch_sharding(make_mesh((1, 1, 1, 8)))
    messages = {}
    for name, owner in [
        ("interleaved", lambda device: device.id % 2),  # slices 0, 2, 4, 6 on process 0
        ("none", lambda device: 0),  # process 1 holds nothing
    ]:
        try:
            process_piece(sharding, BATCH_SIZE, SEQ_LEN, 8, process_index=1, process_of=owner)
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


def hlo_case() -> dict:
    """The collectives of the train step that ``train`` compiles for slice windows."""
    import functools

    import jax.numpy as jnp
    from flax import linen as nn

    from jaxbased import LanguageModel, ModelConfig
    from jaxbased.sharding import (
        LOGICAL_RULES,
        logical_shardings,
        make_mesh,
        token_batch_sharding,
        with_shardings,
    )
    from jaxbased.training.optimizer import learning_rate_schedule, make_optimizer
    from jaxbased.training.state import TrainState
    from jaxbased.training.steps import make_train_step, token_losses
    from tests.sequence_worker import BASED_MODEL, collective_counts

    seq_len, slices = 72, 4
    model = LanguageModel(ModelConfig.from_dict(BASED_MODEL))
    schedule = learning_rate_schedule(peak=1e-3, final=0, warmup_steps=0, total_steps=2)
    optimizer = make_optimizer(schedule)

    def boxed() -> TrainState:
        params = model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    abstract = jax.eval_shape(boxed)
    mesh = make_mesh((2, 1, 1, slices))
    shardings = logical_shardings(abstract, mesh)
    batch = token_batch_sharding(mesh)
    step = make_train_step(
        model,
        optimizer,
        schedule,
        state_shardings=shardings,
        batch_sharding=batch,
        losses=functools.partial(token_losses, sequence_slices=slices),
    )
    width = slices * (seq_len // slices + 1)
    tokens = jax.ShapeDtypeStruct((4, width), jnp.int32, sharding=batch)
    state = with_shardings(abstract, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        hlo = step.lower(state, tokens).compile().as_text()
    return collective_counts(hlo)


if __name__ == "__main__":
    import time

    data_path = pathlib.Path(sys.argv[1])
    result, seconds = {}, {}
    for name, case in [
        ("pieces", lambda: piece_cases(data_path)),
        ("refused", refused_layouts),
        ("hlo", hlo_case),
    ]:
        start = time.perf_counter()
        result[name] = case()
        seconds[name] = round(time.perf_counter() - start, 1)
    result["seconds"] = seconds
    print("RESULT " + json.dumps(result), flush=True)
