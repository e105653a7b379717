"""Hadamard matrices: entries ±1 and H Hᵀ = n I, exactly, for every covered width family."""

import numpy as np
import pytest

from jaxbased.quantization.hadamard import (
    hadamard_factorization,
    hadamard_matrix,
    normalized_hadamard,
    paley_matrix,
    rotate,
    supports_hadamard,
)

WIDTHS = [1, 2, 4, 8, 64, 256, 12, 24, 48, 96, 192, 20, 40, 80, 160, 320, 640, 1536]


@pytest.mark.parametrize("width", WIDTHS)
def test_hadamard_rows_are_orthogonal_and_entries_are_plus_minus_one(width):
    h = hadamard_matrix(width)
    assert h.shape == (width, width)
    assert set(np.unique(h).tolist()) <= {-1, 1}
    product = h.astype(np.int64) @ h.astype(np.int64).T  # exact in integers
    np.testing.assert_array_equal(product, width * np.eye(width, dtype=np.int64))


@pytest.mark.parametrize("order", [4, 8, 12, 20, 24, 32, 44])
def test_paley_construction_for_primes_three_mod_four(order):
    h = paley_matrix(order)
    np.testing.assert_array_equal(h @ h.T, order * np.eye(order, dtype=np.int64))


@pytest.mark.parametrize("order", [6, 14, 16, 30])  # 5, 13: 1 mod 4; 15: not prime
def test_paley_refuses_orders_it_cannot_build(order):
    with pytest.raises(ValueError, match="prime"):
        paley_matrix(order)


@pytest.mark.parametrize("width", [0, -4, 3, 6, 10, 28, 36, 100, 1000, 2.0, True])
def test_unsupported_widths_raise_one_clear_error(width):
    assert not supports_hadamard(width)
    with pytest.raises(ValueError, match="no Hadamard matrix of width"):
        hadamard_matrix(width)


def test_factorization_names_base_and_doublings():
    assert hadamard_factorization(1536) == (12, 7)
    assert hadamard_factorization(5120) == (20, 8)  # 40·2^7
    assert hadamard_factorization(1024) == (1, 10)


def test_rotation_is_orthogonal_against_numpy(rng):
    width = 96
    x = rng.normal(size=(3, 5, width)).astype(np.float32)
    expected = x.astype(np.float64) @ hadamard_matrix(width).astype(np.float64) / np.sqrt(width)
    np.testing.assert_allclose(np.asarray(rotate(x)), expected, rtol=1e-5, atol=1e-5)
    q = np.asarray(normalized_hadamard(width), np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(width), atol=1e-6)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(rotate(x)), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )
