import importlib
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxbased import MIXER_NAMES, ModelConfig
from jaxbased.layers import MIXERS, GatedMLP, Mixer, RMSNorm, build_mixer
from jaxbased.model import layer_mixer
from tests import reference_numpy as ref
from tests import reference_ssm_numpy
from tests.conftest import relative_error


def mixer_test_module(name: str) -> types.ModuleType | None:
    """``tests/test_<name>.py`` of a mixer added later (docs/adding_a_mixer.md#4-tests), or None."""
    try:
        return importlib.import_module(f"tests.test_{name}")
    except ModuleNotFoundError as error:
        if error.name != f"tests.test_{name}":
            raise
        return None


def mixer_config(name: str, **overrides) -> ModelConfig:
    """A one-layer model of mixer ``name`` at ``d_model`` 8; a mixer added later sizes its own
    section by ``GENERIC_TEST_SECTION`` in its test file."""
    values = dict(
        vocab_size=32,
        d_model=8,
        num_layers=1,
        layer_pattern=(name,),
        mlp=dict(inner_dim=16, multiple_of=8),
        based=dict(heads=2, feature_dim=4, chunk_size=4),
        sliding_window=dict(heads=2, window=3),
        attention=dict(heads=2),
        mamba=dict(state_dim=4, chunk_size=4),
        mamba2=dict(state_dim=4, head_dim=4, chunk_size=4),
        decay_attention=dict(heads=2, chunk_size=4),
        init_std=0.3,  # larger than the LM's 0.02 so that outputs are O(1)
    )
    module = mixer_test_module(name) if name not in values else None
    if module is not None and hasattr(module, "GENERIC_TEST_SECTION"):
        values[name] = dict(module.GENERIC_TEST_SECTION)
    values.update(overrides)
    return ModelConfig(**values)


def init_mixer(name: str, config: ModelConfig, seq: int = 5):
    mixer = layer_mixer(config, name, parent=None)
    x = jnp.zeros((1, seq, config.d_model), config.compute_dtype)
    return mixer, nn.meta.unbox(jax.jit(mixer.init)(jax.random.key(3), x)["params"])


def test_registry_covers_every_mixer_name():
    assert set(MIXERS) == set(MIXER_NAMES)
    config = mixer_config("based")
    with pytest.raises(ValueError, match="mixer 'mamba9'"):
        build_mixer("mamba9", config.based, config.mixer_context)
    with pytest.raises(TypeError, match="mixer 'based' takes a BasedConfig; got MambaConfig"):
        build_mixer("based", config.mamba, config.mixer_context)


