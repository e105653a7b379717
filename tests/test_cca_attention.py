"""CCA-Attention against a float64 NumPy reference written from the equations
(docs/mixers/cca_attention.md), full causal attention at g = 1, decode on ragged batches, and the
drop-in load of a Transformer++ model's attention parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig
from jaxbased.layers.cca_attention import CCAAttentionConfig, CCACache
from jaxbased.model import layer_mixer
from tests import reference_numpy as ref
from tests.conftest import init_model, relative_error

#: The section of the generic tests of tests/test_layers.py (d_model 8, up to 12 tokens): groups
#: of 2, a local window of 3, query blocks of 4, so that core tokens appear after 4 tokens.
GENERIC_TEST_SECTION = dict(heads=2, group_size=2, local_window=3, block_size=4)


def expected_state_growth(config: ModelConfig, short: int, long: int) -> int:
    """One core key and value per head and completed group: ``2 d`` floats every ``g`` tokens."""
    group = config.cca_attention.group_size
    return (long // group - short // group) * 2 * config.d_model


# The reference --------------------------------------------------------------------------------
def _softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=-1, keepdims=True)


def cca_reference(q, k, v, group_size, local_window):
    """``[B, T, H, D]`` rotated q, k and v -> ``[B, T, H, Dv]``, float64, one query at a time."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    seq, head_dim = q.shape[1], q.shape[-1]
    scale = head_dim**-0.5
    core_keys, core_values = [], []
    for group in range(seq // group_size):  # complete groups only
        members = slice(group * group_size, (group + 1) * group_size)
        last = (group + 1) * group_size - 1
        weights = _softmax(np.einsum("bhd,bghd->bhg", q[:, last], k[:, members]) * scale)
        core_keys.append(np.einsum("bhg,bghd->bhd", weights, k[:, members]))
        core_values.append(np.einsum("bhg,bghd->bhd", weights, v[:, members]))
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for i in range(seq):
        visible = max(0, (i + 1 - local_window) // group_size)
        keys = core_keys[:visible] + [k[:, j] for j in range(visible * group_size, i + 1)]
        values = core_values[:visible] + [v[:, j] for j in range(visible * group_size, i + 1)]
        keys, values = np.stack(keys, axis=1), np.stack(values, axis=1)  # [B, N, H, D]
        weights = _softmax(np.einsum("bhd,bnhd->bhn", q[:, i], keys) * scale)
        out[:, i] = np.einsum("bhn,bnhd->bhd", weights, values)
    return out


def numpy_forward(params, x, config):
    """The ``cca_attention`` mixer in float64: projections, rotary at each token's position,
    :func:`cca_reference`, output projection."""
    section, d_model = config.cca_attention, config.d_model
    seq = x.shape[1]
    kernel = np.asarray(params["qkv_proj"]["kernel"], np.float64)  # [d, 3, H, D]
    qkv = np.einsum("btd,dkhe->btkhe", np.asarray(x, np.float64), kernel)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    rotary_dim = section.rotary_dim(d_model)
    if rotary_dim:
        q = ref.rotary(q, range(seq), rotary_dim, section.rotary_base)
        k = ref.rotary(k, range(seq), rotary_dim, section.rotary_base)
    y = cca_reference(q, k, v, section.group_size, section.local_window)
    return np.einsum("bthe,hed->btd", y, np.asarray(params["out_proj"]["kernel"], np.float64))


# Helpers ---------------------------------------------------------------------------------------
def cca_config(**section) -> ModelConfig:
    values = dict(GENERIC_TEST_SECTION) | section
    return ModelConfig(
        vocab_size=32,
        d_model=8,
        num_layers=1,
        layer_pattern=("cca_attention",),
        cca_attention=values,
        init_std=0.3,
    )


def init_cca(config: ModelConfig):
    mixer = layer_mixer(config, "cca_attention", parent=None)
    x = jnp.zeros((1, 4, config.d_model), config.compute_dtype)
    return mixer, nn.meta.unbox(jax.jit(mixer.init)(jax.random.key(5), x)["params"])


# Tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("group_size", "local_window", "block_size", "seq"),
    [(3, 4, 5, 17), (2, 2, 16, 16), (4, 5, 3, 13)],
)
def test_forward_matches_the_float64_reference(group_size, local_window, block_size, seq, rng):
    config = cca_config(group_size=group_size, local_window=local_window, block_size=block_size)
    mixer, params = init_cca(config)
    x = rng.normal(size=(2, seq, 8)).astype(np.float32)
    got = jax.jit(mixer.apply)({"params": params}, x)
    assert relative_error(got, numpy_forward(params, x, config)) <= 1e-5


def test_groups_of_one_with_a_window_over_the_whole_sequence_is_full_causal_attention(rng):
    seq = 10
    config = cca_config(group_size=1, local_window=seq, block_size=4)
    mixer, params = init_cca(config)
    x = rng.normal(size=(2, seq, 8)).astype(np.float32)
    attention = ModelConfig(
        vocab_size=32, d_model=8, num_layers=1, layer_pattern=("attention",), attention={"heads": 2}
    )
    full = layer_mixer(attention, "attention", parent=None).apply({"params": params}, x)
    got = mixer.apply({"params": params}, x)
    assert relative_error(got, full) <= 1e-6
    want = ref.mixer_forward("attention", params, x, attention)  # float64 full attention
    assert relative_error(got, want) <= 1e-5


def test_float32_gradients_match_float64(rng):
    config = cca_config(group_size=3, local_window=3, block_size=4)
    _, params = init_cca(config)
    x = rng.normal(size=(2, 11, 8))
    weights = rng.normal(size=x.shape)

    def gradients(dtype):
        cast = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
        model = layer_mixer(
            config.replace(dtype=np.dtype(dtype).name), "cca_attention", parent=None
        )

        def loss(params, x):
            return jnp.sum(model.apply({"params": params}, x) * jnp.asarray(weights, dtype))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(cast, jnp.asarray(x, dtype))

    with jax.enable_x64(True):
        want = gradients(jnp.float64)
        got = gradients(jnp.float32)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert relative_error(got_leaf, want_leaf) <= 1e-5


def test_prefill_then_decode_equals_forward_on_ragged_rows(rng):
    """Rows of lengths 3, 8 and 13 (right-padded with noise) decode from their own positions;
    rotary on core keys (rotated before pooling) agrees between forward and decode."""
    config = cca_config(group_size=3, local_window=4, block_size=4, rotary_fraction=1.0)
    mixer, params = init_cca(config)
    lengths = np.array([3, 8, 13])
    total, steps = 22, 9
    x = rng.normal(size=(3, total, 8)).astype(np.float32)
    forward = np.asarray(mixer.apply({"params": params}, x))
    prompts = x[:, :13].copy()
    for row, length in enumerate(lengths):
        prompts[row, length:] = rng.normal(size=(13 - length, 8)) * 50  # padding: must not leak
    prefill = jax.jit(lambda p, x, n: mixer.apply(p, x, total, n, method="prefill"))
    decode = jax.jit(lambda p, x, c, t: mixer.apply(p, x, c, t, method="decode_step"))
    y, cache = prefill({"params": params}, prompts, jnp.asarray(lengths))
    assert isinstance(cache, CCACache)
    for row, length in enumerate(lengths):
        assert relative_error(y[row, :length], forward[row, :length]) <= 1e-5
    positions = lengths.copy()
    for _ in range(steps):
        tokens = x[np.arange(3), positions]
        y, cache = decode({"params": params}, tokens, cache, jnp.asarray(positions))
        assert relative_error(y, forward[np.arange(3), positions]) <= 1e-5, positions
        positions += 1
    # The core slots hold each row's completed groups, nothing of the padding.
    completed = positions // 3
    core = np.asarray(cache.core_keys)
    for row in range(3):
        assert np.all(core[row, :, completed[row] :] == 0)
        assert np.all(np.abs(core[row, :, : completed[row]]).sum(-1) > 0)


def test_cache_is_bounded_by_groups_plus_the_ring():
    config = cca_config(group_size=4, local_window=6)
    mixer = layer_mixer(config, "cca_attention", parent=None)
    cache = mixer.init_cache(2, 1000)
    assert cache.local.keys.shape == (2, 2, 10, 4)  # s + g raw slots
    assert cache.core_keys.shape == (2, 2, 250, 4)  # max_len / g core slots
    assert mixer.state_size(1000) == 2 * 8 * (10 + 250)
    full = layer_mixer(cca_config(group_size=1, local_window=1), "cca_attention", parent=None)
    assert full.state_size(1000) == 2 * 8 * (2 + 1000)


def test_flops_count_the_keys_each_query_sees():
    config = cca_config(group_size=4, local_window=6)
    mixer = layer_mixer(config, "cca_attention", parent=None)
    seq = 64
    keys = [max(0, (i + 1 - 6) // 4) + i + 1 - 4 * max(0, (i + 1 - 6) // 4) for i in range(seq)]
    d = 8
    assert mixer.flops(seq) == pytest.approx(8 * d * d + 6 * d + 4 * d * np.mean(keys))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"group_size": 0}, "cca_attention.group_size=0 must be an integer >= 1"),
        (
            {"local_window": 3, "group_size": 4},
            "cca_attention.local_window=3 must be >= group_size=4",
        ),
        ({"block_size": 0}, "cca_attention.block_size=0 must be an integer >= 1"),
        ({"heads": 3}, "cca_attention.heads=3 must divide d_model=8"),
    ],
)
def test_bad_sections_name_the_field(section, message):
    with pytest.raises(ValueError, match=message):
        cca_config(**section)


