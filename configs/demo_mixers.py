"""The demo recipe (``configs/demo.py``: the built-in corpus, 300 steps of 16 x 256 bytes) for a
~1M-parameter model of each mixer family, to compare their evaluation loss at equal steps and
tokens. The argument after the colon picks the model:

    train.py --config=configs/demo_mixers.py:based        --workdir=workdirs/demo_based
    train.py --config=configs/demo_mixers.py:transformer  --workdir=workdirs/demo_transformer
    train.py --config=configs/demo_mixers.py:cca          --workdir=workdirs/demo_cca
    train.py --config=configs/demo_mixers.py:transnormer  --workdir=workdirs/demo_transnormer
    train.py --config=configs/demo_mixers.py:seqboat      --workdir=workdirs/demo_seqboat
    train.py --config=configs/demo_mixers.py:mamba        --workdir=workdirs/demo_mamba
    train.py --config=configs/demo_mixers.py:mamba2       --workdir=workdirs/demo_mamba2

Parameters (d_model 128, byte vocabulary of 257): BASED 1.05M (the demo's model), Transformer++
and CCA 1.02M (6 layers; CCA: groups of 16, local window 64), TransNormerLLM 1.12M (6 layers,
SGLU 256), SeqBoat 0.96M (7 layers without MLP, z 64, h 256, window 65; it logs its activation
rate per layer), Mamba 0.97M (8 layers without MLP, state 16) and Mamba-2 0.91M (8 layers
without MLP, state 32, 8 heads of 32): the models that ``benchmarks/quamba_ablation.py``
quantizes.
"""

import ml_collections

from jaxbased.config import ModelConfig
from jaxbased.config_files import sibling_get_config

demo_config = sibling_get_config(__file__, "demo")

_WIDTH = dict(vocab_size=257, d_model=128, mlp={"inner_dim": 256, "multiple_of": 64})
_ATTENTION = {"heads": 4, "rotary_fraction": 0.5}

MODELS = {
    "transformer": dict(num_layers=6, layer_pattern=("attention",) * 6, attention=_ATTENTION),
    "cca": dict(
        num_layers=6,
        layer_pattern=("cca_attention",) * 6,
        cca_attention={**_ATTENTION, "group_size": 16, "local_window": 64},
    ),
    "transnormer": dict(
        num_layers=6,
        layer_pattern=("transnormer",) * 6,
        norm="srmsnorm",
        norm_eps=1e-8,
        scale_embedding=True,
        mlp={"inner_dim": 256, "multiple_of": 64, "activation": "none"},
        transnormer={"heads": 4},
    ),
    "seqboat": dict(
        num_layers=7,
        layer_pattern=("seqboat",) * 7,
        use_mlp=False,
        norm="layernorm",
        residual_activation="silu",
        scale_embedding=True,
        seqboat={"attention_dim": 64, "value_dim": 256, "window": 65},
    ),
    "mamba": dict(num_layers=8, layer_pattern=("mamba",) * 8, use_mlp=False),
    "mamba2": dict(
        num_layers=8,
        layer_pattern=("mamba2",) * 8,
        use_mlp=False,
        mamba2={"state_dim": 32, "head_dim": 32, "chunk_size": 64},
    ),
}


def get_config(mixer: str = "based") -> ml_collections.ConfigDict:
    config = demo_config()
    if mixer == "based":
        return config
    if mixer not in MODELS:
        raise ValueError(f"mixer={mixer!r} is not known; allowed: {['based', *MODELS]}")
    config.preset = f"demo_{mixer}"
    config.model = ml_collections.ConfigDict(ModelConfig(**(_WIDTH | MODELS[mixer])).to_dict())
    return config