def expected_state_growth(name: str, config: ModelConfig, short: int, long: int) -> int:
    """Floats the state of mixer ``name`` gains from ``short`` to ``long`` tokens: 0, full
    attention's K and V per token, or what a later mixer's ``expected_state_growth(config,
    short, long)`` in its test file says (a bounded cache that grows, such as pooled keys)."""
    if name == "attention":
        return (long - short) * 2 * config.d_model
    module = mixer_test_module(name)
    if module is not None and hasattr(module, "expected_state_growth"):
        return module.expected_state_growth(config, short, long)
    return 0


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_mixer_keeps_the_contract(name):
    """Every registered mixer is a ``Mixer``; its cache is of its registered type; its state size
    counts its cache's floats and grows with the sequence only as :func:`expected_state_growth`
    says."""
    config = mixer_config(name)
    mixer = layer_mixer(config, name, parent=None)
    assert isinstance(mixer, Mixer)
    cache = mixer.init_cache(2, 16)
    assert isinstance(cache, MIXERS[name].cache_type)
    floats = sum(leaf.size for leaf in jax.tree.leaves(cache) if leaf.dtype.kind == "f") // 2
    assert mixer.state_size(16) == floats
    grows = mixer.state_size(32) - mixer.state_size(16)
    assert grows == expected_state_growth(name, config, 16, 32)
    assert mixer.flops(16) > 0


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_mixer_matches_float64_numpy(name, rng):
    config = mixer_config(name)
    mixer, params = init_mixer(name, config)
    x = rng.normal(size=(2, 11, config.d_model)).astype(np.float32)
    got = jax.jit(mixer.apply)({"params": params}, x)
    assert got.shape == x.shape
    want = reference_ssm_numpy.mixer_forward(name, params, x, config)
    assert relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_mixer_is_causal(name, rng):
    config = mixer_config(name)
    mixer, params = init_mixer(name, config)
    x = rng.normal(size=(1, 12, config.d_model)).astype(np.float32)
    apply = jax.jit(mixer.apply)
    base = np.asarray(apply({"params": params}, x))
    for t in (0, 5, 11):
        perturbed = x.copy()
        perturbed[:, t] += 1.0
        out = np.asarray(apply({"params": params}, perturbed))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-4


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_mixer_gradients_match_central_differences_in_float64(name, rng):
    with jax.enable_x64(True):
        config = mixer_config(name, dtype="float64")
        mixer, params = init_mixer(name, config, seq=7)
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        x = jnp.asarray(rng.normal(size=(2, 7, config.d_model)), jnp.float64)
        weights = jnp.asarray(rng.normal(size=x.shape), jnp.float64)

        @jax.jit  # one compile of the forward and one of its VJP, not op-by-op dispatch
        def loss(params, x):
            return jnp.sum(mixer.apply({"params": params}, x) * weights)

        assert loss(params, x).dtype == jnp.float64
        check_grads(loss, (params, x), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("name", MIXER_NAMES)
@pytest.mark.parametrize("prompt", [1, 2, 9])
def test_mixer_prefill_then_decode_equals_forward(name, prompt, rng):
    config = mixer_config(name)
    mixer, params = init_mixer(name, config)
    seq = 12
    x = rng.normal(size=(2, seq, config.d_model)).astype(np.float32)
    forward = jax.jit(mixer.apply)({"params": params}, x)
    prefill = jax.jit(lambda p, x: mixer.apply(p, x, seq, method="prefill"))
    y, cache = prefill({"params": params}, x[:, :prompt])
    assert relative_error(y, forward[:, :prompt]) <= 1e-5
    empty = mixer.init_cache(2, seq)
    assert jax.tree.structure(empty) == jax.tree.structure(cache)
    # One compile of the step, not op-by-op dispatch on every token.
    decode = jax.jit(lambda p, x, c, t: mixer.apply(p, x, c, t, method="decode_step"))
    for t in range(prompt, seq):
        position = jnp.full((2,), t, jnp.int32)
        y, cache = decode({"params": params}, x[:, t], cache, position)
        assert relative_error(y, forward[:, t]) <= 1e-5, t


def test_rms_norm_and_gated_mlp_match_numpy(rng):
    config = mixer_config("based")
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    norm = RMSNorm(8, 1e-5)
    norm_params = {"weight": rng.normal(size=8).astype(np.float32)}
    got = norm.apply({"params": norm_params}, x)
    assert relative_error(got, ref.rms_norm(x, norm_params["weight"], 1e-5)) <= 1e-6

    mlp = GatedMLP(config.mlp, config.mixer_context)
    params = nn.meta.unbox(mlp.init(jax.random.key(0), x)["params"])
    assert params["fc1"]["kernel"].shape == (8, 2, 16)
    both = x.astype(np.float64) @ np.asarray(params["fc1"]["kernel"], np.float64).reshape(8, 32)
    want = (both[..., :16] * ref.silu(both[..., 16:])) @ np.asarray(params["fc2"]["kernel"])
    assert relative_error(mlp.apply({"params": params}, x), want) <= 1e-5


def test_parameters_carry_logical_axis_names():
    config = mixer_config("sliding_window")
    mixer = layer_mixer(config, "sliding_window", parent=None)
    boxed = mixer.init(jax.random.key(0), jnp.zeros((1, 3, 8)))["params"]
    assert boxed["qkv_proj"]["kernel"].names == ("embed", None, "heads", "head_dim")
    assert boxed["out_proj"]["kernel"].names == ("heads", "head_dim", "embed")
