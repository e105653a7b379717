"""jaxbased.serving.Engine: continuous batching gives each request exactly what
jaxbased.generate gives its prompt alone (greedy, stop strings, chunked prefill), seeded sampling
is reproducible, a steady engine never traces again, finished and cancelled sequences free their
slots, and the queue is bounded."""

import threading
import time

import numpy as np
import pytest

from jaxbased import ModelConfig, based_layer_pattern, generate, hybrid_layer_pattern
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.serving import (
    Completion,
    Engine,
    EngineConfig,
    EngineStoppedError,
    QueueFullError,
    Request,
    SamplingParams,
)
from tests.conftest import init_model

TOKENIZER = ByteTokenizer()
EOS = TOKENIZER.eos_id
# One whole-prompt bucket (16) and prompts longer than the 16-token chunk: few shapes to compile.
ENGINE = EngineConfig(
    num_slots=8, max_len=64, max_queue=64, prefill_token_budget=64, prefill_chunk=16
)
MAX_TOKENS = (6, 10)
STOPS = ((), ("e",), ("ab", "\n"))


def tiny_config(kind: str) -> ModelConfig:
    """2–3 layer models of width 32–64 on bytes plus an end-of-text token (vocabulary 257);
    init_std 0.2 keeps the logits far enough apart that argmax is not decided by rounding."""
    common = {"vocab_size": TOKENIZER.vocab_size, "init_std": 0.2}
    if kind == "based":
        return ModelConfig.from_preset(
            "based_tiny", num_layers=3, layer_pattern=based_layer_pattern(3, (1,), (2,)), **common
        )
    if kind == "transformer":
        return ModelConfig.from_preset(
            "attn_tiny", num_layers=2, layer_pattern=("attention",) * 2, **common
        )
    pattern = hybrid_layer_pattern("M*-")
    return ModelConfig.from_preset(
        "mamba2_hybrid_tiny", num_layers=len(pattern), layer_pattern=pattern, **common
    )


@pytest.fixture(scope="module", params=["based", "transformer", "mamba2_hybrid"])
def served(request):
    model, params = init_model(tiny_config(request.param))
    engine = Engine(model, params, ENGINE, decode_text=TOKENIZER.decode, eos_id=EOS)
    engine.warmup()
    engine.start()
    yield model, params, engine
    engine.stop(timeout=10)


def expected_greedy(model, params, prompt, max_tokens, stop):
    """What generate gives the prompt alone, cut after the token that completes a stop
    string, and the text without the stop string."""
    tokens = generate(
        model, params, [prompt], max_new_tokens=max_tokens, temperature=0, stop_tokens=(EOS,)
    ).tokens[0]
    for end in range(1, len(tokens) + 1):
        text = TOKENIZER.decode(tokens[:end])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return tokens[:end], text[: min(hits)], "stop"
    reason = "stop" if tokens and tokens[-1] == EOS else "length"
    return tokens, TOKENIZER.decode(tokens), reason


def test_fifty_concurrent_requests_equal_generate_alone_and_never_retrace(served):
    model, params, engine = served
    rng = np.random.default_rng(0)
    traces_after_warmup = engine.trace_counts()
    assert traces_after_warmup == {
        "prefill": 1,
        "extend": 1,
        "insert": 1,
        "first_tokens": 1,
        "decode": 1,
    }
    requests = []
    for index in range(50):
        # lengths 1..32 (generate's buckets 16 and 32), one in three prefilled in chunks
        length = int(rng.integers(1, 17)) if index % 3 else int(rng.integers(17, 33))
        prompt = rng.integers(97, 123, size=length).tolist()  # lowercase letters
        params_ = SamplingParams(
            max_tokens=MAX_TOKENS[index % 2], temperature=0.0, stop=STOPS[index % 3]
        )
        requests.append((prompt, params_, Completion(1)))
    engine.submit([Request(prompt, p, sink) for prompt, p, sink in requests])
    for prompt, p, sink in requests:
        assert sink.finished.wait(120)
        tokens, text, reason = expected_greedy(model, params, prompt, p.max_tokens, p.stop)
        assert sink.token_ids[0] == tokens, (len(prompt), p)
        assert sink.text[0] == text
        assert sink.finish_reasons == [reason]
    assert engine.trace_counts() == traces_after_warmup
    assert engine.busy_slots() == 0 and engine.queue_depth() == 0