def test_a_transformer_checkpoint_loads_and_fine_tunes_as_cca(tmp_path):
    """A Transformer++ workdir's parameters are a CCA model's: same names and shapes; with g = 1
    and s >= T the logits are the Transformer's; and train.py fine-tunes the converted workdir."""
    from jaxbased.data.tokenizers import ByteTokenizer
    from jaxbased.interop.workdir import write_workdir
    from jaxbased.training.checkpointing import load_for_inference
    from jaxbased.training.configs import preset_config
    from tests.conftest import fine_tune_two_steps

    transformer = ModelConfig.from_preset(
        "attn_tiny", vocab_size=257, d_model=32, num_layers=2, layer_pattern=("attention",) * 2
    )
    _, params = init_model(transformer, seed=1)
    write_workdir(tmp_path / "transformer", transformer, params, ByteTokenizer())
    loaded_config, loaded, tokenizer = load_for_inference(tmp_path / "transformer")

    cca = loaded_config.replace(
        layer_pattern=("cca_attention",) * 2,
        cca_attention={**loaded_config.attention.to_dict(), "group_size": 1, "local_window": 16},
    )
    _, fresh = init_model(cca, seed=2)
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, loaded)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    want = LanguageModel(transformer).apply({"params": loaded}, tokens)
    got = LanguageModel(cca).apply({"params": loaded}, tokens)
    assert relative_error(got, want) <= 1e-5

    grouped = cca.replace(cca_attention={"group_size": 4, "local_window": 8})
    write_workdir(tmp_path / "cca", grouped, loaded, tokenizer)
    run_config = preset_config("cca_tiny", **grouped.to_dict())
    run_config.data.builtin_max_bytes = 40_000
    result = fine_tune_two_steps(run_config, tmp_path / "cca")
    assert result.initial_eval is None and result.final_step == 2  # resumed the converted step 0
    _, tuned, _ = load_for_inference(tmp_path / "cca")
    kernel = ("layers_0", "mixer", "qkv_proj", "kernel")
    assert not np.array_equal(_leaf(tuned, kernel), _leaf(loaded, kernel))


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def test_section_defaults():
    section = CCAAttentionConfig()
    assert (section.group_size, section.local_window) == (16, 256)
    assert section.ring_slots() == 272 and section.core_slots(16384) == 1024
