"""The demo (``make demo``): a small BASED model on the built-in corpus, a few minutes on 2 CPU
cores. Byte-level tokens; BaseConv, linear-attention and sliding-window layers as in BASED."""

import ml_collections

from jaxbased.config import ModelConfig, based_layer_pattern
from jaxbased.training.configs import (
    data_defaults,
    distill_defaults,
    mesh_defaults,
    sample_defaults,
    train_defaults,
)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.preset = "demo"
    model = ModelConfig(
        vocab_size=257,
        d_model=128,
        num_layers=6,
        layer_pattern=based_layer_pattern(6, (1, 4), (2, 5)),
        mlp={"inner_dim": 256, "multiple_of": 64},
        based={"heads": 4, "feature_dim": 16, "chunk_size": 64},
        sliding_window={"heads": 4, "window": 64},
    )
    config.model = ml_collections.ConfigDict(model.to_dict())
    config.data = data_defaults(seq_len=256, batch_size=16, builtin_max_bytes=2_000_000)
    config.train = train_defaults(
        num_steps=300,
        learning_rate=3e-3,
        final_learning_rate=3e-4,
        warmup_steps=30,
        log_every=25,
        eval_every=100,
        eval_batches=4,
        checkpoint_every=100,
    )
    config.mesh = mesh_defaults()
    config.sample = sample_defaults(prompt="def ", max_new_tokens=200)
    config.distill = distill_defaults()
    return config
