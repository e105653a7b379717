"""EchoAtt's distillation loss (jaxbased.training.distillation) against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import ModelConfig
from jaxbased.training.distillation import (
    DistillationWeights,
    block_boundaries,
    distillation_token_losses,
)


def numpy_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    student, teacher = (rng.normal(size=(2, 3, 7)).astype(np.float32) for _ in range(2))
    student_hidden = [rng.normal(size=(2, 3, 5)).astype(np.float32) for _ in range(2)]
    teacher_hidden = [rng.normal(size=(2, 3, 5)).astype(np.float32) for _ in range(2)]
    loss, parts = distillation_token_losses(
        jnp.asarray(student), jnp.asarray(teacher), student_hidden, teacher_hidden
    )
    log_s, log_t = numpy_log_softmax(student), numpy_log_softmax(teacher)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
    labels = teacher.argmax(-1)
    hard = -np.take_along_axis(log_s, labels[..., None], -1)[..., 0]
    hidden = np.mean(
        [
            ((s.astype(np.float64) - t) ** 2).mean(-1)
            for s, t in zip(student_hidden, teacher_hidden, strict=True)
        ],
        axis=0,
    )
    np.testing.assert_allclose(parts["kl"], kl, atol=1e-5)
    np.testing.assert_allclose(parts["teacher_ce"], hard, atol=1e-5)
    np.testing.assert_allclose(parts["hidden_mse"], hidden, atol=1e-5)
    np.testing.assert_allclose(loss, 0.25 * hidden + 0.25 * kl + 0.5 * hard, atol=1e-5)


def test_a_student_equal_to_its_teacher_has_only_the_entropy_term():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 6)), jnp.float32)
    hidden = [jnp.ones((1, 4, 3))]
    _, parts = distillation_token_losses(logits, logits, hidden, hidden)
    np.testing.assert_allclose(parts["kl"], 0.0, atol=1e-6)
    np.testing.assert_allclose(parts["hidden_mse"], 0.0, atol=1e-6)
    expected = -numpy_log_softmax(logits).max(-1)
    np.testing.assert_allclose(parts["teacher_ce"], expected, atol=1e-5)


def test_gradient_reaches_the_student_only():
    rng = np.random.default_rng(2)
    student, teacher = (jnp.asarray(rng.normal(size=(1, 2, 5)), jnp.float32) for _ in range(2))

    def total(s, t):
        return distillation_token_losses(s, t, [], [])[0].mean()

    grad_student, grad_teacher = jax.grad(total, argnums=(0, 1))(student, teacher)
    assert np.abs(grad_student).max() > 0
    np.testing.assert_array_equal(grad_teacher, 0.0)


def test_block_boundaries_are_the_last_layer_of_each_sharing_block():
    config = ModelConfig.from_preset(
        "attn_tiny",
        num_layers=6,
        layer_pattern=("attention",) * 6,
        attention_sharing={2: 1, 3: 1, 5: 4},
    )
    assert block_boundaries(config) == (3, 5)
    assert block_boundaries(ModelConfig.from_preset("attn_tiny")) == ()


@pytest.mark.parametrize(
    "weights", [{"kl_weight": -1.0}, {"hidden_weight": 0, "kl_weight": 0, "hard_weight": 0}]
)
def test_bad_weights_are_named(weights):
    with pytest.raises(ValueError, match="weight"):
        DistillationWeights(**weights)
