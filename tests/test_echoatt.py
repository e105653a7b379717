"""EchoAtt (docs/echoatt.md): layers that reuse an anchor layer's attention probabilities.

The model option (``ModelConfig.attention_sharing``) against a NumPy float64 reference of the
shared-probabilities computation, its parameter and cache sizes against formulas, prefill +
decode against the forward, and the bad values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import ModelConfig, count_parameters, generate
from jaxbased.ops.shared_attention import ValueCache
from jaxbased.ops.window_attention import KVCache
from tests import reference_numpy as ref
from tests.conftest import init_model

#: Layer 1 anchors layers 2 and 3 (default anchors: the nearest earlier non-sharing layer).
SHARING = {2: None, 3: None}


def tiny_config(**overrides) -> ModelConfig:
    # attn_tiny: 4 full-attention layers, d_model 64, 4 heads, rotary on half of each head.
    # init_std 0.2: logits far enough apart that greedy decoding is not decided by rounding.
    return ModelConfig.from_preset("attn_tiny", init_std=0.2, **overrides)


def tokens_for(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, seq)).astype(np.int32)


@pytest.fixture(scope="module")
def sharing_model():
    return init_model(tiny_config(attention_sharing=SHARING))


# -- the configuration ----------------------------------------------------------------------


def test_default_and_explicit_anchors():
    config = tiny_config(attention_sharing={2: None, 3: 0})
    assert config.attention_sharing == ((2, 1), (3, 0))
    assert config.anchor_layers == (0, 1)
    # a list of sharing layers, and pairs with string keys (as a JSON config stores them)
    assert tiny_config(attention_sharing=[1, 2]).attention_sharing == ((1, 0), (2, 0))
    assert tiny_config(attention_sharing={"3": "1"}).attention_sharing == ((3, 1),)
    # the stored form reads back
    again = ModelConfig.from_dict(config.to_dict())
    assert again.attention_sharing == config.attention_sharing


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention_sharing": {0: None}}, "layer 0 cannot share"),
        ({"attention_sharing": {2: 3}}, "must be an earlier layer"),
        ({"attention_sharing": {2: 1, 1: 0}}, "shares attention itself"),
        ({"attention_sharing": {3: 7}}, "anchor layer 7 is outside"),
        ({"attention_sharing": [2, 2]}, "listed twice"),
        ({"attention_sharing": {1: None}, "scan_layers": True}, "scan_layers"),
        (
            {
                "attention_sharing": {1: None},
                "layer_pattern": ("attention", "mlp", "attention", "attention"),
            },
            "layer 1 is a 'mlp' layer",
        ),
        (
            {
                "attention_sharing": {2: 1},
                "layer_pattern": ("attention", "sliding_window", "attention", "attention"),
            },
            "anchor 1 of layer 2 is a 'sliding_window' layer",
        ),
        (
            {
                "attention_sharing": {2: None},
                "layer_pattern": ("mlp", "mlp", "attention", "attention"),
            },
            "no earlier full-attention layer",
        ),
    ],
)
def test_bad_sharing_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match="attention_sharing=") as error:
        tiny_config(**overrides)
    assert message in str(error.value)


# -- parameters and forward -----------------------------------------------------------------


def test_no_sharing_is_transformer_plus_plus():
    tokens = tokens_for(2, 12)
    base_model, base_params = init_model(tiny_config())
    model, params = init_model(tiny_config(attention_sharing={}))
    assert jax.tree.structure(params) == jax.tree.structure(base_params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(base_params), strict=True):
        np.testing.assert_array_equal(got, want)
    logits = model.apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_array_equal(logits, base_model.apply({"params": base_params}, tokens))
    reference = ref.shared_attention_model_forward(params, tokens, model.config)[0]
    np.testing.assert_allclose(np.asarray(logits, np.float64), reference, atol=2e-4)


def test_sharing_removes_exactly_the_query_and_key_kernels(sharing_model):
    model, params = sharing_model
    _, base_params = init_model(tiny_config())
    d_model = model.config.d_model
    removed = 2 * d_model * d_model * len(model.config.attention_sharing)  # W_Q and W_K
    assert count_parameters(params) == count_parameters(base_params) - removed
    assert set(params["layers_2"]["mixer"]) == {"v_proj", "out_proj"}
    assert set(params["layers_1"]["mixer"]) == {"qkv_proj", "out_proj"}
    assert set(params["layers_2"]) == set(base_params["layers_2"])  # norms and MLP kept


def test_sharing_forward_matches_numpy(sharing_model):
    model, params = sharing_model
    tokens = tokens_for(2, 12, seed=1)
    logits = model.apply({"params": params}, jnp.asarray(tokens))
    reference = ref.shared_attention_model_forward(params, tokens, model.config)[0]
    np.testing.assert_allclose(np.asarray(logits, np.float64), reference, atol=2e-4)
    # not vacuous: the same parameters read as their own attention would differ
    base_model, base_params = init_model(tiny_config())
    assert not np.allclose(base_model.apply({"params": base_params}, tokens), logits, atol=1e-2)


def test_block_outputs_end_in_the_logits(sharing_model):
    model, params = sharing_model
    tokens = jnp.asarray(tokens_for(1, 8))
    logits, outputs = model.apply({"params": params}, tokens, method="with_block_outputs")
    assert len(outputs) == model.config.num_layers
    np.testing.assert_allclose(logits, model.apply({"params": params}, tokens), atol=1e-6)


# -- decoding -------------------------------------------------------------------------------


def forward_logprobs(model, params, row: list[int]) -> np.ndarray:
    """``log p(row[t] | row[:t])`` for ``t >= 1`` from the forward, float64."""
    logits = np.asarray(model.apply({"params": params}, jnp.asarray([row])), np.float64)[0]
    logits = logits[:-1, : model.config.vocab_size]
    shifted = logits - logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(-1))
    return shifted[np.arange(len(row) - 1), row[1:]] - log_z


def test_prefill_and_decode_equal_the_forward_on_ragged_prompts(sharing_model):
    model, params = sharing_model
    rows = [tokens_for(1, n, seed=n)[0].tolist() for n in (11, 5)]
    result = generate(model, params, rows, max_new_tokens=8, temperature=0, return_logprobs=True)
    for prompt, new, logprobs in zip(rows, result.tokens, result.logprobs, strict=True):
        full = prompt + new
        expected = forward_logprobs(model, params, full)[len(prompt) - 1 :]
        np.testing.assert_allclose(logprobs, expected, atol=1e-4)


def test_a_sharing_layer_caches_values_only(sharing_model):
    model, _ = sharing_model
    batch, max_len = 2, 24
    cache = model.init_cache(batch, max_len)
    base = init_model(tiny_config())[0].init_cache(batch, max_len)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [KVCache, KVCache, ValueCache, ValueCache]
    section, d_model = model.config.attention, model.config.d_model
    value_bytes = batch * section.heads * max_len * section.head_dim(d_model) * 4
    slot_bytes = batch * max_len * 4

    def nbytes(tree):
        return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))

    assert nbytes(cache.layers[2]) == value_bytes
    assert nbytes(base.layers[2]) == 2 * value_bytes + slot_bytes
    assert nbytes(cache) == nbytes(base) - 2 * (value_bytes + slot_bytes)


def test_recycled_attention_refuses_a_sharing_model(sharing_model):
    from jaxbased import RecycledAttentionPolicy

    model, params = sharing_model
    with pytest.raises(ValueError, match="attention_sharing"):
        generate(
            model,
            params,
            [[1, 2, 3]],
            max_new_tokens=2,
            recycled_attention=RecycledAttentionPolicy(top_k=2),
        )
