"""Recycled Attention in the serving engine (EngineConfig.recycled_attention).

The per-row schedule (jaxbased.ops.recycled_attention_slots) gives each row what the batch-wide
step of jaxbased.ops.recycled_attention gives that row alone, whatever the other rows' phases;
free slots never cause the full-attention pass. Through the engine, concurrent requests (slots
at different positions and phases, whole and chunked prefills, slots reused) each get the
tokens of generate(..., recycled_attention=policy) on their prompt alone, and with K covering
the context, or stride 1, the tokens of plain full attention; nothing retraces.
"""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbased import ModelConfig, RecycledAttentionPolicy, generate
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.ops.recycled_attention import (
    RecycledKVCache,
    init_recycled_cache,
    recycled_attention_step,
)
from jaxbased.ops.recycled_attention_slots import SlotRecycledKVCache, slot_recycled_attention_step
from jaxbased.ops.window_attention import KVCache
from jaxbased.serving import Completion, Engine, EngineConfig, Request, SamplingParams
from tests.conftest import init_model
from tests.test_recycled_attention import REPO

TOKENIZER = ByteTokenizer()
MAX_LEN = 48
batch_step = jax.jit(recycled_attention_step)
per_row_step = jax.jit(slot_recycled_attention_step)
POLICY = RecycledAttentionPolicy(top_k=4, stride=3)


# -- the per-row step against the batch-wide step on each row alone -----------------------------


def one_row_cache(rng, filled, policy, steps_since_full, heads=2, capacity=16, head_dim=4):
    """A batch-wide cache of one row holding ``filled`` random tokens, its set chosen from a
    random last query, ``steps_since_full`` steps after its last full step."""
    keys = rng.normal(size=(1, heads, capacity, head_dim)).astype(np.float32)
    values = rng.normal(size=(1, heads, capacity, head_dim)).astype(np.float32)
    keys[:, :, filled:] = values[:, :, filled:] = 0
    positions = np.where(np.arange(capacity) < filled, np.arange(capacity), -1)[None]
    full = KVCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions, jnp.int32))
    query = jnp.asarray(rng.normal(size=(1, heads, head_dim)), jnp.float32)
    cache = init_recycled_cache(full, query, query, policy)
    return cache.replace(steps_since_full=jnp.asarray(steps_since_full, jnp.int32))


def stack_rows(rows: list[RecycledKVCache], active: list[bool]) -> SlotRecycledKVCache:
    """The per-row cache whose row ``b`` is ``rows[b]`` (its counters become row ``b``'s)."""

    def cat(*leaves):
        return jnp.concatenate(leaves, axis=0)

    return SlotRecycledKVCache(
        full=jax.tree.map(cat, *(row.full for row in rows)),
        slots=cat(*(row.slots for row in rows)),
        scores=cat(*(row.scores for row in rows)),
        full_query=cat(*(row.full_query for row in rows)),
        steps_since_full=jnp.stack([row.steps_since_full for row in rows]),
        full_steps=jnp.stack([row.full_steps for row in rows]),
        active=jnp.asarray(active),
        force_full=jnp.zeros(len(rows), bool),
        policy=rows[0].policy,
    )


@pytest.mark.parametrize(
    "policy",
    [
        RecycledAttentionPolicy(top_k=3, stride=3),
        RecycledAttentionPolicy(top_k=3, stride=50, similarity_threshold=0.3, check_every=2),
    ],
)
def test_each_row_follows_its_own_schedule(policy):
    rng = np.random.default_rng(0)
    filled, phases = (9, 5, 12), (0, 1, 2)  # rows at different positions and phases
    rows = [one_row_cache(rng, n, policy, phase) for n, phase in zip(filled, phases, strict=True)]
    cache = stack_rows(rows, active=[True] * 3)
    position = jnp.asarray(filled, jnp.int32)
    full_steps_seen = set()
    for _ in range(7):
        q, k, v, raw = (jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32) for _ in range(4))
        out, cache = per_row_step(q, k, v, raw, cache, position)
        for b in range(3):
            want, rows[b] = batch_step(
                q[b : b + 1],
                k[b : b + 1],
                v[b : b + 1],
                raw[b : b + 1],
                rows[b],
                position[b : b + 1],
            )
            np.testing.assert_allclose(
                np.asarray(out[b : b + 1]), np.asarray(want), rtol=1e-5, atol=1e-6
            )
            np.testing.assert_array_equal(np.asarray(cache.slots[b]), np.asarray(rows[b].slots[0]))
            assert int(cache.steps_since_full[b]) == int(rows[b].steps_since_full)
            assert int(cache.full_steps[b]) == int(rows[b].full_steps)
        full_steps_seen.add(tuple(np.asarray(cache.full_steps).tolist()))
        position = position + 1
    # the rows did not refresh together: at some step their full-step counts differed
    assert any(len(set(counts)) > 1 for counts in full_steps_seen)


