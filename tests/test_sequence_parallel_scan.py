"""Sequence parallelism for the per-channel recurrences: Mamba-1's selective scan and SeqBoat.

The multi-device checks run tests/sequence_scan_worker.py once, in a subprocess with 8
simulated CPU devices: the sharded ops on sequence 2, 4 and 8 alone and with data x tensor, the
models' loss and gradients against one device, and the collectives of compiled train steps.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from jaxbased import ModelConfig
from jaxbased.ops.sequence_parallel import exclusive_prefix_rounds
from jaxbased.sequence_sharding import check_sequence_sharding
from tests.sequence_scan_worker import HLO_MESHES, MAMBA_MODEL, MODEL_MESHES, OP_MESHES

REPO = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # relative, float32


@pytest.fixture(scope="module")
def report() -> dict:
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "sequence_scan_worker.py")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def name(mesh) -> str:
    return "x".join(map(str, mesh))


@pytest.mark.parametrize("op", ["selective_scan", "selective_scan_sequential", "ema"])
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
