"""Recycled Attention (jaxbased.ops.recycled_attention, generate(recycled_attention=...)).

Generation with ``K >= context`` or ``stride = 1`` equals plain full attention; the selection,
the refresh of a full step and a recycled step agree with NumPy float64; the similarity rule
fires when the query turns away; bad policies and models without full attention are errors.
"""

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import LanguageModel, ModelConfig, RecycledAttentionPolicy, generate
from jaxbased.generation import (
    recycled_attention_layers,
    teacher_forced_logprobs,
)
from jaxbased.ops.recycled_attention import (
    RecycledKVCache,
    recycled_attention_step,
    select_recycled_slots,
    selection_scores,
)
from jaxbased.ops.window_attention import KVCache
from tests.conftest import compiled_decode_step, init_model

REPO = pathlib.Path(__file__).resolve().parents[1]
NEW_TOKENS = 20
#: Unrolled and scanned Transformer++ and a BaseConv + attention hybrid, all tiny.
MODELS = {
    "transformer": {"layer_pattern": ("attention",) * 2},
    "transformer_scanned": {"layer_pattern": ("attention",) * 2, "scan_layers": True},
    "hybrid": {"layer_pattern": ("base_conv", "attention")},
}
RAGGED_PROMPTS = (11, 5)


def tiny_config(name: str) -> ModelConfig:
    # init_std 0.2: logits far enough apart that argmax is not decided by rounding.
    return ModelConfig.from_preset("attn_tiny", init_std=0.2, num_layers=2, **MODELS[name])


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_baseline(request):
    """A tiny model, two ragged prompts and their greedy generation under full attention."""
    model, params = init_model(tiny_config(request.param))
    rows = prompts(RAGGED_PROMPTS)  # ragged: the rows' sets start with different numbers of tokens
    return model, params, rows, greedy(model, params, rows)


@pytest.fixture(scope="module")
def transformer():
    return init_model(tiny_config("transformer"))


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n).tolist() for n in lengths]


def greedy(model, params, rows, policy=None):
    return generate(
        model,
        params,
        rows,
        max_new_tokens=NEW_TOKENS,
        temperature=0,
        return_logprobs=True,
        recycled_attention=policy,
    )


def assert_same_generation(result, expected):
    assert result.tokens == expected.tokens
    for got, want in zip(result.logprobs, expected.logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


# -- generation equals full attention where it must --------------------------------------------


def test_top_k_covering_the_context_equals_full_attention(model_and_baseline):
    model, params, rows, expected = model_and_baseline
    # 16 (bucket) + 20 slots: every token fits in the set, so recycled steps see every key
    result = greedy(model, params, rows, RecycledAttentionPolicy(top_k=64, stride=6))
    assert_same_generation(result, expected)
    # 19 decode steps: full at 6, 12, 18 in every full-attention layer
    layers = len(recycled_attention_layers(model.config))
    assert result.full_attention_steps.tolist() == [3] * layers


def test_stride_one_equals_full_attention(model_and_baseline):
    model, params, rows, expected = model_and_baseline
    result = greedy(model, params, rows, RecycledAttentionPolicy(top_k=2, stride=1))
    assert_same_generation(result, expected)
    assert set(result.full_attention_steps.tolist()) == {NEW_TOKENS - 1}


def test_a_small_set_changes_the_output(transformer):
    # The two equalities above are not vacuous: with K = 2 the recycled steps see less.
    model, params = transformer
    rows = prompts(RAGGED_PROMPTS)  # the baseline's shapes: its compiled programs are reused
    expected = greedy(model, params, rows)
    result = greedy(model, params, rows, RecycledAttentionPolicy(top_k=2, stride=5))
    assert np.abs(result.logprobs[0] - expected.logprobs[0]).max() > 1e-2
    assert result.full_attention_steps.tolist() == [3, 3]  # full at steps 5, 10, 15


def forward_logprobs(model, params, tokens):
    """``[T - 1]`` float64: ``log p(tokens[0, t] | tokens[0, :t])`` for ``t >= 1`` from the
    training forward (one row)."""
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)), np.float64)
    logits = logits[0, :-1, : model.config.vocab_size]
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(logits)), tokens[0, 1:]] - log_z


def test_teacher_forced_logprobs_match_the_full_forward(transformer):
    model, params = transformer
    tokens = np.asarray(prompts([24], seed=3), np.int32)
    reference = forward_logprobs(model, params, tokens)[9:]  # tokens 10 .. 23
    covering = teacher_forced_logprobs(
        model, params, tokens, 10, recycled_attention=RecycledAttentionPolicy(top_k=24, stride=4)
    )
    np.testing.assert_allclose(covering.logprobs[0], reference, atol=1e-4)
    assert covering.full_attention_steps.tolist() == [3, 3]  # 13 decode steps: 4, 8, 12


def test_local_only_equals_a_sliding_window_of_k_keys():
    # One attention layer: its keys and values come from the embeddings alone, so the cache is
    # the same however the prompt was attended, and decoding over the last K positions is the
    # sliding_window mixer (same parameters) with window K.
    k = 5
    config = tiny_config("transformer").replace(num_layers=1, layer_pattern=("attention",))
    model, params = init_model(config)
    window = LanguageModel(
        config.replace(
            layer_pattern=("sliding_window",),
            sliding_window={**config.attention.to_dict(), "window": k},
        )
    )
    tokens = np.asarray(prompts([20], seed=4), np.int32)
    reference = forward_logprobs(window, params, tokens)[8:]  # tokens 9 .. 19
    full_attention = forward_logprobs(model, params, tokens)[8:]
    assert np.abs(full_attention - reference)[1:].max() > 1e-2  # the window matters here
    local = teacher_forced_logprobs(
        model, params, tokens, 9, recycled_attention=RecycledAttentionPolicy.local_only(k)
    )
    # the first scored token comes from the (full-attention) prefill; the rest are decoded
    np.testing.assert_allclose(local.logprobs[0, 1:], reference[1:], atol=1e-4)
    assert local.full_attention_steps.tolist() == [0]


def test_the_choice_of_step_is_a_lax_cond(transformer):
    model, params = transformer
    policy = RecycledAttentionPolicy(top_k=2, stride=3)
    tokens = jnp.asarray(prompts([6]), jnp.int32)
    _, cache = model.apply(
        {"params": params}, tokens, 10, None, True, policy, method=LanguageModel.prefill
    )
    assert all(isinstance(layer, RecycledKVCache) for layer in cache.layers)
    jaxpr = jax.make_jaxpr(
        lambda c: model.apply({"params": params}, tokens[:, 0], c, method=LanguageModel.decode_step)
    )(cache)
    assert str(jaxpr).count("cond[") == 2  # one per layer


@pytest.mark.parametrize("batch", [1, 2])
def test_the_decode_loop_does_not_copy_the_full_caches(transformer, batch):
    # A recycled step must not cost a read and write of the whole KV cache: the new key and
    # value are written outside the lax.cond, whose branches only read the cache.
    model, params = transformer
    policy = RecycledAttentionPolicy(top_k=4, stride=3, similarity_threshold=0.5)
    hlo, cache = compiled_decode_step(model, params, batch, recycled_attention=policy)
    full = {leaf.shape for leaf in jax.tree.leaves(cache.layers) if leaf.ndim == 4}
    assert full == {(batch, 4, 48, 16)}
    smallest = min(np.prod(shape) for shape in full)
    copied = [
        dims
        for shape in re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\{[0-9,]*\} copy\(", hlo)
        if np.prod(dims := tuple(int(d) for d in shape.split(",") if d)) >= smallest
    ]
    assert not copied, f"the decode loop copies cache-sized buffers: {copied}"
    assert "input_output_alias" in hlo.splitlines()[0]  # the donated caches are reused


# -- the selection, the refresh and the recycled step against NumPy float64 ------------------


def numpy_selection(probabilities, slot_positions, kv_heads, head_selection, pool_size, k):
    batch, _, slots = probabilities.shape
    grouped = probabilities.astype(np.float64).reshape(batch, kv_heads, -1, slots)
    valid = (slot_positions >= 0)[:, None, :]
    if head_selection == "first_head":
        scores = grouped[:, :, 0]
    else:
        head_max = np.where(valid, grouped.max(axis=2), 0.0)
        radius = pool_size // 2
        scores = np.stack(
            [
                head_max[:, :, max(0, j - radius) : j + radius + 1].max(axis=-1)
                for j in range(slots)
            ],
            axis=-1,
        )
    scores = np.where(valid, scores, -np.inf)
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]  # ties: the lower slot
    return order, np.take_along_axis(scores, order, axis=-1)


@pytest.mark.parametrize(
    "head_selection,pool_size", [("first_head", 5), ("group_max", 1), ("group_max", 5)]
)
def test_selection_picks_the_largest_attention_mass(head_selection, pool_size):
    rng = np.random.default_rng(0)
    batch, query_heads, kv_heads, slots, k = 2, 6, 2, 13, 4
    slot_positions = np.tile(np.arange(slots), (batch, 1))
    slot_positions[1, 9:] = -1  # row 1 holds 9 tokens
    logits = rng.normal(size=(batch, query_heads, slots)) * 2
    logits = np.where((slot_positions >= 0)[:, None], logits, -np.inf)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    scores = selection_scores(
        jnp.asarray(probabilities, jnp.float32),
        jnp.asarray(slot_positions, jnp.int32),
        kv_heads=kv_heads,
        head_selection=head_selection,
        pool_size=pool_size,
    )
    slots_got, scores_got = select_recycled_slots(scores, k)
    slots_want, scores_want = numpy_selection(
        probabilities, slot_positions, kv_heads, head_selection, pool_size, k
    )
    np.testing.assert_array_equal(np.asarray(slots_got), slots_want)
    np.testing.assert_allclose(np.asarray(scores_got), scores_want, rtol=1e-6)


def random_cache(rng, batch, heads, capacity, head_dim, filled, policy, set_slots, set_scores):
    keys = rng.normal(size=(batch, heads, capacity, head_dim)).astype(np.float32)
    values = rng.normal(size=(batch, heads, capacity, head_dim)).astype(np.float32)
    positions = np.where(np.arange(capacity) < filled, np.arange(capacity), -1)
    keys[:, :, filled:] = values[:, :, filled:] = 0
    full = KVCache(
        keys=jnp.asarray(keys),
        values=jnp.asarray(values),
        slot_positions=jnp.asarray(np.tile(positions, (batch, 1)), jnp.int32),
    )
    return RecycledKVCache(
        full=full,
        slots=jnp.asarray(set_slots, jnp.int32),
        scores=jnp.asarray(set_scores, jnp.float32),
        full_query=jnp.asarray(rng.normal(size=(batch, heads, head_dim)), jnp.float32),
        steps_since_full=jnp.zeros((), jnp.int32),
        full_steps=jnp.zeros((), jnp.int32),
        policy=policy,
    )


def numpy_attention(q, keys, values):
    logits = np.einsum("hd,hsd->hs", q.astype(np.float64), keys) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return weights, np.einsum("hs,hsd->hd", weights, values)


def test_a_full_step_refreshes_the_set_from_its_attention_probabilities():
    rng = np.random.default_rng(1)
    batch, heads, capacity, head_dim, filled, k = 1, 3, 16, 8, 10, 4
    policy = RecycledAttentionPolicy(top_k=k, stride=1, head_selection="first_head")
    stale = np.tile(np.arange(k), (batch, heads, 1))
    cache = random_cache(
        rng, batch, heads, capacity, head_dim, filled, policy, stale, np.ones((1, heads, k))
    )
    q, key, value, raw = (rng.normal(size=(batch, heads, head_dim)) * 2 for _ in range(4))
    position = np.array([filled])
    out, new = recycled_attention_step(
        *(jnp.asarray(x, jnp.float32) for x in (q, key, value, raw)),
        cache,
        jnp.asarray(position, jnp.int32),
    )
    keys = np.concatenate([np.asarray(cache.full.keys)[0, :, :filled], key[0][:, None]], axis=1)
    values = np.concatenate(
        [np.asarray(cache.full.values)[0, :, :filled], value[0][:, None]], axis=1
    )
    weights, expected = numpy_attention(q[0], keys, values)
    np.testing.assert_allclose(np.asarray(out)[0], expected, atol=1e-5)
    top = np.argsort(-weights, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.sort(np.asarray(new.slots)[0], -1), np.sort(top, -1))
    np.testing.assert_allclose(
        np.sort(np.asarray(new.scores)[0], -1),
        np.sort(np.take_along_axis(weights, top, -1), -1),
        rtol=1e-5,
    )
    assert int(new.full_steps) == 1 and int(new.steps_since_full) == 0
    np.testing.assert_allclose(np.asarray(new.full_query), raw.astype(np.float32))


def test_a_recycled_step_attends_only_the_set_and_evicts_its_lowest_entry():
    rng = np.random.default_rng(2)
    batch, heads, capacity, head_dim, filled, k = 1, 2, 16, 8, 10, 4
    policy = RecycledAttentionPolicy(top_k=k, stride=100)
    set_slots = np.array([[[7, 2, 5, 0], [1, 9, 3, 8]]])
    set_scores = np.array([[[0.4, 0.1, 0.3, 0.2], [0.5, 0.6, 0.7, 0.05]]])
    cache = random_cache(
        rng, batch, heads, capacity, head_dim, filled, policy, set_slots, set_scores
    )
    q, key, value, raw = (rng.normal(size=(batch, heads, head_dim)) for _ in range(4))
    out, new = recycled_attention_step(
        *(jnp.asarray(x, jnp.float32) for x in (q, key, value, raw)),
        cache,
        jnp.asarray([filled], jnp.int32),
    )
    kept = [[7, 5, 0], [1, 9, 3]]  # slot 2 (score 0.1) and slot 8 (0.05) go, slot 10 comes
    keys, values = np.asarray(cache.full.keys)[0], np.asarray(cache.full.values)[0]
    for head in range(heads):
        head_keys = np.concatenate([keys[head, kept[head]], key[0, head][None]])
        head_values = np.concatenate([values[head, kept[head]], value[0, head][None]])
        _, expected = numpy_attention(q[0, head][None], head_keys[None], head_values[None])
        np.testing.assert_allclose(np.asarray(out)[0, head], expected[0], atol=1e-5)
        assert sorted(np.asarray(new.slots)[0, head].tolist()) == sorted(kept[head] + [filled])
    np.testing.assert_allclose(np.asarray(new.full.keys)[0, :, filled], key[0], rtol=1e-6)
    assert int(new.full_steps) == 0 and int(new.steps_since_full) == 1


@pytest.mark.parametrize(
    "steps_before,direction,full",
    [
        (1, -1.0, True),  # a check step (2 % 2 == 0), the query turned away: full
        (1, 1.0, False),  # a check step, the same query: recycled
        (0, -1.0, False),  # not a check step (1 % 2 != 0): recycled whatever the query
    ],
)
def test_the_similarity_rule_refreshes_when_the_query_turns_away(steps_before, direction, full):
    rng = np.random.default_rng(3)
    batch, heads, capacity, head_dim, filled, k = 2, 2, 12, 4, 8, 3
    policy = RecycledAttentionPolicy(top_k=k, stride=100, similarity_threshold=0.5, check_every=2)
    set_slots = np.tile(np.arange(k), (batch, heads, 1))
    cache = random_cache(
        rng, batch, heads, capacity, head_dim, filled, policy, set_slots, np.ones(set_slots.shape)
    )
    cache = cache.replace(steps_since_full=jnp.asarray(steps_before, jnp.int32))
    # Row 0 keeps its query; row 1 follows `direction` (one row below the threshold suffices).
    raw = np.asarray(cache.full_query).copy()
    raw[1] *= direction
    q, key, value = (rng.normal(size=(batch, heads, head_dim)) for _ in range(3))
    _, new = recycled_attention_step(
        *(jnp.asarray(x, jnp.float32) for x in (q, key, value, raw)),
        cache,
        jnp.full((batch,), filled, jnp.int32),
    )
    assert int(new.full_steps) == int(full)
    assert int(new.steps_since_full) == (0 if full else steps_before + 1)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments,message",
    [
        ({"top_k": 0}, r"top_k=0 must be an integer >= 1"),
        ({"top_k": 4, "stride": 0}, r"stride=0 must be an integer >= 1"),
        ({"top_k": 4, "similarity_threshold": 1.5}, r"similarity_threshold=1.5 .* \[-1, 1\]"),
        ({"top_k": 4, "similarity_threshold": -1.01}, r"similarity_threshold=-1.01"),
        ({"top_k": 4, "check_every": 0}, r"check_every=0 must be an integer >= 1"),
        ({"top_k": 4, "head_selection": "max"}, r"head_selection='max' .* allowed: \("),
        ({"top_k": 4, "pool_size": 4}, r"pool_size=4 must be an odd integer"),
        ({"top_k": 2.5}, r"top_k=2.5 must be an integer"),
    ],
)
def test_bad_policies_are_errors(arguments, message):
    with pytest.raises(ValueError, match=message):
        RecycledAttentionPolicy(**arguments)