def test_a_free_row_never_causes_the_full_pass():
    rng = np.random.default_rng(1)
    policy = RecycledAttentionPolicy(top_k=3, stride=2)
    # row 0 (occupied) is not due; row 1 (free) is due: no full pass, both take recycled steps
    rows = [one_row_cache(rng, 6, policy, 0), one_row_cache(rng, 8, policy, 1)]
    cache = stack_rows(rows, active=[True, False])
    q, k, v, raw = (jnp.asarray(rng.normal(size=(2, 2, 4)), jnp.float32) for _ in range(4))
    out, new = per_row_step(q, k, v, raw, cache, jnp.asarray([6, 8], jnp.int32))
    assert np.asarray(new.full_steps).tolist() == [0, 0]
    assert np.asarray(new.steps_since_full).tolist() == [1, 2]
    want, _ = batch_step(q[:1], k[:1], v[:1], raw[:1], rows[0], jnp.asarray([6]))
    np.testing.assert_allclose(np.asarray(out[:1]), np.asarray(want), rtol=1e-5, atol=1e-6)
    # the same row occupied: its full step is taken
    _, new = per_row_step(
        q, k, v, raw, cache.replace(active=jnp.ones(2, bool)), jnp.asarray([6, 8], jnp.int32)
    )
    assert np.asarray(new.full_steps).tolist() == [0, 1]


# -- the engine -------------------------------------------------------------------------------


def tiny_transformer(**overrides):
    config = ModelConfig.from_preset(
        "attn_tiny",
        num_layers=2,
        layer_pattern=("attention",) * 2,
        vocab_size=TOKENIZER.vocab_size,
        init_std=0.2,  # logits far enough apart that argmax is not decided by rounding
        **overrides,
    )
    return init_model(config)


def run_concurrently(model, params, policy, prompts, max_tokens):
    """Every prompt submitted at once to a 4-slot engine (16-token chunks) under ``policy``,
    ``max_tokens`` greedy tokens each (end-of-text ignored); the tokens of each, and the
    engine's trace counts after warm-up and at the end."""
    config = EngineConfig(
        num_slots=4,
        max_len=MAX_LEN,
        prefill_token_budget=MAX_LEN,
        prefill_chunk=16,
        recycled_attention=policy,
    )
    engine = Engine(model, params, config, decode_text=TOKENIZER.decode, eos_id=TOKENIZER.eos_id)
    engine.warmup()
    warm = engine.trace_counts()
    sinks = [Completion(1) for _ in prompts]
    settings = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    with engine:
        engine.submit(
            [Request(prompt, settings, sink) for prompt, sink in zip(prompts, sinks, strict=True)]
        )
        for sink in sinks:
            assert sink.finished.wait(120)
    return [sink.token_ids[0] for sink in sinks], warm, engine.trace_counts()


def alone(model, params, prompt, max_tokens, policy):
    return generate(
        model, params, [prompt], max_new_tokens=max_tokens, temperature=0, recycled_attention=policy
    ).tokens[0]


#: 6 requests through 4 slots: slots are reused and start at different positions and phases
#: (a chunked prefill of the 17..30-token prompts takes two iterations, while the other slots
#: decode); one max_tokens and two prompt buckets keep generate's compilations few.
LENGTHS = (3, 30, 9, 17, 1, 22)
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def transformer():
    """The tiny model, the prompts, and what plain full attention gives each alone."""
    model, params = tiny_transformer()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(97, 123, size=n).tolist() for n in LENGTHS]
    plain = [alone(model, params, prompt, MAX_TOKENS, None) for prompt in prompts]
    return model, params, prompts, plain


