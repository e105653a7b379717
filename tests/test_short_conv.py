import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased.ops import init_short_conv_state, short_conv, short_conv_step
from tests import reference_numpy as ref
from tests.conftest import relative_error


@pytest.mark.parametrize("kernel_size", [1, 3, 4])
@pytest.mark.parametrize("seq", [1, 2, 11])
def test_short_conv_matches_numpy(kernel_size, seq, rng):
    x = rng.normal(size=(2, seq, 6)).astype(np.float32)
    weight = rng.normal(size=(kernel_size, 6)).astype(np.float32)
    got, state = short_conv(x, weight, return_state=True)
    assert relative_error(got, ref.short_conv(x, weight)) <= 1e-6
    padded = np.concatenate([np.zeros((2, kernel_size - 1, 6), np.float32), x], axis=1)
    np.testing.assert_array_equal(state, padded[:, padded.shape[1] - (kernel_size - 1) :])


def test_last_tap_multiplies_the_current_token():
    x = np.zeros((1, 5, 1), np.float32)
    x[0, 2, 0] = 1.0
    weight = np.array([[10.0], [20.0], [30.0]], np.float32)
    y = np.asarray(short_conv(x, weight))[0, :, 0]
    np.testing.assert_array_equal(y, [0, 0, 30, 20, 10])


@pytest.mark.parametrize("prompt", [0, 1, 6])
def test_decode_steps_equal_the_forward(prompt, rng):
    x = rng.normal(size=(3, 10, 4)).astype(np.float32)
    weight = rng.normal(size=(3, 4)).astype(np.float32)
    forward = short_conv(x, weight)
    if prompt:
        _, state = short_conv(x[:, :prompt], weight, return_state=True)
    else:
        state = init_short_conv_state(3, 3, 4)
    for t in range(prompt, 10):
        y, state = short_conv_step(jnp.asarray(x[:, t]), state, weight)
        assert relative_error(y, forward[:, t]) <= 1e-6


def test_bad_shapes_are_named(rng):
    x = rng.normal(size=(2, 5, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="weight must be"):
        short_conv(x, np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="initial_state must be"):
        short_conv(x, np.ones((3, 4), np.float32), initial_state=np.zeros((2, 1, 4)))