@pytest.mark.parametrize("preset", ["based_tiny", "cca_tiny"])
def test_a_model_without_full_attention_is_an_error(preset):
    model = LanguageModel(ModelConfig.from_preset(preset))
    with pytest.raises(ValueError, match=r"needs full-attention layers .* layer_pattern="):
        generate(
            model,
            None,
            [[1, 2]],
            max_new_tokens=2,
            recycled_attention=RecycledAttentionPolicy(top_k=4),
        )


def test_a_policy_must_be_a_policy(transformer):
    model, params = transformer
    with pytest.raises(ValueError, match=r"recycled_attention=4 must be a RecycledAttentionPolicy"):
        generate(model, params, [[1, 2]], max_new_tokens=2, recycled_attention=4)


# -- jaxbased-generate --------------------------------------------------------------------------


def cli_policy(**values):
    """``jaxbased-generate``'s policy for these ``--recycled_*`` flag values, defaults as the
    flags' (the flag-free builder, so that no absl flags are defined in this process)."""
    from jaxbased.cli.recycled_flags import policy_from_flag_values

    values.setdefault("recycled_top_k", 0)
    return policy_from_flag_values(
        **{name.removeprefix("recycled_"): value for name, value in values.items()}
    )


def test_the_cli_flags_build_the_policy():
    assert cli_policy() is None  # --recycled_top_k=0: off
    assert cli_policy(
        recycled_top_k=3,
        recycled_stride=4,
        recycled_similarity_threshold=0.5,
        recycled_check_every=2,
        recycled_head_selection="first_head",
        recycled_pool_size=3,
    ) == RecycledAttentionPolicy(
        top_k=3,
        stride=4,
        similarity_threshold=0.5,
        check_every=2,
        head_selection="first_head",
        pool_size=3,
    )


@pytest.mark.parametrize(
    "values,message",
    [
        ({"recycled_top_k": -2}, "--recycled_top_k=-2 must be >= 1 (0: Recycled Attention off)"),
        ({"recycled_stride": 0}, "--recycled_stride=0 must be an integer >= 1"),
        ({"recycled_similarity_threshold": 1.5}, "--recycled_similarity_threshold=1.5 must be"),
        ({"recycled_check_every": 0}, "--recycled_check_every=0 must be an integer >= 1"),
        ({"recycled_head_selection": "best"}, "--recycled_head_selection='best' is not known"),
        ({"recycled_pool_size": 2}, "--recycled_pool_size=2 must be an odd integer >= 1"),
    ],
)
def test_the_cli_names_the_flag_of_a_bad_value(values, message):
    from jaxbased.cli.errors import UsageError

    with pytest.raises(UsageError) as raised:
        cli_policy(**{"recycled_top_k": 4, **values})
    assert message in str(raised.value)


def test_a_bad_flag_value_is_a_one_line_usage_error(tmp_path):
    command = [
        sys.executable, "-m", "jaxbased.cli.generate", f"--workdir={tmp_path}", "--prompt=a",
        "--recycled_top_k=4", "--recycled_stride=0",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --recycled_stride=0 must be an integer >= 1"


def test_the_flag_defaults_are_the_builders_defaults():
    """The builder's keyword defaults stand in for the flags' in the tests above; a fresh
    process reads the flags' own defaults so that the two cannot drift apart."""
    import inspect
    import json

    from jaxbased.cli.recycled_flags import policy_from_flag_values

    script = (
        "import json; from absl import flags; import jaxbased.cli.generate;"
        "print(json.dumps({name: flags.FLAGS[name].default for name in flags.FLAGS"
        " if name.startswith('recycled_')}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    flag_defaults = json.loads(done.stdout)
    parameters = inspect.signature(policy_from_flag_values).parameters
    builder_defaults = {
        f"recycled_{name}": parameter.default
        for name, parameter in parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    assert flag_defaults == {"recycled_top_k": 0, **builder_defaults}
