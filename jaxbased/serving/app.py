"""The OpenAI-compatible HTTP API over an :class:`~jaxbased.serving.Engine` (FastAPI).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (when the tokenizer has a
chat template), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text).
Every refusal is an OpenAI-style JSON error, ``{"error": {"message", "type", "param",
"code"}}``, with its HTTP status: 400 for a bad field, 404 for an unknown model or route, 413
for a body over ``max_body_bytes``, 429 when the engine's queue is full, 503 while shutting
down.

The engine runs in its own thread; each request's events cross to the event loop through
``loop.call_soon_threadsafe`` into an ``asyncio.Queue``. A streaming response
(server-sent events) whose client goes away cancels its request, which frees its slots at the
engine's next iteration; so does a non-streaming one, checked every
:data:`DISCONNECT_POLL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from absl import logging
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxbased.serving import protocol
from jaxbased.serving.engine import (
    Engine,
    EngineStoppedError,
    ErrorEvent,
    Event,
    FinishEvent,
    QueueFullError,
    Request,
    TokenEvent,
)
from jaxbased.serving.metrics import ServingMetrics
from jaxbased.serving.protocol import ApiError

#: How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.25


class _RequestStream:
    """One engine request seen from the event loop: its events in an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:  # the engine's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _Choice:
    """What one sequence has produced so far (text, tokens, log-probabilities)."""

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[tuple[tuple[int, float], ...]] = []
        self.finish_reason: str | None = None


class Server:
    """The API's state: the engine, the tokenizer and the limits (one per app).

    Args:
      engine: a warmed-up engine (the app starts and stops its thread).
      tokenizer: ``encode``, ``decode``, ``eos_id``; a tokenizer with
        ``apply_chat_template(messages) -> str`` also serves ``/v1/chat/completions``.
      model_name: the ``model`` requests must name (or leave out).
      max_body_bytes: larger request bodies are refused with 413.
      default_max_tokens: ``max_tokens`` of a request that gives none.
      shutdown_timeout: seconds the running requests get to finish when the app shuts down.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        *,
        model_name: str,
        max_body_bytes: int = 1 << 20,
        default_max_tokens: int = 16,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.shutdown_timeout = shutdown_timeout
        self.created = int(time.time())

    @property
    def metrics(self) -> ServingMetrics:
        """The engine's metrics (the API counts its requests and errors there too)."""
        return self.engine.metrics

    def chat_template(self) -> Callable[[list[dict[str, str]]], str] | None:
        """The tokenizer's ``apply_chat_template``, or None when it has none."""
        template = getattr(self.tokenizer, "apply_chat_template", None)
        return template if callable(template) else None

    # -- reading requests ------------------------------------------------------------------

    async def read_body(self, http: HttpRequest) -> dict[str, Any]:
        """The request's JSON object, read up to ``max_body_bytes`` (413 beyond)."""
        length = http.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(
                413,
                f"the request body has {length} bytes; at most {self.max_body_bytes} are allowed",
                code="request_too_large",
            )
        raw = bytearray()
        async for piece in http.stream():
            raw += piece
            if len(raw) > self.max_body_bytes:
                raise ApiError(
                    413,
                    f"the request body is over {self.max_body_bytes} bytes",
                    code="request_too_large",
                )
        return protocol.parse_json_object(bytes(raw))

    def submit(
        self, ids: list[int], settings: protocol.CompletionSettings
    ) -> tuple[Request, _RequestStream]:
        """Queue a request on the engine; the engine's refusals as ApiErrors (400, 429, 503)."""
        loop = asyncio.get_running_loop()
        stream = _RequestStream(loop)
        request = Request(ids, settings.sampling, stream)
        try:
            self.engine.submit(request)
        except QueueFullError as error:
            raise ApiError(
                429, str(error), code="queue_full", error_type="rate_limit_exceeded"
            ) from error
        except EngineStoppedError as error:
            raise ApiError(503, str(error), code="shutting_down", error_type="server_error") from (
                error
            )
        except ValueError as error:
            message = str(error)
            code = "context_length_exceeded" if "maximum of" in message else None
            raise ApiError(400, message, code=code) from error
        return request, stream

    # -- running them --------------------------------------------------------------------------

    async def events(
        self, http: HttpRequest, request: Request, stream: _RequestStream
    ) -> AsyncIterator[Event]:
        """The request's events until every sequence has finished; cancels the request when
        the consumer stops early or the client disconnects."""
        remaining = request.params.n
        try:
            while remaining:
                try:
                    event = await asyncio.wait_for(
                        stream.events.get(), timeout=DISCONNECT_POLL_SECONDS
                    )
                except TimeoutError:
                    if await http.is_disconnected():
                        logging.info("client of request %s went away: cancelled", request.id)
                        return
                    continue
                if isinstance(event, ErrorEvent):
                    raise ApiError(500, event.message, error_type="server_error")
                if isinstance(event, FinishEvent):
                    remaining -= 1
                yield event
        finally:
            if remaining:
                self.engine.cancel(request)


def _logprobs_block(
    choice: _Choice, decode: Callable[[Sequence[int]], str], start_offset: int
) -> dict[str, Any]:
    tokens = protocol.token_strings(choice.token_ids, decode)
    offsets, offset = [], start_offset
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": choice.logprobs,
        "top_logprobs": [
            {decode([token]): value for token, value in top} for top in choice.top_logprobs
        ],
        "text_offset": offsets,
    }


