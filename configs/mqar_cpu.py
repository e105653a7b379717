"""The default MQAR sweep (``jaxbased-mqar``), sized for about 15 minutes on 2 idle CPU cores.

The paper's protocol (docs/mqar.md: vocabulary 8192, keys [1, 4096), values [4096, 8192),
power-law queries, AdamW with weight decay 0.1, cosine, early stop at 0.99, best learning rate
per model) on a smaller budget:

- training mix, in this order each epoch (a short-to-long curriculum, as Zoology walks its
  segments): 6400 x (64, 4), 3200 x (128, 8), 6400 x (256, 16); batch 32, 4 epochs
  (2000 steps) at most;
- test mix: 256 x (256, 16) and 256 x (256, 32) (32 pairs were never seen in training);
- models at d_model 64: full attention, BASED with feature dims 4 / 8 / 16 (the state grows
  with F: 15 / 45 / 153 features), sliding windows of 16 keys (far shorter than the 32-token
  context) and 256 keys (the whole sequence), BaseConv alone; one learning rate each: 3e-3
  (in trial runs of this budget BASED at 1e-2 had learned nothing after 500 steps, and with a
  512-token vocabulary 3e-3 beat 1e-2 and 3.2e-2 clearly), so "best learning rate per model"
  is over one value here; ``configs/mqar_paper.py`` sweeps the paper's four.

Everything runs in float32 on CPU with the XLA implementations.

    jaxbased-mqar --output_dir=results/mqar_cpu
"""

import ml_collections

from jaxbased.mqar.sweep import base_sweep_config, model_group


def get_config() -> ml_collections.ConfigDict:
    config = base_sweep_config()
    config.train_mix = ((64, 4, 6400), (128, 8, 3200), (256, 16, 6400))
    config.test_mix = ((256, 16, 256), (256, 32, 256))
    config.state_size_seq_len = 256  # attention's KV cache at the test length
    config.learning_rates = (3e-3,)
    config.train.batch_size = 32
    config.train.max_epochs = 4
    config.train.eval_every = 250
    config.train.eval_batch_size = 128
    config.models = ml_collections.ConfigDict(
        dict(
            attention=model_group("attention", dict(d_model=(64,))),
            based=model_group("based", dict(d_model=(64,), feature_dim=(4, 8, 16))),
            sliding_window=model_group("sliding_window", dict(d_model=(64,), window=(16, 256))),
            base_conv=model_group("base_conv", dict(d_model=(64,))),
        )
    )
    return config
