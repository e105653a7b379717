"""The BASED paper's MQAR sweep (docs/mqar.md; Zoology's ``arxiv24_based_figure2``), for
accelerators: vocabulary 8192, the full train and test mixes, batch 256, up to 32 epochs with
early stopping at 0.99, four learning rates per model.

    jaxbased-mqar --config=configs/mqar_paper.py --output_dir=results/mqar_paper

Sliding windows: Zoology's ``block_size`` w lets query i see keys i-w ... i, i.e. w + 1 keys;
our ``window`` counts the keys seen, so w = 8 ... 1024 is ``window`` = 9 ... 1025.

Mamba and Mamba-2 (d_model 64 / 128 / 256 x state 8 / 16 / 24, as the paper's sweep): Zoology
builds those as two Mamba blocks without BaseConv; here every MQAR model is BaseConv then the
mixer (``jaxbased.mqar.models``), so their numbers carry one extra short conv layer. Further
mixers join with one more ``models`` entry (``model_group(mixer, grid, fixed)``).
"""

import ml_collections

from jaxbased.mqar.sweep import base_sweep_config, model_group


def get_config() -> ml_collections.ConfigDict:
    config = base_sweep_config()  # the paper's data, optimizer, epochs and learning rates
    config.state_size_seq_len = 1024  # the longest test sequence
    config.train.batch_size = 256
    config.train.eval_batch_size = 32  # Zoology: batch_size / 8 for the test mix
    config.models = ml_collections.ConfigDict(
        dict(
            attention=model_group("attention", dict(d_model=(64, 128))),
            based=model_group("based", dict(d_model=(48, 64, 128), feature_dim=(8, 16, 24))),
            sliding_window=model_group(
                "sliding_window",
                dict(
                    d_model=(128,),
                    window=tuple(w + 1 for w in (8, 16, 32, 64, 128, 256, 512, 1024)),
                ),
            ),
            mamba=model_group("mamba", dict(d_model=(64, 128, 256), state_dim=(8, 16, 24))),
            mamba2=model_group("mamba2", dict(d_model=(64, 128, 256), state_dim=(8, 16, 24))),
        )
    )
    return config
