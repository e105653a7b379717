"""jaxbased-serve driven over 127.0.0.1 by the official openai client (and httpx for raw
bodies): completions equal jaxbased.generate, streamed or not, n > 1, stop strings and
logprobs; bad requests get OpenAI-style errors with the right status while a good request
completes unharmed; a full queue answers 429; a client that disconnects mid-stream frees its
slot; SIGTERM lets the running request finish and exits 0. One server for the module."""

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import optax
import pytest

from jaxbased import LanguageModel, ModelConfig, based_layer_pattern, generate
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.serving.metrics import parse_metrics
from jaxbased.training.checkpointing import Checkpointer
from jaxbased.training.optimizer import make_optimizer
from jaxbased.training.state import TrainState
from tests.conftest import init_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = ByteTokenizer()
MODEL_NAME = "tiny-based"
MAX_LEN = 128
MAX_BODY = 4096


@dataclasses.dataclass
class Served:
    url: str
    process: subprocess.Popen
    log: pathlib.Path
    model: LanguageModel
    params: object

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def expected(self, prompt: str, max_tokens: int, **sampling) -> list[list[int]]:
        """generate's tokens for the prompt alone (n rows when n is given), stopping at EOS."""
        n = sampling.pop("n", 1)
        sampling.setdefault("temperature", 0)
        result = generate(
            self.model,
            self.params,
            [TOKENIZER.encode(prompt)] * n,
            max_new_tokens=max_tokens,
            stop_tokens=(TOKENIZER.eos_id,),
            return_logprobs=True,
            **sampling,
        )
        return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config = ModelConfig.from_preset(
        "based_tiny",
        vocab_size=TOKENIZER.vocab_size,
        init_std=0.2,
        num_layers=3,
        layer_pattern=based_layer_pattern(3, (1,), (2,)),
    )
    model, params = init_model(config)
    folder = tmp_path_factory.mktemp("serve")
    workdir = folder / MODEL_NAME
    checkpointer = Checkpointer(workdir, async_save=False)
    metadata = {"model": config.to_dict(), "tokenizer": TOKENIZER.spec()}
    state = TrainState.create(params, make_optimizer(optax.constant_schedule(1e-3)))
    checkpointer.save(1, state, {}, metadata)
    checkpointer.close()

    port = free_port()
    log = folder / "server.log"
    command = [
        sys.executable,
        "-m",
        "jaxbased.cli.serve",
        f"--workdir={workdir}",
        f"--port={port}",
        "--num_slots=3",
        f"--max_len={MAX_LEN}",
        "--max_queue=2",
        "--prefill_chunk=16",
        f"--max_body_bytes={MAX_BODY}",
        "--shutdown_timeout=30",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the server did not start: " + log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield Served(url, process, log, model, params)
    if process.poll() is None:
        process.kill()
        process.wait(30)


def test_completions_equal_generate_streamed_or_not(served):
    client = served.client()
    prompt = "Once upon a time"
    expected = served.expected(prompt, 12)
    text = TOKENIZER.decode(expected.tokens[0])
    done = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == text
    assert done.choices[0].finish_reason == ("stop" if expected.stopped[0] else "length")
    assert done.usage.prompt_tokens == len(prompt)
    assert done.usage.completion_tokens == len(expected.tokens[0])

    chunks = list(
        client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks) == text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason

    as_ids = client.completions.create(
        model=MODEL_NAME, prompt=TOKENIZER.encode(prompt), max_tokens=12, temperature=0
    )
    assert as_ids.choices[0].text == text


def test_n_seeded_samples_stop_strings_and_logprobs(served):
    client = served.client()
    prompt = "The cat"
    sampled = served.expected(prompt, 12, n=3, temperature=0.8, top_k=50, seed=5)
    done = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=12,
        n=3,
        temperature=0.8,
        extra_body={"top_k": 50},
        seed=5,
    )
    assert [choice.text for choice in sorted(done.choices, key=lambda c: c.index)] == [
        TOKENIZER.decode(tokens) for tokens in sampled.tokens
    ]

    greedy = served.expected(prompt, 12)
    text = TOKENIZER.decode(greedy.tokens[0])
    stop = text[4:6]
    assert len(stop) == 2
    cut = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "never"]
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == text[: text.find(stop)]

    scored = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=2
    )
    logprobs = scored.choices[0].logprobs
    np.testing.assert_allclose(logprobs.token_logprobs, greedy.logprobs[0], atol=1e-4)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert len(logprobs.tokens) == len(greedy.tokens[0])  # one string per token


def test_models_health_metrics_and_no_chat_template(served):
    client = served.client()
    assert [model.id for model in client.models.list()] == [MODEL_NAME]
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}]
        )
    text = httpx.get(f"{served.url}/metrics").text
    for name in (
        "jaxbased_serve_requests_total",
        "jaxbased_serve_generation_tokens_total",
        "jaxbased_serve_queue_depth",
        "jaxbased_serve_slots_busy",
        'jaxbased_serve_time_to_first_token_seconds_bucket{le="+Inf"}',
        "jaxbased_serve_time_per_output_token_seconds_count",
    ):
        assert name in text, name
    assert parse_metrics(text)["jaxbased_serve_generation_tokens_total"] > 0


