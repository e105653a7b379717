import numpy as np
import pytest

from jaxbased.ops import FEATURE_MAP_NAMES, expanded_dim, get_feature_map
from tests import reference_numpy as ref


@pytest.mark.parametrize("name", FEATURE_MAP_NAMES)
@pytest.mark.parametrize("feature_dim", [1, 4, 16])
def test_feature_map_matches_numpy(name, feature_dim, rng):
    x = rng.normal(size=(3, 5, feature_dim)).astype(np.float32)
    got = np.asarray(get_feature_map(name)(x))
    want = ref.phi(x, name)
    assert got.shape == want.shape == (3, 5, expanded_dim(name, feature_dim))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("feature_dim", [8, 16, 24])
def test_taylor_kernel_is_second_order_exp(feature_dim, rng):
    q, k = rng.normal(size=(2, 7, feature_dim))
    s = (q * k).sum(-1) / np.sqrt(feature_dim)
    for name in ("taylor", "taylor_symmetric"):
        features = get_feature_map(name)
        kernel = (np.asarray(features(q.astype(np.float32))) * features(k.astype(np.float32))).sum(
            -1
        )
        np.testing.assert_allclose(kernel, 1 + s + s**2 / 2, rtol=1e-5)


def test_expanded_dims():
    assert expanded_dim("taylor", 16) == 273
    assert expanded_dim("taylor_symmetric", 16) == 153
    assert expanded_dim("elu", 16) == 16


def test_unknown_feature_map_is_rejected():
    with pytest.raises(ValueError, match=r"feature_map=.cosine.*allowed"):
        get_feature_map("cosine")
    with pytest.raises(ValueError, match="feature_dim=0"):
        expanded_dim("taylor", 0)
