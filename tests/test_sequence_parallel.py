"""Sequence parallelism: the ``sequence`` mesh axis splits the time axis of activations.

The multi-device checks run tests/sequence_worker.py once, in a subprocess with 8 simulated CPU
devices: every sharded op and a BASED model (one base_conv, based and sliding_window layer,
T = 72: not whole chunks of 16, 9-token slices on 8 shards) against one device, the collectives
of a compiled train step, and the refusals of ``train``.
"""

import pytest

from jaxbased import ModelConfig
from jaxbased.ops.sequence_parallel import exclusive_prefix_rounds
from jaxbased.sequence_sharding import check_sequence_sharding
from jaxbased.sharding import resolve_mesh_shape
from jaxbased.training.configs import mesh_defaults
from tests.conftest import worker_report
from tests.sequence_worker import (
    BASED_MODEL,
    DECAY_MODEL_MESHES,
    HLO_MESHES,
    MODEL_MESHES,
    OP_MESHES,
)

TOLERANCE = 1e-5  # relative, float32


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    data = tmp_path_factory.mktemp("sequence") / "no_data"  # refused before it is read
    return worker_report("sequence_worker", str(data))


def name(mesh) -> str:
    return "x".join(map(str, mesh))


@pytest.mark.parametrize(
    "op", ["linear_attention", "decay_attention", "ssd", "sliding_window", "short_conv"]
)
def test_sharded_ops_equal_one_device(report, op):
    for mesh in OP_MESHES:
        assert report["ops"][op][name(mesh)] <= TOLERANCE, (op, mesh, report["ops"][op])


def test_based_model_loss_and_gradients_equal_one_device(report):
    for mesh in MODEL_MESHES:
        assert report["model"]["loss"][name(mesh)] <= TOLERANCE, mesh
        assert report["model"]["grads"][name(mesh)] <= TOLERANCE, mesh


def test_decay_model_loss_and_gradients_equal_one_device(report):
    # decay_attention, mamba2 (SSD and its short conv) and transnormer (LRPE in its first layer)
    for mesh in DECAY_MODEL_MESHES:
        assert report["decay_model"]["loss"][name(mesh)] <= TOLERANCE, mesh
        assert report["decay_model"]["grads"][name(mesh)] <= TOLERANCE, mesh


def test_train_step_holds_only_the_designed_collectives(report):
    for mesh in HLO_MESHES:
        counts = report["hlo"][name(mesh)]
        shards = mesh[3]
        # Forward and backward: one halo ppermute each for base_conv and sliding_window; the
        # exclusive state scan's rounds each way for based.
        assert counts["permutes_by_layer"] == {
            "layers_0": 2,
            "layers_1": 2 * exclusive_prefix_rounds(shards),
            "layers_2": 2,
        }, counts
        # The next-token targets' one-token shift of the int32 batch, inputs and labels.
        assert counts["other_permutes"] == ["s32", "s32"], counts
        # Nothing gathers the sequence. The conv weight, which base_conv's shard_map reads
        # whole, has its gradient summed there; every other gradient and the loss are summed
        # over data x sequence by the step's all-reduces (XLA combines them into one or two).
        assert counts["all_gather"] == counts["reduce_scatter"] == counts["all_to_all"] == 0
        assert counts["psums_by_layer"] == {"layers_0": 1}, counts
        assert 1 <= counts["all_reduce"] <= 2, counts


def test_train_refuses_sizes_it_cannot_split(report):
    messages = report["bad_input"]
    assert "mesh.sequence=4 does not split data.seq_len=30" in messages["seq_len"]
    assert "(e.g. 32)" in messages["seq_len"]
    assert "slices of 6 tokens" in messages["window"]
    assert "sequence sizes that work: [1, 2, 3, 4, 6]" in messages["window"]


def test_exclusive_scan_rounds():
    assert [exclusive_prefix_rounds(n) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [
        0, 1, 2, 3, 3, 4, 4, 5,
    ]  # fmt: skip


def test_sequence_axis_defaults_to_one():
    assert mesh_defaults()["sequence"] == 1
    assert resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2, 1)
    assert resolve_mesh_shape({"data": -1, "sequence": 4}, 8) == (2, 1, 1, 4)
    with pytest.raises(ValueError, match="must give sizes for"):
        resolve_mesh_shape((2, 2), 8)


def test_unshardable_mixers_and_implementations_are_refused():
    based = ModelConfig.from_dict(BASED_MODEL)
    check_sequence_sharding(based, 1, 7)  # sequence 1: anything goes
    check_sequence_sharding(based, 8, 72)
    # Every mixer splits the sequence; Mamba-1's selective scan runs XLA per shard only.
    mamba = ModelConfig.from_dict(dict(BASED_MODEL, layer_pattern=("based", "mamba", "mlp")))
    check_sequence_sharding(mamba, 2, 64)
    with pytest.raises(ValueError, match=r"sequence of mixers \['mamba'\] yet"):
        check_sequence_sharding(mamba.replace(implementation="pallas"), 2, 64)
    mamba2 = ModelConfig.from_dict(dict(BASED_MODEL, layer_pattern=("based", "mamba2", "mlp")))
    check_sequence_sharding(mamba2, 8, 72)  # 9-token slices hold the conv's 3 inputs
    with pytest.raises(ValueError, match="mamba2 needs the 3 tokens"):
        check_sequence_sharding(mamba2, 8, 16)
    # The shards run the Pallas kernels (tests/test_sequence_parallel_prefill.py).
    check_sequence_sharding(based.replace(implementation="pallas"), 2, 64)
    conv = based.replace(base_conv={"kernel_size": 9})
    with pytest.raises(ValueError, match="base_conv needs the 8 tokens"):
        check_sequence_sharding(conv, 8, 56)
