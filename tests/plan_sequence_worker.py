"""Runs in a subprocess with 8 simulated CPU devices (set before JAX starts); used by
tests/test_plan_sequence.py. For a BASED model on meshes with ``sequence`` = 1, 2, 4, 8, and for
a model of the other time-split mixers at ``sequence`` 4, it plans the train step twice, as the
one-device estimate of a slice and as the step compiled for the mesh, and reads the compiled
step's collective bytes from its HLO; prints one JSON line."""

from __future__ import annotations

import json
import os
import pathlib
import sys

if __name__ == "__main__":  # before JAX starts; importing this module changes nothing
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

#: One layer of each BASED mixer; T = 128 splits into 16-token slices on 8 shards (whole chunks
#: of 16; the window's 7 earlier keys and the conv's 2 inputs fit).
PLAN_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=3,
    layer_pattern=("base_conv", "based", "sliding_window"),
    based=dict(heads=2, feature_dim=8, chunk_size=16),
    sliding_window=dict(heads=2, window=8),
    mlp=dict(inner_dim=64),
)
SEQ_LEN = 128
BATCH = 4
#: One layer of each mixer that all-gathers or scans a diagonal state: full attention, CCA
#: (groups of 4, 8 raw keys: a 10-token halo), Mamba-1 and SeqBoat (window 8), on 32-token
#: slices at ``sequence`` 4, the one mesh it is compiled for (two compiles of about 15 s).
OTHER_MIXERS_MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=4,
    layer_pattern=("attention", "cca_attention", "mamba", "seqboat"),
    attention=dict(heads=2),
    cca_attention=dict(heads=2, group_size=4, local_window=8, block_size=16),
    mamba=dict(state_dim=8),
    seqboat=dict(window=8, attention_dim=16, ema_dim=8),
)
OTHER_MIXERS_MESH = (1, 1, 1, 4)
#: (data, fsdp, tensor, sequence); each costs two compiles (about 10 s of CPU each), so data 2 x
#: sequence 4 (1.03x of the compiled step's when measured once) is not repeated here.
MESHES = [(1, 1, 1, 1), (1, 1, 1, 2), (1, 1, 1, 4), (1, 1, 1, 8)]


def mesh_name(shape) -> str:
    return "x".join(map(str, shape))


def main() -> dict:
    import optax

    from jaxbased import LanguageModel, ModelConfig
    from jaxbased.hlo_traffic import collective_bytes
    from jaxbased.planning import compile_sharded_step, plan_memory
    from jaxbased.sharding import MESH_AXES
    from jaxbased.training.optimizer import make_optimizer

    schedule = optax.constant_schedule(1e-3)
    optimizer = make_optimizer(schedule)
    report: dict = {}
    cases = [(PLAN_MODEL, shape, mesh_name(shape)) for shape in MESHES]
    cases.append((OTHER_MIXERS_MODEL, OTHER_MIXERS_MESH, "other_mixers"))
    for model_fields, shape, name in cases:
        config = ModelConfig.from_dict(model_fields)
        model = LanguageModel(config)
        estimate = plan_memory(config, shape, seq_len=SEQ_LEN, batch_size=BATCH, on_mesh=False)
        compiled = compile_sharded_step(
            model,
            optimizer,
            schedule,
            dict(zip(MESH_AXES, shape, strict=True)),
            seq_len=SEQ_LEN,
            batch_size=BATCH,
        )
        traffic = collective_bytes(compiled.as_text())
        report[name] = {
            "estimate": estimate.activations,
            "compiled": int(compiled.memory_analysis().temp_size_in_bytes),
            "parameters": estimate.parameters,
            "optimizer_state": estimate.optimizer_state,
            "planned_traffic": estimate.sequence_traffic,
            "hlo_layer_permutes": sum(traffic["permutes_by_layer"].values()),
            "hlo_layer_sent": sum(traffic["sent_by_layer"].values()),
            "hlo_by_kind": traffic["by_kind"],
        }
    return report


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()), flush=True)