def metric(served, name: str) -> float:
    return parse_metrics(httpx.get(f"{served.url}/metrics").text).get(name, 0.0)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    cancelled = 'jaxbased_serve_requests_total{outcome="cancelled"}'
    before = metric(served, cancelled)
    body = {
        "model": MODEL_NAME,
        "prompt": "a",
        "max_tokens": MAX_LEN - 1,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{served.url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 20
    while metric(served, cancelled) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(served, cancelled) == before + 1
    assert metric(served, "jaxbased_serve_slots_busy") == 0


BAD_REQUESTS = [
    ("malformed JSON", b'{"prompt": "hi", "max_tokens": ', 400, None),
    ("wrong type", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("wrong type", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("wrong type", {"prompt": "hi", "stop": 7}, 400, "stop"),
    ("wrong type", {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty prompt", {"prompt": []}, 400, "prompt"),
    ("too long", {"prompt": "x" * MAX_LEN}, 400, None),
    ("max_tokens", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("temperature", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("top_p", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top_p", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("unknown model", {"prompt": "hi", "model": "gpt-17"}, 404, "model"),
    ("oversized body", {"prompt": "y" * (MAX_BODY + 10)}, 413, None),
]


def test_bad_requests_get_json_errors_while_a_good_one_completes(served):
    prompt = "Good request"
    expected = TOKENIZER.decode(served.expected(prompt, 100).tokens[0])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        good = pool.submit(
            lambda: "".join(
                chunk.choices[0].text
                for chunk in served.client().completions.create(
                    model=MODEL_NAME, prompt=prompt, max_tokens=100, temperature=0, stream=True
                )
            )
        )
        with httpx.Client(timeout=30) as http:
            for what, body, status, param in BAD_REQUESTS:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                response = http.post(
                    f"{served.url}/v1/completions",
                    content=content,
                    headers={"Content-Type": "application/json"},
                )
                assert response.status_code == status, (what, response.text)
                error = response.json()["error"]
                assert error["message"] and error["type"], (what, error)
                assert error["param"] == param, (what, error)
            response = http.get(f"{served.url}/v1/nothing-here")
            assert response.status_code == 404 and "error" in response.json()
        with pytest.raises(openai.BadRequestError, match="temperature"):
            served.client().completions.create(model=MODEL_NAME, prompt="hi", temperature=-1)
        assert good.result(timeout=120) == expected


def test_a_full_queue_answers_429(served):
    # 3 slots and a queue of 2: of 9 long requests at once, some must wait and some be refused.
    body = {
        "model": MODEL_NAME,
        "prompt": "q",
        "max_tokens": 100,
        "temperature": 0,
        "ignore_eos": True,
    }

    def post(_):
        return httpx.post(f"{served.url}/v1/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        responses = list(pool.map(post, range(9)))
    statuses = sorted(response.status_code for response in responses)
    assert 429 in statuses and 200 in statuses, statuses
    assert set(statuses) == {200, 429}
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "queue_full"
        else:
            assert response.json()["usage"]["completion_tokens"] == 100


def test_sigterm_finishes_the_running_request_and_exits_0(served):
    body = {
        "model": MODEL_NAME,
        "prompt": "z",
        "max_tokens": 100,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    texts = []
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{served.url}/v1/completions", json=body) as response,
    ):
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        texts.append(next(lines))
        served.process.send_signal(signal.SIGTERM)
        texts.extend(lines)
    assert texts[-1] == "data: [DONE]"
    chunks = [json.loads(text.removeprefix("data: ")) for text in texts[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) == 100 + 1  # every token, then the finish
    assert served.process.wait(60) == 0, served.log.read_text()[-3000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{served.url}/health", timeout=2)


class ChatByteTokenizer(ByteTokenizer):
    """Bytes with a chat template: each message on its own line after its role."""

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def test_chat_completions_with_a_template(served):
    from fastapi.testclient import TestClient

    from jaxbased.serving import Engine, EngineConfig
    from jaxbased.serving.app import Server, create_app

    tokenizer = ChatByteTokenizer()
    # The server's sizes: the programs come from the compilation cache its process filled.
    config = EngineConfig(num_slots=3, max_len=MAX_LEN, max_queue=2, prefill_chunk=16)
    engine = Engine(
        served.model, served.params, config, decode_text=tokenizer.decode, eos_id=tokenizer.eos_id
    )
    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages)
    expected = TOKENIZER.decode(served.expected(prompt, 12).tokens[0])
    with TestClient(create_app(Server(engine, tokenizer, model_name=MODEL_NAME))) as http:
        body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 12, "temperature": 0}
        done = http.post("/v1/chat/completions", json=body).json()
        assert done["object"] == "chat.completion"
        assert done["choices"][0]["message"] == {"role": "assistant", "content": expected}
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
            chunks = [
                json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")
            ]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
        bad = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
