"""Prefill over a time-split mesh and the Pallas kernels per shard (docs/sequence_parallelism.md).

The multi-device checks run tests/sequence_prefill_worker.py once, in a subprocess with 8
simulated CPU devices: a BASED model and a Mamba-2 hybrid (transnormer, mamba2, mlp,
decay_attention, sliding_window) prefill padded ragged prompts (T = 72: 4.5 chunks, slices of 9,
18 and 36 tokens) on sequence 2, 4 and 8, alone and with data, fsdp and tensor; logits and every
cache leaf match one device, and greedy decoding from the sharded caches on one device gives the
one-device tokens; ``generate`` under a mesh; the interpreted kernels per shard against the
sharded XLA ops and one device, values and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import ModelConfig
from jaxbased.ops.sequence_parallel import exclusive_prefix_rounds
from jaxbased.ops.window_attention import fill_kv_cache
from jaxbased.sequence_sharding import check_sequence_sharding
from tests.conftest import worker_report
from tests.sequence_prefill_worker import (
    ATTENTION_MODEL,
    BASED_MODEL,
    HLO_CASE,
    HYBRID_MODEL,
    KERNEL_CASES,
    PREFILL_CASES,
    SCAN_HLO_CASE,
    SCAN_MODEL,
)

TOLERANCE = 1e-5  # relative, float32


@pytest.fixture(scope="module")
def report() -> dict:
    return worker_report("sequence_prefill_worker")


def case_name(model: str, mesh, ragged: bool) -> str:
    return f"{model}/{'x'.join(map(str, mesh))}/{'ragged' if ragged else 'full'}"


def test_prefill_cases_cover_every_sharded_mixer_and_sequence_size():
    from jaxbased.sequence_sharding import SEQUENCE_SHARDED_MIXERS

    models = (BASED_MODEL, HYBRID_MODEL, ATTENTION_MODEL, SCAN_MODEL)
    mixers = set().union(*(model["layer_pattern"] for model in models))
    assert mixers == set(SEQUENCE_SHARDED_MIXERS)
    assert {mesh[3] for _, mesh, _ in PREFILL_CASES} == {2, 4, 8}


@pytest.mark.parametrize("model, mesh, ragged", PREFILL_CASES)
def test_sharded_prefill_equals_one_device(report, model, mesh, ragged):
    case = report["prefill"][case_name(model, mesh, ragged)]
    assert case["logits"] <= TOLERANCE, case
    # Every leaf: the states, the conv inputs, the window's keys, values and slot positions.
    leaves = {"based": 7, "hybrid": 10, "attention": 9, "scan": 8}
    expected_leaves = leaves[model.removesuffix("_pallas")]
    assert len(case["cache"]) == expected_leaves, case["cache"]
    for leaf, error in case["cache"].items():
        assert error <= TOLERANCE, (leaf, error)
    assert case["tokens_equal"], case


def test_sharded_prefill_gathers_nothing(report):
    # BASED on sequence = 8: the halo ppermutes of the conv and the window and the state scan's
    # rounds; the caches' broadcasts are all-reduces (XLA may combine them); no all-gather of
    # the prompt (the window's cache gathers only its slots).
    counts = report["prefill"][case_name(*HLO_CASE)]["collectives"]
    assert len(counts["other_permutes"]) == 1 + exclusive_prefix_rounds(8) + 1, counts
    assert counts["all_gather"] == counts["all_to_all"] == counts["reduce_scatter"] == 0, counts
    assert 1 <= counts["all_reduce"] <= 3, counts


def test_seqboat_prefill_gathers_no_activations(report):
    # SeqBoat's prefill on sequence = 8 splits the time axis: the EMA's state and the decode
    # ring come from the shards holding them (all-reduces), so its layer (layers_1) holds no
    # all-gather (this mesh does not split the parameters: none are gathered either).
    assert SCAN_MODEL["layer_pattern"][1] == "seqboat"
    counts = report["prefill"][case_name(*SCAN_HLO_CASE)]["collectives"]
    assert counts["gathers_by_layer"].get("layers_1", 0) == 0, counts


def test_generate_under_a_sequence_mesh_gives_the_one_device_tokens(report):
    assert report["generate"]["tokens_equal"], report["generate"]


@pytest.mark.parametrize("op", [op for op, _ in KERNEL_CASES])
def test_pallas_per_shard_equals_sharded_xla_and_one_device(report, op):
    case = report["kernels"][op]
    assert case["kernel_vs_xla"] <= TOLERANCE, case
    assert case["kernel_vs_one_device"] <= TOLERANCE, case


def test_ops_without_kernels_per_shard_refuse_pallas(report):
    message = report["refusals"]["op"]
    assert "short_conv with implementation='pallas' cannot run on a mesh with sequence=8" in (
        message or ""
    )
    assert "allowed there: ('auto', 'xla')" in message


def test_pallas_models_may_split_the_sequence():
    based = ModelConfig.from_dict(dict(BASED_MODEL, implementation="pallas"))
    check_sequence_sharding(based, 8, 72)
    hybrid = ModelConfig.from_dict(dict(HYBRID_MODEL, implementation="pallas"))
    check_sequence_sharding(hybrid, 4, 72)


def test_ring_buffer_fill_matches_a_numpy_reference():
    # The slot positions that both the unsharded and the sharded fills use, against a direct
    # NumPy loop: slot s holds the latest valid p with p % capacity == s.
    rng = np.random.default_rng(0)
    keys = jnp.asarray(rng.normal(size=(3, 10, 2, 4)), jnp.float32)
    lengths = np.array([10, 7, 2])
    cache = fill_kv_cache(keys, keys, 4, jnp.asarray(lengths))
    for row, length in enumerate(lengths):
        for slot in range(4):
            valid = [p for p in range(length) if p % 4 == slot]
            expected = valid[-1] if valid else -1
            assert int(cache.slot_positions[row, slot]) == expected
            want = np.asarray(keys[row, expected]) if valid else np.zeros((2, 4))
            np.testing.assert_array_equal(np.asarray(cache.keys[row, :, slot]), want)
    assert jax.tree.structure(cache) == jax.tree.structure(fill_kv_cache(keys, keys, 4))
