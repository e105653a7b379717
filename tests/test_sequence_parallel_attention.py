"""Sequence parallelism for full causal attention and CCA-Attention (docs/sequence_parallelism.md).

The multi-device checks run tests/sequence_attention_worker.py once, in a subprocess with 8
simulated CPU devices: both sharded ops (T = 72: 9-token slices on 8 shards, not whole blocks of
4), a Transformer++ and a Mamba-2 hybrid (mamba2, attention, mlp, cca_attention) against one
device, the collectives of their compiled train steps per layer, and the op's refusals.
"""

import pytest

from jaxbased import ModelConfig
from jaxbased.ops.sequence_parallel import exclusive_prefix_rounds
from jaxbased.sequence_sharding import check_sequence_sharding
from tests.conftest import worker_report
from tests.sequence_attention_worker import (
    HLO_MESHES,
    HYBRID_MESHES,
    HYBRID_MODEL,
    MODEL_MESHES,
    TRANSFORMER_MODEL,
)
from tests.sequence_worker import OP_MESHES

TOLERANCE = 1e-5  # relative, float32


@pytest.fixture(scope="module")
def report() -> dict:
    return worker_report("sequence_attention_worker")


def name(mesh) -> str:
    return "x".join(map(str, mesh))


@pytest.mark.parametrize("op", ["full_attention", "cca_attention"])
def test_sharded_ops_equal_one_device(report, op):
    # sequence 2, 4, 8 alone and data 2 x tensor 2 x sequence 2: values and q, k, v gradients
    assert set(report["ops"][op]) == {name(mesh) for mesh in OP_MESHES}
    for mesh in OP_MESHES:
        assert report["ops"][op][name(mesh)] <= TOLERANCE, (op, mesh, report["ops"][op])


@pytest.mark.parametrize(
    "model, meshes", [("transformer", MODEL_MESHES), ("hybrid", HYBRID_MESHES)]
)
def test_models_loss_and_gradients_equal_one_device(report, model, meshes):
    for mesh in meshes:
        assert report[model]["loss"][name(mesh)] <= TOLERANCE, (model, mesh)
        assert report[model]["grads"][name(mesh)] <= TOLERANCE, (model, mesh)


def test_train_steps_hold_only_the_designed_collectives(report):
    # Full attention: the forward's all-gather of [k | v], the backward's rematerialised one
    # and the reduce-scatter of their gradients; CCA: the core tokens' all-gather and its
    # reduce-scatter, the raw-key halo's ppermute each way. Outside the layers: the targets'
    # one-token int32 shift (inputs and labels) and the gradient sums.
    full = {"all-gather": 2, "reduce-scatter": 1}
    cca = {"all-gather": 1, "reduce-scatter": 1, "collective-permute": 2}
    outside = {"collective-permute": 2, "all-reduce": 2}
    for mesh in HLO_MESHES:
        shards = mesh[3]
        assert report["hlo"]["transformer"][name(mesh)] == {
            "layers_0": full,
            "layers_1": full,
            "outside": outside,
        }
        # mamba2, each way: the conv halo, the SSD scan's r(n) states and r(n) - 1 total log
        # decays (the last round's is never read); its conv weight's gradient sum (the
        # shard_map reads the weight whole).
        rounds = exclusive_prefix_rounds(shards)
        mamba2 = {"collective-permute": 2 * (1 + rounds + rounds - 1), "all-reduce": 1}
        assert report["hlo"]["hybrid"][name(mesh)] == {
            "layers_0": mamba2,
            "layers_1": full,
            "layers_3": cca,
            "outside": outside,
        }


def test_sharded_cca_refuses_slices_it_cannot_split(report):
    group, halo = report["bad_input"]["group"], report["bad_input"]["halo"]
    assert "shards of 10 tokens (T=80 over sequence=8) must be whole groups" in group
    assert "group_size=3" in group
    assert "must hold the 7 raw keys" in halo


def test_check_accepts_attention_and_refuses_what_cannot_split():
    transformer = ModelConfig.from_dict(TRANSFORMER_MODEL)
    check_sequence_sharding(transformer, 8, 72)
    hybrid = ModelConfig.from_dict(HYBRID_MODEL)
    check_sequence_sharding(hybrid, 8, 72)  # 9-token slices: whole groups of 3, halo 7
    with pytest.raises(ValueError, match=r"slices of 10 tokens, not whole groups of .*=3"):
        check_sequence_sharding(hybrid, 8, 80)
    with pytest.raises(ValueError, match=r"work: \[1, 2, 3, 4, 6, 8, 12, 24\], or a seq_len"):
        check_sequence_sharding(hybrid, 9, 72)  # 8-token slices
    with pytest.raises(ValueError, match="cca_attention needs the 7 tokens"):
        check_sequence_sharding(hybrid, 8, 48)  # 6-token slices of whole groups, short of 7
    sharing = transformer.replace(attention_sharing=((1, 0),))
    check_sequence_sharding(sharing, 1, 72)
    with pytest.raises(ValueError, match=r"attention_sharing=\(\(1, 0\),\) \(EchoAtt\)"):
        check_sequence_sharding(sharing, 2, 72)
