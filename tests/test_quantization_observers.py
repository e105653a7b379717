"""Observers and int8 arithmetic against NumPy: min-max and percentile-EMA scales, the int8 grid,
and integer matmuls against the fake-quant (float) ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased.quantization.int8 import dequantize, fake_quantize, quantize, quantized_matmul
from jaxbased.quantization.observers import MinMaxObserver, PercentileObserver, weight_scale


def batches(rng, count=5):
    # heavy tails, like the SSM input: a few outliers per batch
    return [rng.standard_t(df=2, size=(2, 37, 24)).astype(np.float32) for _ in range(count)]


def test_min_max_observer_is_the_running_max_of_abs(rng):
    data = batches(rng)
    observer = MinMaxObserver()
    for values in data:
        observer.update(jnp.asarray(values))
    expected = max(np.abs(v.astype(np.float64)).max() for v in data)
    assert observer.scale() == pytest.approx(expected / 127, rel=1e-6)


@pytest.mark.parametrize("percentile,momentum", [(0.99999, 0.01), (0.9, 0.5), (0.5, 1.0)])
def test_percentile_observer_is_an_ema_of_per_batch_quantiles(rng, percentile, momentum):
    data = batches(rng)
    observer = PercentileObserver(percentile=percentile, momentum=momentum)
    for values in data:
        observer.update(jnp.asarray(values))
    running = None
    for values in data:
        q = np.quantile(np.abs(values.astype(np.float64)).ravel(), percentile)
        running = q if running is None else running + momentum * (q - running)
    assert observer.scale() == pytest.approx(running / 127, rel=1e-5)
    assert observer.scale() <= MinMaxObserver(max(np.abs(v).max() for v in data)).scale()


def test_observers_refuse_bad_settings_and_empty_state():
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=0.0)
    with pytest.raises(ValueError, match="momentum"):
        PercentileObserver(momentum=1.5)
    with pytest.raises(ValueError, match="no calibration batch"):
        MinMaxObserver().scale()


def test_quantize_rounds_to_the_symmetric_int8_grid(rng):
    x = rng.normal(size=(200,)).astype(np.float32) * 3
    scale = np.float32(0.02)
    expected = np.clip(np.round(x.astype(np.float64) / scale), -127, 127)
    codes = quantize(x, scale)
    assert codes.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(codes), expected)
    np.testing.assert_allclose(np.asarray(fake_quantize(x, scale)), expected * scale, rtol=1e-6)
    assert np.asarray(dequantize(codes, scale)).dtype == np.float32
    w = rng.normal(size=(5, 7))
    assert weight_scale(w) == pytest.approx(np.abs(w).max() / 127, rel=1e-6)


def test_int8_matmul_is_exact_and_agrees_with_fake_quant_to_float_rounding(rng):
    x_codes = jnp.asarray(rng.integers(-127, 128, size=(3, 4, 96)), jnp.int8)
    w_codes = jnp.asarray(rng.integers(-127, 128, size=(96, 40)), jnp.int8)
    sx, sw = np.float32(0.013), np.float32(0.0041)
    exact = np.asarray(x_codes, np.int64) @ np.asarray(w_codes, np.int64)
    real = quantized_matmul(x_codes, sx, w_codes, sw, "int8")
    traced = jax.make_jaxpr(quantized_matmul, static_argnums=4)
    jaxpr = str(traced(x_codes, sx, w_codes, sw, "int8"))
    assert "preferred_element_type=int32" in jaxpr
    np.testing.assert_allclose(
        np.asarray(real, np.float64), exact * (float(sx) * float(sw)), rtol=1e-6
    )
    fake = quantized_matmul(x_codes, sx, w_codes, sw, "fake")
    bound = 96 * np.finfo(np.float32).eps * np.abs(exact).max() * float(sx) * float(sw) * 4
    assert np.max(np.abs(np.asarray(fake) - np.asarray(real))) <= bound
    with pytest.raises(ValueError, match="arithmetic"):
        quantized_matmul(x_codes, sx, w_codes, sw, "float")