def test_each_request_gets_what_generate_gives_it_alone(transformer):
    model, params, prompts, plain = transformer
    served, warm, after = run_concurrently(model, params, POLICY, prompts, MAX_TOKENS)
    assert served == [alone(model, params, prompt, MAX_TOKENS, POLICY) for prompt in prompts]
    assert after == warm == {"prefill": 1, "extend": 1, "insert": 1, "first_tokens": 1, "decode": 1}
    # the policy matters here: plain full attention gives other tokens for most prompts
    assert sum(s != p for s, p in zip(served, plain, strict=True)) >= len(prompts) // 2


@pytest.mark.parametrize(
    "policy",
    [
        RecycledAttentionPolicy(top_k=MAX_LEN, stride=4),  # K covers every cached token
        RecycledAttentionPolicy(top_k=2, stride=1),  # every step full
    ],
    ids=["k_covers_context", "stride_one"],
)
def test_where_the_policy_sees_everything_the_tokens_are_full_attentions(transformer, policy):
    model, params, prompts, plain = transformer
    served, _, _ = run_concurrently(model, params, policy, prompts, MAX_TOKENS)
    assert served == plain


def test_a_scanned_model_serves_under_the_policy():
    model, params = tiny_transformer(scan_layers=True)
    prompts = [TOKENIZER.encode("the recycled cat"), TOKENIZER.encode("sat on")]
    served, _, _ = run_concurrently(model, params, POLICY, prompts, MAX_TOKENS)
    assert served == [alone(model, params, prompt, MAX_TOKENS, POLICY) for prompt in prompts]


def test_the_decode_step_copies_no_cache_sized_buffer(transformer):
    """The engine's step writes the new key and value outside the lax.cond, whose branches
    only read the slots' KV caches, and reuses the donated cache in place."""
    model, params, _, _ = transformer
    config = EngineConfig(num_slots=2, max_len=MAX_LEN, prefill_chunk=16, recycled_attention=POLICY)
    engine = Engine(model, params, config)
    programs, cache = engine._programs, engine._cache
    hlo = (
        programs.decode.lower(
            engine.params, cache, engine._tokens, np.ones(2, bool), *engine._sampling_arrays()
        )
        .compile()
        .as_text()
    )
    full = {leaf.shape for leaf in jax.tree.leaves(cache.layers) if leaf.ndim == 4}
    assert full == {(2, 4, MAX_LEN, 16)}
    smallest = min(np.prod(shape) for shape in full)
    copied = [
        dims
        for shape in re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\{[0-9,]*\} copy\(", hlo)
        if np.prod(dims := tuple(int(d) for d in shape.split(",") if d)) >= smallest
    ]
    assert not copied, f"the decode step copies cache-sized buffers: {copied}"
    assert "input_output_alias" in hlo.splitlines()[0]


def test_bad_settings_are_errors():
    with pytest.raises(TypeError, match="recycled_attention=4 must be a RecycledAttentionPolicy"):
        EngineConfig(recycled_attention=4)
    based, based_params = init_model(ModelConfig.from_preset("based_tiny"))
    with pytest.raises(ValueError, match="recycled_attention needs full-attention layers"):
        Engine(
            based,
            based_params,
            EngineConfig(max_len=32, prefill_chunk=16, recycled_attention=POLICY),
        )


def test_serve_flags_build_the_policy_and_name_a_bad_value():
    """jaxbased-serve's --recycled_* flags (those of jaxbased-generate) in a fresh process,
    which defines the serve command's flags only."""
    script = """
from absl import flags
import jaxbased.cli.serve as serve
from jaxbased.cli.errors import UsageError
flags.FLAGS(['serve', '--recycled_top_k=8', '--recycled_stride=4'])
print(repr(serve.recycled_attention_policy()))
flags.FLAGS(['serve', '--recycled_top_k=0'])
print(serve.recycled_attention_policy())
flags.FLAGS(['serve', '--recycled_top_k=4', '--recycled_pool_size=2'])
try:
    serve.recycled_attention_policy()
except UsageError as error:
    print(error)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        repr(RecycledAttentionPolicy(top_k=8, stride=4)),
        "None",
        "--recycled_pool_size=2 must be an odd integer >= 1",
    ]
