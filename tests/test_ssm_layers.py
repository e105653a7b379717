"""Mamba, Mamba-2, decay attention and the Mamba-2-Hybrid in the model: float64 NumPy forwards,
generation consistency (also ragged), the mamba_360m parameter count and reference shapes,
config validation, FLOP counts and logical axis names."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig, count_parameters
from jaxbased.config import hybrid_layer_pattern
from jaxbased.generation import generate
from jaxbased.model import layer_mixer
from jaxbased.presets import MAMBA2_HYBRID_360M_PATTERN
from jaxbased.training.flops import flops_per_token, mixer_forward_flops
from tests import reference_ssm_numpy
from tests.conftest import relative_error

NEW_PRESETS = ["mamba_tiny", "mamba2_tiny", "mamba2_hybrid_tiny", "decay_tiny"]


def tiny(preset: str) -> ModelConfig:
    """The preset with two layers (the hybrid keeps its five) and larger weights."""
    config = ModelConfig.from_preset(preset, init_std=0.2)
    if "hybrid" in preset:
        return config
    return config.replace(num_layers=2, layer_pattern=config.layer_pattern[:2])


def init_model(config: ModelConfig):
    """The model and its unboxed float32 parameters (initialised under jit: one compile)."""
    model = LanguageModel(config)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return model, nn.meta.unbox(variables["params"])


def perturbed(params, rng, scale=0.3):
    """Every parameter moved by noise, so that D, norms, biases, A_log are all non-trivial."""
    return jax.tree.map(
        lambda p: np.asarray(p) + scale * rng.normal(size=p.shape).astype(np.float32), params
    )


# mamba2 layers: in the hybrid here, alone in test_layers.py and the two-group test below.
@pytest.mark.parametrize("preset", ["mamba_tiny", "mamba2_hybrid_tiny", "decay_tiny"])
def test_model_matches_float64_numpy_forward(preset, rng):
    config = tiny(preset)
    model, params = init_model(config)
    params = perturbed(params, rng)
    tokens = rng.integers(0, config.vocab_size, size=(2, 21))  # 21: past one 16-token chunk
    got = jax.jit(model.apply)({"params": params}, tokens)
    want = reference_ssm_numpy.model_forward(params, tokens, config)
    assert relative_error(got, want) <= 5e-5


def test_mamba2_with_two_groups_matches_float64_numpy(rng):
    # Four heads reading two groups of B and C; the gated norm then has two groups too.
    config = ModelConfig(
        vocab_size=32,
        d_model=8,
        num_layers=1,
        layer_pattern=("mamba2",),
        mamba2=dict(state_dim=3, head_dim=4, groups=2, chunk_size=4),
        init_std=0.3,
    )
    mixer = layer_mixer(config, "mamba2", parent=None)
    x = rng.normal(size=(2, 11, 8)).astype(np.float32)
    params = nn.meta.unbox(jax.jit(mixer.init)(jax.random.key(1), x)["params"])
    assert params["in_proj"]["kernel"].shape == (8, 16 + 16 + 2 * 2 * 3 + 4)
    params = perturbed(params, rng)
    got = jax.jit(mixer.apply)({"params": params}, x)
    want = reference_ssm_numpy.mamba2_forward(params, x, config)
    assert relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_ragged_prefill_then_decode_give_the_forward_logits(preset, rng):
    # Rows of 7 and 19 valid tokens (inside and past the first 16-token chunk), right-padded to
    # 19: the valid logits equal the forward's, and decoding each row from its own position
    # gives the forward's logits, so every cache holds exactly the valid tokens.
    config = tiny(preset)
    model, params = init_model(config)
    params = perturbed(params, rng, 0.1)
    total, lengths = 24, np.array([7, 19], np.int32)
    tokens = rng.integers(0, config.vocab_size, size=(2, total))
    forward = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
    prefill = jax.jit(
        lambda t, n: model.apply({"params": params}, t, total, n, method=LanguageModel.prefill)
    )
    decode = jax.jit(
        lambda t, c: model.apply({"params": params}, t, c, method=LanguageModel.decode_step)
    )
    padded = np.where(np.arange(19) < lengths[:, None], tokens[:, :19], 0)
    logits, cache = prefill(padded, lengths)
    for row, length in enumerate(lengths):
        assert np.abs(logits[row, :length] - forward[row, :length]).max() <= 1e-4
    np.testing.assert_array_equal(cache.positions, lengths)
    rows = np.arange(2)
    for step in range(total - 19):
        positions = lengths + step
        logits, cache = decode(jnp.asarray(tokens[rows, positions]), cache)
        assert np.abs(logits - forward[rows, positions]).max() <= 1e-4, step


def test_generate_with_the_hybrid_equals_repeated_argmax_of_the_forward(rng):
    config = ModelConfig.from_preset("mamba2_hybrid_tiny", init_std=0.2)
    model, params = init_model(config)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (3, 9)]
    result = generate(model, params, prompts, max_new_tokens=5, temperature=0.0)
    forward = jax.jit(model.apply)
    for prompt, generated in zip(prompts, result.tokens, strict=True):
        # Greedy: every generated token is the argmax of the full forward at the token before.
        sequence = jnp.asarray([prompt + list(generated)])
        logits = forward({"params": params}, sequence)[0, len(prompt) - 1 : -1, :256]
        assert list(generated) == np.argmax(logits, axis=-1).tolist()


def test_mamba_360m_parameter_count_and_reference_shapes():
    config = ModelConfig.from_preset("mamba_360m")
    abstract = jax.eval_shape(
        LanguageModel(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
    )["params"]
    d, inner, rank, state, layers = 1024, 2048, 64, 16, 46
    vocab = 50288  # MambaConfig's 50277 padded to a multiple of 16 (reference mamba-360m.yaml)
    per_layer = (
        d  # norm
        + 2 * inner * d  # in_proj
        + inner * 4
        + inner  # conv1d weight and bias
        + (rank + 2 * state) * inner  # x_proj
        + inner * rank
        + inner  # dt_proj weight and bias
        + inner * state
        + inner  # A_log, D
        + d * inner  # out_proj
    )
    expected = vocab * d + layers * per_layer + d
    assert count_parameters(abstract) == expected == 358_190_080  # the reference's 360M class
    mixer = nn.meta.unbox(abstract)["layers_0"]["mixer"]
    in_kernel = mixer["in_proj"]["kernel"].shape  # [d, 2, inner]: x half, then z
    as_torch = {  # our kernels are PyTorch's [out, in] weights transposed (conv: [K, C])
        "in_proj.weight": (math.prod(in_kernel[1:]), in_kernel[0]),
        "conv1d.weight": (mixer["conv_weight"].shape[1], 1, mixer["conv_weight"].shape[0]),
        "conv1d.bias": mixer["conv_bias"].shape,
        "x_proj.weight": mixer["x_proj"]["kernel"].shape[::-1],
        "dt_proj.weight": mixer["dt_proj_kernel"].shape[::-1],
        "dt_proj.bias": mixer["dt_bias"].shape,
        "A_log": mixer["A_log"].shape,
        "D": mixer["D"].shape,
        "out_proj.weight": mixer["out_proj"]["kernel"].shape[::-1],
    }
    assert as_torch == {
        "in_proj.weight": (2 * inner, d),
        "conv1d.weight": (inner, 1, 4),
        "conv1d.bias": (inner,),
        "x_proj.weight": (rank + 2 * state, inner),
        "dt_proj.weight": (inner, rank),
        "dt_proj.bias": (inner,),
        "A_log": (inner, state),
        "D": (inner,),
        "out_proj.weight": (d, inner),
    }
    assert set(nn.meta.unbox(abstract)["layers_0"]) == {"norm1", "mixer"}  # no MLP, one norm


def test_mamba2_and_hybrid_presets_are_in_the_360m_class():
    def count(preset):
        model = LanguageModel(ModelConfig.from_preset(preset))
        abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        return count_parameters(abstract["params"])

    assert count("mamba2_360m") == 368_346_624  # state-spaces/mamba2-370m: 48 layers of d 1024
    assert count("mamba2_hybrid_360m") == 351_317_888
    pattern = ModelConfig.from_preset("mamba2_hybrid_360m").layer_pattern
    assert (pattern.count("mamba2"), pattern.count("attention"), pattern.count("mlp")) == (
        20,
        4,
        24,
    )
    assert hybrid_layer_pattern(MAMBA2_HYBRID_360M_PATTERN) == pattern


def test_mamba_initialisation_follows_the_reference():
    config = ModelConfig.from_preset("mamba_tiny")
    mixer = layer_mixer(config, "mamba", parent=None)
    params = nn.meta.unbox(jax.jit(mixer.init)(jax.random.key(0), jnp.zeros((1, 3, 64)))["params"])
    np.testing.assert_allclose(params["A_log"], np.log(np.tile(np.arange(1, 9), (128, 1))))
    np.testing.assert_array_equal(params["D"], 1.0)
    dt = np.log1p(np.exp(np.asarray(params["dt_bias"], np.float64)))  # softplus
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    bound = config.mamba.time_step_rank(config.d_model) ** -0.5
    assert np.abs(params["dt_proj_kernel"]).max() <= bound
    assert np.abs(params["dt_proj_kernel"]).max() > 0.5 * bound  # uniform, not tiny normal
    mixer2 = layer_mixer(ModelConfig.from_preset("mamba2_tiny"), "mamba2", parent=None)
    params2 = jax.jit(mixer2.init)(jax.random.key(0), jnp.zeros((1, 3, 64)))["params"]
    params2 = nn.meta.unbox(params2)
    decay = np.exp(params2["A_log"])
    assert decay.shape == (8,) and decay.min() >= 1.0 and decay.max() <= 16.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mamba": {"expand": 0}}, "mamba.expand=0 must be an integer >= 1"),
        ({"mamba": {"state_dim": 2.5}}, "mamba.state_dim=2.5 must be an integer"),
        ({"mamba": {"dt_rank": 0}}, "mamba.dt_rank=0 must be an integer >= 1"),
        ({"mamba": {"scan_algorithm": "fft"}}, "mamba.scan_algorithm='fft' is not known"),
        ({"mamba2": {"dt_min": 0.0}}, "mamba2.dt_min=0.0 must be a number > 0"),
        ({"mamba": {"dt_max": 1e-4}}, "mamba.dt_max=0.0001 must be >= dt_min=0.001"),
        ({"mamba2": {"a_init_max": 0.5}}, "mamba2.a_init_max=0.5 must be >= a_init_min"),
        ({"mamba2": {"head_dim": 48}}, "mamba2.head_dim=48 must divide the inner width"),
        ({"mamba2": {"groups": 3}}, "mamba2.groups=3 must divide the number of heads=8"),
        ({"decay_attention": {"heads": 5}}, "decay_attention.heads=5 must divide d_model=64"),
        ({"decay_attention": {"feature_map": "cos"}}, "decay_attention.feature_map='cos' is not"),
        ({"decay_attention": {"output_gate": 1}}, "decay_attention.output_gate=1 must be True"),
    ],
)
def test_invalid_ssm_configs_name_the_field(overrides, message):
    pattern = ("mamba", "mamba2", "decay_attention", "mlp")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig.from_preset("mamba2_tiny", num_layers=4, layer_pattern=pattern, **overrides)
    with pytest.raises(ValueError, match=r"pattern='M\+' must be a non-empty string"):
        hybrid_layer_pattern("M+")


@pytest.mark.parametrize("name", ["mamba", "mamba2", "decay_attention", "mlp"])
def test_every_parameter_carries_logical_axis_names(name):
    config = ModelConfig.from_preset("mamba2_tiny", layer_pattern=(name,) * 4)
    mixer = layer_mixer(config, name, parent=None)
    boxed = jax.eval_shape(mixer.init, jax.random.key(0), jnp.zeros((1, 3, 64)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(
        isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim for leaf in leaves
    )


@pytest.mark.parametrize("preset", ["mamba_360m", "mamba2_360m", "mamba2_hybrid_360m"])
def test_flop_count_covers_every_projection(preset):
    # Forward FLOPs per token of each layer = 2 x its matmul weights + the mixing/conv terms
    # (elementwise, independent of the weights): compare the weight part with the real params.
    config = ModelConfig.from_preset(preset)
    abstract = nn.meta.unbox(
        jax.eval_shape(LanguageModel(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
            "params"
        ]
    )
    for index in (0, 1, 5):
        name = config.layer_pattern[index]
        mixer = abstract[f"layers_{index}"]["mixer"]
        matmul_weights = sum(
            math.prod(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(mixer)
            if "kernel" in jax.tree_util.keystr(path)
        )
        extra = mixer_forward_flops(name, config, 2048) - 2 * matmul_weights
        if name == "mamba":
            assert extra == 2 * 4 * 2048 + 4 * 2048 * 16
        elif name == "mamba2":
            per_head = 2 * 256 * 128 + 2 * 256 * 64 + 4 * 128 * 64
            assert extra == 2 * 4 * (2048 + 256) + 32 * per_head
        elif name == "attention":
            assert extra == 4 * (2048 + 1) / 2 * 1024
        else:
            assert name == "mlp" and extra == 0
    parts = flops_per_token(config, 2048)
    assert parts["total"] == sum(value for key, value in parts.items() if key != "total")
    by_kind = {
        name: 3 * config.layer_pattern.count(name) * mixer_forward_flops(name, config, 2048)
        for name in set(config.layer_pattern)
    }
    assert parts == {**by_kind, "head": 6 * 1024 * 50288, "total": parts["total"]}
