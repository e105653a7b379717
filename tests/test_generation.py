"""jaxbased.generate: greedy == repeated argmax of the full forward, ragged batches, sampling,
fixed-size caches, argument checks, streaming, compile cache and in-place cache updates."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbased
from jaxbased import LanguageModel, ModelConfig
from jaxbased.generation import (
    _programs_for,
    bucket_length,
    decode_cache_bytes,
    generate,
)
from jaxbased.sampling import sample_tokens
from tests.conftest import compiled_decode_step, init_model

PRESETS = ["based_tiny", "attn_tiny"]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=PRESETS)
def model_and_params(request):
    # init_std 0.2: logits far enough apart that argmax is not decided by rounding.
    return init_model(ModelConfig.from_preset(request.param, init_std=0.2))


@pytest.fixture(scope="module")
def based():
    return init_model(ModelConfig.from_preset("based_tiny", init_std=0.2))


def random_prompts(lengths, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def full_forward_greedy(model, params, prompt, steps):
    """Tokens and log-probs from re-running the whole forward pass for every new token."""
    vocab = model.config.vocab_size
    buffer = np.zeros((1, len(prompt) + steps), np.int32)
    buffer[0, : len(prompt)] = prompt
    forward = jax.jit(lambda t: model.apply({"params": params}, t))
    tokens, logprobs = [], []
    for step in range(steps):
        last = len(prompt) + step - 1  # causal: later (zero) tokens do not change this row
        logits = np.asarray(forward(buffer))[0, last, :vocab].astype(np.float64)
        token = int(np.argmax(logits))
        log_z = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
        tokens.append(token)
        logprobs.append(logits[token] - log_z)
        buffer[0, last + 1] = token
    return tokens, np.asarray(logprobs)


def test_greedy_equals_repeated_argmax_of_the_full_forward(model_and_params):
    model, params = model_and_params
    prompt = random_prompts([11])[0]  # 11 + 32 tokens: well past the window of 16
    result = generate(
        model, params, [prompt], max_new_tokens=NEW_TOKENS, temperature=0, return_logprobs=True
    )
    expected_tokens, expected_logprobs = full_forward_greedy(model, params, prompt, NEW_TOKENS)
    assert result.tokens == [expected_tokens]
    np.testing.assert_allclose(result.logprobs[0], expected_logprobs, atol=1e-4)
    assert result.num_generated.tolist() == [NEW_TOKENS] and not result.stopped[0]


def test_mixed_length_batch_equals_each_prompt_alone(model_and_params):
    model, params = model_and_params
    prompts = random_prompts([3, 17, 9, 30], seed=1)  # buckets 16 and 32; window 16
    batch = generate(model, params, prompts, max_new_tokens=16, temperature=0, return_logprobs=True)
    for row, prompt in enumerate(prompts):
        alone = generate(
            model, params, [prompt], max_new_tokens=16, temperature=0, return_logprobs=True
        )
        assert batch.tokens[row] == alone.tokens[0], row
        np.testing.assert_allclose(batch.logprobs[row], alone.logprobs[0], atol=1e-4)
    np.testing.assert_array_equal(batch.prompt_lengths, [3, 17, 9, 30])


def test_ragged_prefill_caches_equal_each_row_alone(model_and_params):
    model, params = model_and_params
    prompts = random_prompts([3, 17, 9], seed=2)
    padded = np.zeros((3, 20), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    prefill = jax.jit(
        lambda tokens, lengths=None, last=False: model.apply(
            {"params": params}, tokens, 40, lengths, last, method=LanguageModel.prefill
        ),
        static_argnums=2,
    )
    logits, cache = prefill(padded, np.array([3, 17, 9]), True)
    assert logits.shape == (3, model.config.padded_vocab_size)
    np.testing.assert_array_equal(cache.positions, [3, 17, 9])
    for row, prompt in enumerate(prompts):
        row_logits, row_cache = prefill(np.asarray([prompt]))
        np.testing.assert_allclose(logits[row], row_logits[0, -1], atol=1e-4)
        for ragged, alone in zip(
            jax.tree.leaves(cache.layers), jax.tree.leaves(row_cache.layers), strict=True
        ):
            np.testing.assert_allclose(ragged[row], alone[0], atol=1e-4, rtol=1e-5)


def test_same_seed_gives_the_same_sample(based):
    model, params = based
    prompts = random_prompts([5, 12], seed=3)
    kwargs = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=50, top_p=0.9)
    first = generate(model, params, prompts, seed=7, **kwargs)
    again = generate(model, params, prompts, seed=7, **kwargs)
    other = generate(model, params, prompts, seed=8, **kwargs)
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens
    assert all(0 <= t < model.config.vocab_size for row in first.tokens for t in row)


def test_top_k_one_and_vanishing_temperature_are_greedy(based):
    model, params = based
    prompts = random_prompts([5, 12], seed=4)
    greedy = generate(model, params, prompts, max_new_tokens=NEW_TOKENS, temperature=0)
    top_1 = generate(model, params, prompts, max_new_tokens=NEW_TOKENS, temperature=1.5, top_k=1)
    cold = generate(model, params, prompts, max_new_tokens=NEW_TOKENS, temperature=1e-6, seed=3)
    assert top_1.tokens == greedy.tokens
    assert cold.tokens == greedy.tokens


def test_based_cache_size_does_not_depend_on_max_new_tokens(based):
    model, params = based
    prompt = random_prompts([9], seed=5)
    short = generate(model, params, prompt, max_new_tokens=4, temperature=0)
    long = generate(model, params, prompt, max_new_tokens=64, temperature=0)
    assert short.cache_bytes == long.cache_bytes > 0
    assert decode_cache_bytes(model, 1, 16) == decode_cache_bytes(model, 1, 1 << 20)
    # Full attention's KV cache grows with the length it must hold.
    attention = LanguageModel(ModelConfig.from_preset("attn_tiny"))
    assert decode_cache_bytes(attention, 1, 1024) > 10 * decode_cache_bytes(attention, 1, 64)


def test_rows_stop_on_their_own_stop_tokens(based):
    model, params = based
    prompts = random_prompts([6, 10], seed=6)
    free = generate(model, params, prompts, max_new_tokens=24, temperature=0)
    stop = free.tokens[0][4]
    stopped = generate(model, params, prompts, max_new_tokens=24, temperature=0, stop_tokens=[stop])
    end = free.tokens[0].index(stop) + 1
    assert stopped.tokens[0] == free.tokens[0][:end] and stopped.stopped[0]
    assert stopped.token_array[0, end:].tolist() == [-1] * (24 - end)
    if stop in free.tokens[1]:
        assert stopped.tokens[1] == free.tokens[1][: free.tokens[1].index(stop) + 1]
    else:
        assert stopped.tokens[1] == free.tokens[1] and not stopped.stopped[1]


def test_callback_streams_every_step_in_order(based):
    model, params = based
    prompts = random_prompts([4, 7], seed=8)
    streamed = []
    result = generate(
        model,
        params,
        prompts,
        max_new_tokens=12,
        temperature=0.7,
        seed=1,
        callback=lambda step, tokens: streamed.append((step, tokens.tolist())),
    )
    assert [step for step, _ in streamed] == list(range(12))
    np.testing.assert_array_equal(np.array([t for _, t in streamed]).T, result.token_array)
    without = generate(model, params, prompts, max_new_tokens=12, temperature=0.7, seed=1)
    assert without.tokens == result.tokens


def _compiled_programs(model) -> dict[str, int]:
    """How many programs the prefill and decode jits of ``model`` hold (one per compilation)."""
    programs = _programs_for(model)
    return {"prefill": programs.prefill._cache_size(), "decode": programs.decode._cache_size()}


def test_compiled_once_per_shape_not_per_call(based):
    model, params = based
    generate(model, params, random_prompts([5, 9]), max_new_tokens=8, temperature=0.5)
    compiled = _compiled_programs(model)
    assert compiled["prefill"] >= 1 and compiled["decode"] >= 1
    # Same batch, same bucket (16), same max_new_tokens and sampling mode: no new program, even
    # with other prompts, lengths, seed, temperature, top_p value or stop tokens.
    generate(model, params, random_prompts([12, 2], seed=9), max_new_tokens=8, temperature=0.9)
    generate(model, params, random_prompts([16, 1]), max_new_tokens=8, seed=4, stop_tokens=[3])
    assert _compiled_programs(model) == compiled
    generate(model, params, random_prompts([17, 1]), max_new_tokens=8)  # bucket 32: new prefill
    assert _compiled_programs(model) == dict(compiled, prefill=compiled["prefill"] + 1)


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 1024, 1025, 4096, 5000)] == [
        16,
        16,
        32,
        128,
        1024,
        2048,
        4096,
        5120,
    ]


def test_sampling_filters_keep_the_right_tokens():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
    key = jax.random.key(0)

    def frequencies(**kwargs):
        tokens = np.asarray(sample_tokens(logits, key, **kwargs))
        return np.bincount(tokens, minlength=4) / len(tokens)

    np.testing.assert_allclose(frequencies(), probs, atol=0.03)
    np.testing.assert_allclose(frequencies(top_k=2), [0.625, 0.375, 0, 0], atol=0.03)
    # top_p 0.7: 0.5 < 0.7, 0.5 + 0.3 >= 0.7, so tokens 0 and 1.
    np.testing.assert_allclose(frequencies(top_p=0.7), [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_allclose(
        frequencies(top_p=0.9), np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.03
    )
    assert frequencies(temperature=0.0).tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_loop_does_not_copy_the_caches(model_and_params, batch):
    # docs/performance.md: caches must be updated in place. Every cache-sized buffer the
    # compiled loop copies is read and written once more per step. Seen and fixed: a
    # [B, S, H, D] KV layout made XLA transpose-copy every attention cache on every step; with
    # B = 1 XLA duplicated the slot update (dynamic_update_slice) and copied the cache 4 times
    # per step.
    model, params = model_and_params
    hlo, cache = compiled_decode_step(model, params, batch)
    big = {leaf.shape for leaf in jax.tree.leaves(cache.layers) if leaf.ndim >= 3}
    # The short conv's [B, K-1, C] state is a shift (read before write): a copy of 2 rows is
    # the cheapest way to do it, and is allowed.
    conv_states = {leaf.shape for leaf in jax.tree.leaves(cache.layers) if leaf.ndim == 3}
    base_conv = model.config.base_conv
    conv_states &= {(batch, base_conv.kernel_size - 1, base_conv.channels(model.config.d_model))}
    copied = []
    for shape in re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\{[0-9,]*\} copy\(", hlo):
        dims = tuple(int(d) for d in shape.split(",") if d)
        if dims in big - conv_states or (
            len(dims) >= 3 and np.prod(dims) >= min(np.prod(s) for s in big - conv_states)
        ):
            copied.append(dims)
    assert not copied, f"the decode loop copies cache-sized buffers: {copied}"
    assert "input_output_alias" in hlo.splitlines()[0]  # the donated caches are reused


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[1, 256]]), "token id 256 outside the vocabulary"),
        (dict(prompts=[[-1, 2]]), "token id -1 outside the vocabulary"),
        (dict(prompts=np.array([1, 2, 3])), "wrap a single prompt"),
        (dict(stop_tokens=[300]), "stop token 300"),
    ],
)
def test_invalid_arguments_raise_value_error(based, kwargs, message):
    model, params = based
    arguments = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(model, params, arguments.pop("prompts"), **arguments)


def test_zero_new_tokens_and_array_prompts(based):
    model, params = based
    empty = generate(model, params, [[1, 2]], max_new_tokens=0)
    assert empty.tokens == [[]] and empty.token_array.shape == (1, 0)
    prompts = np.asarray(random_prompts([6, 6], seed=10))
    from_array = generate(model, params, prompts, max_new_tokens=5, temperature=0)
    from_lists = generate(model, params, prompts.tolist(), max_new_tokens=5, temperature=0)
    assert from_array.tokens == from_lists.tokens
    assert jaxbased.generate is generate
