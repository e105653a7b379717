"""Mamba and Mamba-2 models train the same with the Pallas kernels and with XLA, on CPU.

``implementation="pallas"`` runs the selective-scan kernel (Mamba) and the linear-attention
kernel with the identity map and grouped ``b, c`` (Mamba-2's SSD), interpreted; five SGD steps
of a one-layer model of each must give the losses of ``implementation="xla"`` within 1e-5
(relative), and the XLA run must actually train.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbased import ModelConfig
from tests.conftest import init_model

SEQ = 24


def train(preset: str, mixer: str, implementation: str, tokens, steps: int = 5) -> list[float]:
    config = ModelConfig.from_preset(
        preset, num_layers=1, layer_pattern=(mixer,), implementation=implementation
    )
    model, params = init_model(config, seq=SEQ)

    def loss_fn(params):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), tokens[:, 1:]
        ).mean()

    optimizer = optax.sgd(1.0)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize(("preset", "mixer"), [("mamba_tiny", "mamba"), ("mamba2_tiny", "mamba2")])
def test_training_with_the_kernels_equals_training_with_xla(preset, mixer, rng):
    tokens = jnp.asarray(rng.integers(0, 256, size=(2, SEQ + 1)), jnp.int32)
    xla_losses = train(preset, mixer, "xla", tokens)
    pallas_losses = train(preset, mixer, "pallas", tokens)
    assert xla_losses[-1] < xla_losses[0]  # it does train
    np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-5)
