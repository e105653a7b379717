"""The default CPU MQAR sweep (``configs/mqar_cpu.py``) plus the state-space and decay mixers.

Same protocol, data, training budget and learning rate (3e-3) as ``mqar_cpu.py``; adds, at
d_model 64 and state sizes matched to BASED's F = 8 / F = 16 (about 2.5k and 9k floats):

- ``mamba`` (Mamba-1) in Zoology's state-space model (two Mamba blocks, RMSNorm, no BaseConv)
  with state dim 8 and 32 (per layer ``d_inner * N`` floats plus its conv inputs: 2,816 and
  8,960 floats for the two layers), scanned with the sequential algorithm (on CPU, at T <= 256,
  several times faster per training step than the chunked associative scan; the same function);
- ``mamba_large_mix``: the state-dim-8 Mamba-1 on ten times the sweep's training examples
  (160k, one epoch, about as many tokens as twelve epochs of the sweep's 16k): on the sweep's
  mix Mamba-1 memorizes the examples instead of learning recall (BENCHMARKS.md);
- ``mamba2`` (SSD), the same model, with state dim 8 and 32, head dim 32 (4 heads), chunk 64
  (2,912 and 9,344 floats for the two layers); ``mamba2_long`` is its state-dim-8 model on
  twice the budget (8 epochs, 4000 steps, the cosine over all of them): on the 4-epoch budget
  of the other rows Mamba-2 stays near chance, on a longer one it learns recall
  (BENCHMARKS.md);
- ``decay_attention`` (RetNet-style fixed decay per head), one head of key dim 64;
- ``cca_attention`` (pooled core tokens + a local window, one head, no rotary as Zoology's
  attention): its state at the 256-token test length is ``2 d (s + g + 256 / g)`` floats, at
  least about ``2 d * 45`` whatever ``g`` and ``s``, so the row matched to F = 8 runs at
  d_model 32 (g 16, s 16: 3,072 floats) and the row matched to F = 16 at d_model 64 (g 4, s 8:
  9,728 floats);
- ``transnormer`` (TransNormerLLM's gated linear attention) with LRPE, as the first token mixer
  of the released models has it (``lrpe_layers=(1,)``: the MQAR model's mixer is its layer 1,
  which the released decay formula makes the top layer, nearly without decay): one head
  (key dim 128 with LRPE: 8,320 floats, matched to F = 16) and four heads (2,176 floats,
  matched to F = 8);
- ``seqboat`` (EMA + routed local attention; capacity 1: no token dropped; no SiLU on the
  residual, to keep the MQAR block of every row): state ``d N + W (z + h)`` with N 16, z 32,
  h 128: window 12 (2,944 floats, matched to F = 8) and 56 (9,984 floats, matched to F = 16).

The SSM runs add roughly 25-35 CPU-minutes to the 15-minute default sweep, so they live here;
``BENCHMARKS.md`` records this sweep and its figure.

    jaxbased-mqar --config=configs/mqar_cpu_all.py --output_dir=results/mqar_cpu
"""

import ml_collections

from jaxbased.config_files import sibling_get_config
from jaxbased.mqar.sweep import model_group

default_cpu_config = sibling_get_config(__file__, "mqar_cpu")


def get_config() -> ml_collections.ConfigDict:
    config = default_cpu_config()
    config.models.mamba = model_group(
        "mamba",
        dict(d_model=(64,), state_dim=(8, 32)),
        fixed=dict(scan_algorithm="sequential"),
    )
    config.models.mamba_large_mix = model_group(
        "mamba",
        dict(d_model=(64,), state_dim=(8,)),
        fixed=dict(scan_algorithm="sequential"),
        train=dict(max_epochs=1),
        train_mix=[
            (seq_len, pairs, examples * 10) for seq_len, pairs, examples in config.train_mix
        ],
    )
    config.models.mamba2 = model_group(
        "mamba2",
        dict(d_model=(64,), state_dim=(8, 32)),
        fixed=dict(head_dim=32, chunk_size=64),
    )
    config.models.mamba2_long = model_group(
        "mamba2",
        dict(d_model=(64,), state_dim=(8,)),
        fixed=dict(head_dim=32, chunk_size=64),
        train=dict(max_epochs=8),
    )
    config.models.decay_attention = model_group(
        "decay_attention", dict(d_model=(64,)), fixed=dict(heads=1)
    )
    cca = dict(heads=1, rotary_fraction=0.0)
    config.models.cca_attention = model_group(
        "cca_attention", dict(d_model=(64,), group_size=(4,), local_window=(8,)), fixed=cca
    )
    config.models.cca_attention_small = model_group(
        "cca_attention", dict(d_model=(32,), group_size=(16,), local_window=(16,)), fixed=cca
    )
    config.models.transnormer = model_group(
        "transnormer", dict(d_model=(64,), heads=(1, 4)), fixed=dict(lrpe_layers=(1,))
    )
    config.models.seqboat = model_group(
        "seqboat",
        dict(d_model=(64,), window=(12, 56)),
        fixed=dict(attention_dim=32, value_dim=128, capacity_fraction=1.0),
    )
    return config
