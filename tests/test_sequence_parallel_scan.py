"""Sequence parallelism for the per-channel recurrences: Mamba-1's selective scan and SeqBoat.

The multi-device checks run tests/sequence_scan_worker.py once, in a subprocess with 8
simulated CPU devices: the sharded ops on sequence 2, 4 and 8 alone and with data x tensor, the
models' loss and gradients against one device, and the collectives of compiled train steps.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import ModelConfig
from jaxbased.ops.sequence_parallel import exclusive_prefix_rounds
from jaxbased.ops.sequence_parallel_scan import _append_keys, _last_keys
from jaxbased.sequence_sharding import check_sequence_sharding
from tests.conftest import worker_report
from tests.sequence_scan_worker import (
    HLO_MESHES,
    KERNEL_MODEL_MESHES,
    MAMBA_MODEL,
    MODEL_MESHES,
    OP_MESHES,
    SEQBOAT_KERNEL_MODEL,
    SEQBOAT_MODEL,
)

TOLERANCE = 1e-5  # relative, float32


@pytest.fixture(scope="module")
def report() -> dict:
    return worker_report("sequence_scan_worker")


def name(mesh) -> str:
    return "x".join(map(str, mesh))


@pytest.mark.parametrize("op", ["selective_scan", "ema"])
def test_sharded_ops_equal_one_device(report, op):
    for mesh in OP_MESHES:
        assert report["ops"][op][name(mesh)] <= TOLERANCE, (op, mesh, report["ops"][op])


def test_mamba_model_loss_and_gradients_equal_one_device(report):
    for mesh in MODEL_MESHES:
        assert report["mamba_model"]["loss"][name(mesh)] <= TOLERANCE, mesh
        assert report["mamba_model"]["grads"][name(mesh)] <= TOLERANCE, mesh


def test_mamba_train_step_holds_only_the_designed_collectives(report):
    for mesh in HLO_MESHES:
        counts = report["hlo"]["mamba"][name(mesh)]
        # Per layer, forward and backward: the conv halo, and the exclusive scan's rounds of
        # [h | Δ] (one array a round).
        per_layer = 2 * (1 + exclusive_prefix_rounds(mesh[3]))
        assert counts["permutes_by_layer"] == {"layers_0": per_layer, "layers_1": per_layer}
        assert counts["other_permutes"] == ["s32", "s32"], counts  # the next-token targets
        assert counts["all_gather"] == counts["reduce_scatter"] == counts["all_to_all"] == 0
        # The shard_map reads the conv weight [K, inner] and a [inner, N] whole: their
        # gradients are summed there (XLA combines the layers' sums); every other gradient
        # and the loss are summed over data x sequence by the step's all-reduces.
        assert counts["shard_map_psums"] == ["f32[4,64]"] * 2 + ["f32[64,8]"] * 2, counts
        assert 1 <= counts["all_reduce"] <= 2, counts


def test_mamba_conv_halo_is_checked():
    mamba = ModelConfig.from_dict(MAMBA_MODEL)
    check_sequence_sharding(mamba, 8, 72)  # 9-token slices hold the conv's 3 inputs
    with pytest.raises(ValueError, match="mamba needs the 3 tokens"):
        check_sequence_sharding(mamba, 8, 16)


def test_seqboat_model_loss_gradients_and_metrics_equal_one_device(report):
    cases = report["seqboat_model"]
    metrics = cases["metrics"]
    # The cases the design must get right: a sparse layer whose 7 earlier packed keys come
    # from several earlier slices (about 2 active tokens per 9-token slice), and a dense one
    # that drops active tokens beyond the capacity of 36 packed slots.
    assert 0.1 < metrics["mixer/layer0/activation_rate"] < 0.35, metrics
    assert metrics["mixer/layer0/dropped_tokens"] == 0, metrics
    assert metrics["mixer/layer1/dropped_tokens"] > 0.1, metrics
    for mesh in MODEL_MESHES:
        assert cases["loss"][name(mesh)] <= TOLERANCE, mesh
        assert cases["grads"][name(mesh)] <= TOLERANCE, mesh
        assert cases["metric_errors"][name(mesh)] <= TOLERANCE, (mesh, cases)


def test_seqboat_with_the_window_kernel_per_shard_equals_one_device(report):
    # implementation="pallas" on every mesh against XLA on one device: a sparse router (earlier
    # packed keys from several slices) and a capacity below the active count (dropped tokens).
    cases = report["seqboat_kernel_model"]
    metrics = cases["metrics"]
    assert 0.1 < metrics["mixer/layer0/activation_rate"] < 0.35, metrics
    assert metrics["mixer/layer0/dropped_tokens"] > 0.01, metrics
    assert {mesh[3] for mesh in KERNEL_MODEL_MESHES} == {2, 4, 8}
    for mesh in KERNEL_MODEL_MESHES:
        assert cases["loss"][name(mesh)] <= TOLERANCE, mesh
        assert cases["grads"][name(mesh)] <= TOLERANCE, mesh
        assert cases["metric_errors"][name(mesh)] <= TOLERANCE, (mesh, cases)


def test_seqboat_with_pallas_may_split_the_sequence():
    check_sequence_sharding(ModelConfig.from_dict(SEQBOAT_KERNEL_MODEL), 8, 72)


def test_seqboat_train_step_holds_only_the_designed_collectives(report):
    for mesh in HLO_MESHES:
        counts = report["hlo"]["seqboat"][name(mesh)]
        rounds = exclusive_prefix_rounds(mesh[3])
        # Per layer and round: forward the EMA state, the active count (int32) and the last
        # window - 1 packed keys and values (one array); backward the EMA state's and the
        # keys' cotangents.
        assert counts["permutes_by_layer"] == {"layers_0": 5 * rounds, "layers_1": 5 * rounds}
        assert counts["other_permutes"] == ["s32", "s32"], counts  # the next-token targets
        assert counts["all_gather"] == counts["reduce_scatter"] == counts["all_to_all"] == 0
        # The EMA's shard_map reads its three [d, N] coefficients whole.
        assert counts["shard_map_psums"] == ["f32[32,4]"] * 6, counts
        # Gradient and loss sums, and the router metrics' active counts over the row.
        assert 2 <= counts["all_reduce"] <= 4, counts


def test_seqboat_reference_algorithm_is_refused():
    seqboat = ModelConfig.from_dict(SEQBOAT_MODEL)
    check_sequence_sharding(seqboat, 8, 72)  # no halo limit: keys come from any earlier slice
    masked = seqboat.replace(seqboat=dict(SEQBOAT_MODEL["seqboat"], algorithm="masked"))
    with pytest.raises(ValueError, match=r"seqboat\.algorithm='masked'"):
        check_sequence_sharding(masked, 2, 72)


def test_packed_key_step_keeps_the_last_keys_of_the_ranges():
    # The exclusive scan's step for SeqBoat's keys against a NumPy reference: the last
    # `history` active keys of the concatenated ranges, right-aligned, and associativity.
    history, rng = 5, np.random.default_rng(0)
    ranges = []
    for count in (0, 2, 7, 1, 3):  # fewer, more and as many active tokens as the history
        keys = rng.normal(size=(1, count, 2))
        counts = jnp.asarray([count])
        ranges.append((keys, (counts, _last_keys(jnp.asarray(keys), counts, history))))

    def combine(earlier, later):
        return _append_keys(earlier, later, 0)

    total = ranges[0][1]
    for _, pair in ranges[1:]:
        total = combine(total, pair)
    every = np.concatenate([keys for keys, _ in ranges], axis=1)
    assert int(total[0][0]) == every.shape[1]
    np.testing.assert_allclose(np.asarray(total[1]), every[:, -history:], rtol=1e-6)
    regrouped = combine(
        combine(ranges[0][1], ranges[1][1]),
        combine(ranges[2][1], combine(ranges[3][1], ranges[4][1])),
    )
    np.testing.assert_allclose(np.asarray(regrouped[1]), np.asarray(total[1]), rtol=1e-6)
    few = combine(ranges[1][1], ranges[3][1])  # 3 keys, after 2 empty slots
    expected = np.concatenate([ranges[1][0], ranges[3][0]], axis=1)
    np.testing.assert_allclose(np.asarray(few[1])[:, -3:], expected, rtol=1e-6)
    assert int(few[0][0]) == 3