def create_app(server: Server) -> FastAPI:
    """The FastAPI app of ``server`` (its lifespan starts and stops the engine's thread)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        server.engine.drain()
        finished = await asyncio.to_thread(server.engine.stop, server.shutdown_timeout)
        logging.info("engine stopped (%s)", "all finished" if finished else "some cancelled")

    app = FastAPI(title="jaxbased", lifespan=lifespan, docs_url=None, redoc_url=None)
    tokenizer = server.tokenizer

    def error_response(error: ApiError) -> JSONResponse:
        server.metrics.increment("http_errors_total", status=str(error.status))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, error: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(error.status_code, str(error.detail)))

    @app.get("/health")
    async def health() -> JSONResponse:
        if not server.engine.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        entry = {
            "id": server.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "jaxbased",
            "max_model_len": server.engine.config.max_len,
        }
        return JSONResponse({"object": "list", "data": [entry]})

    async def run_completion(
        http: HttpRequest, body: dict[str, Any], ids: list[int], *, chat: bool, echo_text: str
    ) -> Any:
        settings = protocol.completion_settings(
            body,
            max_n=server.engine.config.num_slots,
            default_max_tokens=server.default_max_tokens,
            eos_id=tokenizer.eos_id,
        )
        request, stream = server.submit(ids, settings)
        server.metrics.increment("http_requests_total", route="chat" if chat else "completions")
        created = int(time.time())
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        n = settings.sampling.n
        want_logprobs = settings.sampling.logprobs is not None
        echo = echo_text if settings.echo and not chat else ""

        if settings.stream:

            async def sse() -> AsyncIterator[str]:
                started: set[int] = set()
                offsets = [len(echo)] * n
                try:
                    async for chunk in chunks(started, offsets):
                        yield chunk
                except ApiError as error:  # the engine failed mid-stream
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                yield "data: [DONE]\n\n"

            async def chunks(started: set[int], offsets: list[int]) -> AsyncIterator[str]:
                async for event in server.events(http, request, stream):
                    if isinstance(event, TokenEvent):
                        choice = _Choice()
                        choice.token_ids = [event.token_id]
                        choice.logprobs = [event.logprob]
                        choice.top_logprobs = [event.top_logprobs]
                        text = event.text
                        first = event.choice not in started
                        if first:
                            started.add(event.choice)
                            text = echo + text
                        entry = _stream_entry(chat, event.choice, text, None, first=first)
                        if want_logprobs and not chat:
                            entry["logprobs"] = _logprobs_block(
                                choice, tokenizer.decode, offsets[event.choice]
                            )
                        offsets[event.choice] += len(event.text)
                    else:
                        entry = _stream_entry(chat, event.choice, "", event.reason)
                    chunk = {
                        "id": ident,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": server.model_name,
                        "choices": [entry],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"

            return StreamingResponse(
                sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        choices = [_Choice() for _ in range(n)]
        async for event in server.events(http, request, stream):
            choice = choices[event.choice]
            if isinstance(event, TokenEvent):
                choice.text += event.text
                choice.token_ids.append(event.token_id)
                choice.logprobs.append(event.logprob)
                choice.top_logprobs.append(event.top_logprobs)
            else:
                choice.finish_reason = event.reason
        entries = []
        for index, choice in enumerate(choices):
            if chat:
                entry = {
                    "index": index,
                    "message": {"role": "assistant", "content": choice.text},
                    "finish_reason": choice.finish_reason,
                    "logprobs": None,
                }
            else:
                entry = {
                    "index": index,
                    "text": echo + choice.text,
                    "finish_reason": choice.finish_reason,
                    "logprobs": _logprobs_block(choice, tokenizer.decode, len(echo))
                    if want_logprobs
                    else None,
                }
            entries.append(entry)
        completion_tokens = sum(len(choice.token_ids) for choice in choices)
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": server.model_name,
                "choices": entries,
                "usage": {
                    "prompt_tokens": len(ids),
                    "completion_tokens": completion_tokens,
                    "total_tokens": len(ids) + completion_tokens,
                },
            }
        )

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        body = await server.read_body(http)
        protocol.check_model(body, server.model_name)
        ids, as_text = protocol.prompt_ids(body, tokenizer.encode, server.engine.vocab_size)
        echo_text = body["prompt"] if as_text else tokenizer.decode(ids)
        if isinstance(echo_text, list):
            echo_text = echo_text[0]
        return await run_completion(http, body, ids, chat=False, echo_text=echo_text)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        body = await server.read_body(http)
        protocol.check_model(body, server.model_name)
        template = server.chat_template()
        if template is None:
            raise ApiError(
                400,
                f"the model {server.model_name!r} has no chat template (its tokenizer defines "
                "none): use /v1/completions with a plain prompt",
                code="chat_template_missing",
            )
        prompt = template(protocol.chat_messages(body))
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ApiError(400, "the messages encode to no tokens", param="messages")
        return await run_completion(http, body, ids, chat=True, echo_text="")

    return app


def _stream_entry(
    chat: bool, index: int, text: str, finish_reason: str | None, *, first: bool = False
) -> dict:
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if finish_reason is None:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


__all__ = ["DISCONNECT_POLL_SECONDS", "Server", "create_app"]
