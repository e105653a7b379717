"""Reading OpenAI-style request bodies: each field checked for its type and range, every
mistake an :class:`ApiError` carrying the HTTP status and the OpenAI error fields.

Kept apart from the web framework so that the rules can be read (and tested) on their own.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from jaxbased.serving.engine import MAX_TOP_LOGPROBS, SamplingParams

#: Stop strings a request may give (OpenAI's limit).
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """A request the server refuses: ``status`` (400, 404, 413, 429, 503...), ``message``,
    OpenAI's ``type`` and ``code``, and the offending ``param``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 ApiError."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object; got {type(body).__name__}")
    return body


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _integer(body: dict, name: str, default: int | None, minimum: int | None = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(
            400,
            f"{name} must be an integer; got {json.dumps(value)} ({_type_name(value)})",
            param=name,
        )
    if minimum is not None and value < minimum:
        raise ApiError(400, f"{name}={value} must be >= {minimum}", param=name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(
            400,
            f"{name} must be a finite number; got {json.dumps(value)} ({_type_name(value)})",
            param=name,
        )
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false; got {json.dumps(value)}", param=name)
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(
            400,
            f"stop must be a non-empty string or a list of them; got {json.dumps(stop)}",
            param="stop",
        )
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(
            400,
            f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed",
            param="stop",
        )
    return tuple(stops)


def check_model(body: dict, model_name: str) -> None:
    """A 404 ApiError unless ``model`` is absent or names the served model."""
    model = body.get("model", model_name)
    if model is None:
        return
    if not isinstance(model, str):
        raise ApiError(400, f"model must be a string; got {json.dumps(model)}", param="model")
    if model != model_name:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {model_name!r}",
            param="model",
            code="model_not_found",
        )


def prompt_ids(
    body: dict, encode: Callable[[str], list[int]], vocab_size: int
) -> tuple[list[int], bool]:
    """The token ids of ``prompt`` (a string, a token list, or a list holding one of them),
    and whether it was given as text. 400 ApiError for a missing, empty or ill-typed one."""
    if "prompt" not in body:
        raise ApiError(400, "prompt is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt is empty; give at least one character", param="prompt")
        ids = encode(prompt)
        if not ids:
            raise ApiError(400, "prompt encodes to no tokens", param="prompt")
        return ids, True
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        if not prompt:
            raise ApiError(400, "prompt is empty; give at least one token", param="prompt")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(
                400,
                f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                param="prompt",
            )
        return list(prompt), False
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, str | list) for p in prompt)
    ):
        raise ApiError(
            400,
            f"prompt holds {len(prompt)} prompts; this server takes one per request",
            param="prompt",
        )
    raise ApiError(
        400,
        f"prompt must be a string or a list of token ids; got {_type_name(prompt)}",
        param="prompt",
    )


@dataclasses.dataclass(frozen=True)
class CompletionSettings:
    """A request's decoding settings and how to answer it."""

    sampling: SamplingParams
    stream: bool
    echo: bool


def completion_settings(
    body: dict, *, max_n: int, default_max_tokens: int, eos_id: int | None
) -> CompletionSettings:
    """The sampling parameters of a completions request, each field checked (400 ApiError
    naming the field). ``max_n`` is the number of decode slots."""
    max_tokens = _integer(body, "max_tokens", default_max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens={max_tokens} must be >= 1", param="max_tokens")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise ApiError(
            400, f"temperature={temperature} must be >= 0 (0 is greedy)", param="temperature"
        )
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p={top_p} must be in (0, 1]", param="top_p")
    top_k = _integer(body, "top_k", 0, minimum=0)
    n = _integer(body, "n", 1, minimum=1)
    if n > max_n:
        raise ApiError(400, f"n={n} is more than this server's {max_n} decode slots", param="n")
    seed = _integer(body, "seed", None, minimum=0)
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool):  # the chat API's form: logprobs true + top_logprobs
        logprobs = _integer(body, "top_logprobs", 0, minimum=0) if logprobs else None
    else:
        logprobs = _integer(body, "logprobs", None, minimum=0)
    if logprobs is not None and logprobs > MAX_TOP_LOGPROBS:
        raise ApiError(400, f"logprobs={logprobs} must be <= {MAX_TOP_LOGPROBS}", param="logprobs")
    ignore_eos = _boolean(body, "ignore_eos", False)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        n=n,
        stop=_stop_strings(body),
        stop_token_ids=(),
        logprobs=logprobs,
        ignore_eos=ignore_eos or eos_id is None,
    )
    return CompletionSettings(
        sampling=sampling,
        stream=_boolean(body, "stream", False),
        echo=_boolean(body, "echo", False),
    )


def chat_messages(body: dict) -> list[dict[str, str]]:
    """The ``messages`` of a chat request: a non-empty list of ``{"role", "content"}`` with
    string values (400 ApiError otherwise)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    checked = []
    for index, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ApiError(
                400,
                f"messages[{index}] must be an object with string role and content",
                param="messages",
            )
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def token_strings(ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> list[str]:
    """Each token's own text (for ``logprobs``)."""
    return [decode([token]) for token in ids]


__all__ = [
    "MAX_STOP_STRINGS",
    "ApiError",
    "CompletionSettings",
    "chat_messages",
    "check_model",
    "completion_settings",
    "parse_json_object",
    "prompt_ids",
    "token_strings",
]
