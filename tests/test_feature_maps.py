import numpy as np
import pytest

import pallas_kernels.feature_map_layout as layout
import pallas_kernels.linear_attention as pallas_linear_attention
from jaxbased.ops import FEATURE_MAP_NAMES, expanded_dim, get_feature_map
from jaxbased.ops import feature_maps as ops_feature_maps
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


def test_ops_and_kernels_share_one_copy_of_the_metadata():
    for name in ("FEATURE_MAP_NAMES", "TAYLOR_FEATURE_MAPS", "expanded_dim", "check_feature_map"):
        assert getattr(ops_feature_maps, name) is getattr(layout, name)
    assert pallas_linear_attention.expanded_dim is layout.expanded_dim
    assert pallas_linear_attention.TAYLOR_FEATURE_MAPS is layout.TAYLOR_FEATURE_MAPS
    assert tuple(ops_feature_maps.FEATURE_MAPS) == FEATURE_MAP_NAMES


@pytest.mark.parametrize("name", FEATURE_MAP_NAMES)
def test_feature_dim_of_inverts_expanded_dim(name):
    for feature_dim in range(1, 40):
        assert layout.feature_dim_of(name, expanded_dim(name, feature_dim)) == feature_dim
    with pytest.raises(ValueError, match="no feature_dim gives 0"):
        layout.feature_dim_of(name, 0)


@pytest.mark.parametrize("feature_dim", [1, 4, 16])
def test_zero_vector_features(feature_dim):
    # phi(0): what each right-pad token adds to the normalizer state (see discount_padding).
    for name in FEATURE_MAP_NAMES:
        features = np.asarray(get_feature_map(name)(np.zeros((feature_dim,), np.float32)))
        want = np.zeros(expanded_dim(name, feature_dim), np.float32)
        if name in layout.TAYLOR_FEATURE_MAPS:
            want[0] = 1.0
        elif name == "elu":
            want[:] = 1.0
        np.testing.assert_array_equal(features, want)