@pytest.fixture(scope="module")
def based_engine():
    model, params = init_model(tiny_config("based"))
    engine = Engine(model, params, ENGINE, decode_text=TOKENIZER.decode, eos_id=EOS)
    engine.start()
    yield model, params, engine
    engine.stop(timeout=10)


def test_seeded_sampling_is_reproducible_and_equals_generate(based_engine):
    model, params, engine = based_engine
    prompt = TOKENIZER.encode("the cat sat")
    settings = {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 7}
    sampling = SamplingParams(max_tokens=8, n=3, ignore_eos=True, **settings)
    first = engine.complete(prompt, sampling)
    second = engine.complete(prompt, sampling)
    assert first.token_ids == second.token_ids
    expected = generate(
        model, params, [prompt] * 3, max_new_tokens=8, return_logprobs=True, **settings
    )
    assert first.token_ids == expected.tokens
    np.testing.assert_allclose(first.logprobs[0], expected.logprobs[0], atol=1e-5)
    other = engine.complete(
        prompt, SamplingParams(max_tokens=8, ignore_eos=True, **{**settings, "seed": 8})
    )
    assert other.token_ids[0] != first.token_ids[0]


def test_cancel_frees_the_slot_and_the_queue_is_bounded(based_engine):
    model, params, _ = based_engine
    small = EngineConfig(num_slots=1, max_len=64, max_queue=2, prefill_chunk=16)
    engine = Engine(model, params, small, decode_text=TOKENIZER.decode, eos_id=EOS)
    running = Completion(1)
    long_request = Request(
        [1, 2, 3], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), running
    )
    queued = [Completion(1) for _ in range(2)]
    engine.submit(long_request)
    engine.submit(
        [Request([4], SamplingParams(max_tokens=2, temperature=0), q) for q in queued[:1]]
    )
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(
            [Request([5], SamplingParams(max_tokens=2), q) for q in [queued[1], Completion(1)]]
        )
    with pytest.raises(ValueError, match="max_tokens=0 must be an integer >= 1"):
        engine.submit(Request([5], SamplingParams(max_tokens=0), Completion(1)))
    with pytest.raises(ValueError, match="more than this server's maximum of 64"):
        engine.submit(Request([5] * 60, SamplingParams(max_tokens=5), Completion(1)))
    engine.start()
    deadline = time.monotonic() + 60
    while not running.token_ids[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.cancel(long_request)
    assert running.finished.wait(60) and running.finish_reasons == ["cancelled"]
    assert len(running.token_ids[0]) < 60
    assert queued[0].finished.wait(60) and queued[0].finish_reasons[0] in ("stop", "length")
    assert engine.busy_slots() == 0
    assert engine.stop(timeout=10)
    with pytest.raises(EngineStoppedError):
        engine.submit(Request([1], SamplingParams(), Completion(1)))


def test_stop_cancels_what_outlives_the_timeout(based_engine):
    model, params, _ = based_engine
    engine = Engine(model, params, EngineConfig(num_slots=1, max_len=64, prefill_chunk=16))
    sink = Completion(1)
    engine.start()
    engine.submit(Request([1], SamplingParams(max_tokens=63, temperature=0), sink))
    stopper = threading.Thread(target=engine.stop, kwargs={"timeout": 0.0})
    stopper.start()
    stopper.join(30)
    assert sink.finished.is_set() and sink.finish_reasons[0] in ("cancelled", "length")


def test_invalid_settings_name_the_value():
    with pytest.raises(ValueError, match="prefill_chunk=48 must be 0"):
        EngineConfig(max_len=64, prefill_chunk=48)
    for field, value, message in (
        ("temperature", -1.0, "temperature=-1.0 must be a finite number >= 0"),
        ("top_p", 0.0, r"top_p=0.0 must be in \(0, 1\]"),
        ("top_k", -2, "top_k=-2 must be an integer >= 0"),
        ("logprobs", 9, r"logprobs=9 must be in \[0, 5\]"),
    ):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**{field: value}).check(257)
