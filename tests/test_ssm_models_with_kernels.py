"""Mamba and Mamba-2 models train the same with the Pallas kernels and with XLA, on CPU.

``implementation="pallas"`` runs the selective-scan kernel (Mamba) and the linear-attention
kernel with the identity map and grouped ``b, c`` (Mamba-2's SSD), interpreted; five SGD steps
of a one-layer model of each must give the losses of ``implementation="xla"`` within 1e-5
(relative), and the XLA run must actually train.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import ModelConfig
from tests.conftest import init_model, sgd_losses

SEQ = 24


def train(preset: str, mixer: str, implementation: str, tokens, steps: int = 5) -> list[float]:
    config = ModelConfig.from_preset(
        preset, num_layers=1, layer_pattern=(mixer,), implementation=implementation
    )
    model, params = init_model(config, seq=SEQ)
    return sgd_losses(model, params, tokens, learning_rate=1.0, steps=steps)


@pytest.mark.parametrize(("preset", "mixer"), [("mamba_tiny", "mamba"), ("mamba2_tiny", "mamba2")])
def test_training_with_the_kernels_equals_training_with_xla(preset, mixer, rng):
    tokens = jnp.asarray(rng.integers(0, 256, size=(2, SEQ + 1)), jnp.int32)
    xla_losses = train(preset, mixer, "xla", tokens)
    pallas_losses = train(preset, mixer, "pallas", tokens)
    assert xla_losses[-1] < xla_losses[0]  # it does train
    np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-5)
