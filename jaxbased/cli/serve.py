"""``jaxbased-serve``: an OpenAI-compatible HTTP server with continuous batching.

    jaxbased-serve --workdir=workdirs/demo
    jaxbased-serve --checkpoint=based-360m/ --num_slots=16 --max_len=2048 --port=8000

Loads the model and tokenizer of a ``train.py`` / ``jaxbased-convert`` / ``jaxbased-quantize``
workdir (or a released checkpoint folder, imported on the fly), compiles every program of the
engine, then serves ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``
and ``/metrics`` on uvicorn. SIGTERM or Ctrl-C stops admitting requests, lets the running ones
finish for up to ``--shutdown_timeout`` seconds, cancels the rest, and exits 0.

``--recycled_top_k=K`` (> 0) decodes the full-attention layers under Recycled Attention, each
slot on its own schedule (docs/recycled_attention.md, docs/serving.md); the other
``--recycled_*`` flags are those of ``jaxbased-generate``.
"""

from __future__ import annotations

import pathlib
import signal
from types import FrameType

from absl import flags, logging

from jaxbased.cli import command, errors, recycled_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "train.py or jaxbased-convert workdir")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "released checkpoint folder")
_STEP = flags.DEFINE_integer("step", None, "workdir checkpoint step (default: the newest)")
_TOKENIZER_FILE = flags.DEFINE_string(
    "tokenizer_file", None, "GPT-2 tokenizer file for --checkpoint (gpt2.tiktoken or .json)"
)
_MODEL_NAME = flags.DEFINE_string(
    "model_name", None, "the model name requests give (default: the folder's name)"
)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
_PORT = flags.DEFINE_integer("port", 8000, "port to listen on")
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 8, "sequences decoded together")
_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "tokens per sequence, prompt plus generated")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "waiting requests before 429 answers")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 512, "longer prompts are prefilled in pieces of this many tokens (0: whole)"
)
_PREFILL_BUDGET = flags.DEFINE_integer(
    "prefill_token_budget", 2048, "prompt tokens prefilled between two decode steps"
)
_DEFAULT_MAX_TOKENS = flags.DEFINE_integer(
    "default_max_tokens", 16, "max_tokens of a request that gives none"
)
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "larger request bodies get 413")
_SHUTDOWN_TIMEOUT = flags.DEFINE_float(
    "shutdown_timeout", 30.0, "seconds running requests get to finish on SIGTERM"
)
_RECYCLED = recycled_flags.define_flags()


def recycled_attention_policy():
    """The ``RecycledAttentionPolicy`` of the ``--recycled_*`` flags (None when
    ``--recycled_top_k=0``); a usage error naming the flag of a bad value."""
    return _RECYCLED.policy()


def check_flags() -> None:
    """Usage errors for flags that cannot work, before the model is loaded."""
    errors.check_model_source(_WORKDIR.value, _CHECKPOINT.value)
    if not 0 <= _PORT.value < 65536:
        raise errors.UsageError(f"--port={_PORT.value} must be in [0, 65535]")
    for name, value, minimum in (
        ("num_slots", _NUM_SLOTS.value, 1),
        ("max_len", _MAX_LEN.value, 2),
        ("max_queue", _MAX_QUEUE.value, 1),
        ("prefill_token_budget", _PREFILL_BUDGET.value, 1),
        ("default_max_tokens", _DEFAULT_MAX_TOKENS.value, 1),
        ("max_body_bytes", _MAX_BODY.value, 1),
    ):
        if value < minimum:
            raise errors.UsageError(f"--{name}={value} must be >= {minimum}")
    if _SHUTDOWN_TIMEOUT.value < 0:
        raise errors.UsageError(f"--shutdown_timeout={_SHUTDOWN_TIMEOUT.value} must be >= 0")
    recycled_attention_policy()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    # Imported here so that --help and usage errors answer without loading JAX; uvicorn (the
    # serve extra) first, so that its absence is reported before the model loads.
    import uvicorn  # noqa: F401

    from jaxbased.evaluation import load_inference_model
    from jaxbased.serving.app import Server, create_app
    from jaxbased.serving.engine import Engine, EngineConfig

    try:
        engine_config = EngineConfig(
            num_slots=_NUM_SLOTS.value,
            max_len=_MAX_LEN.value,
            max_queue=_MAX_QUEUE.value,
            prefill_token_budget=_PREFILL_BUDGET.value,
            prefill_chunk=_PREFILL_CHUNK.value if _PREFILL_CHUNK.value <= _MAX_LEN.value else 0,
            recycled_attention=recycled_attention_policy(),
        )
        model, params, tokenizer = load_inference_model(
            workdir=_WORKDIR.value,
            checkpoint=_CHECKPOINT.value,
            step=_STEP.value,
            tokenizer_file=_TOKENIZER_FILE.value,
        )
    except ValueError as error:
        raise errors.UsageError(str(error)) from error
    folder = pathlib.Path(_WORKDIR.value or _CHECKPOINT.value).resolve()
    model_name = _MODEL_NAME.value or folder.name
    config = model.config
    try:
        engine = Engine(
            model,
            params,
            engine_config,
            decode_text=tokenizer.decode,
            eos_id=tokenizer.eos_id,
        )
    except ValueError as error:  # e.g. a Recycled Attention policy for a model without attention
        raise errors.UsageError(str(error)) from error
    logging.info(
        "model %r: %d layers (%s), d_model %d; %d slots of up to %d tokens; compiling",
        model_name,
        config.num_layers,
        ", ".join(sorted(set(config.layer_pattern))),
        config.d_model,
        engine_config.num_slots,
        engine_config.max_len,
    )
    engine.warmup()
    server = Server(
        engine,
        tokenizer,
        model_name=model_name,
        max_body_bytes=_MAX_BODY.value,
        default_max_tokens=_DEFAULT_MAX_TOKENS.value,
        shutdown_timeout=_SHUTDOWN_TIMEOUT.value,
    )
    print(f"serving {model_name!r} on http://{_HOST.value}:{_PORT.value}", flush=True)
    serve(create_app(server), on_exit=engine.drain)
    print("server stopped", flush=True)


def serve(app, on_exit) -> None:
    """Run ``app`` on uvicorn at ``--host``:``--port`` until SIGTERM or SIGINT, calling
    ``on_exit()`` first thing on the signal (the engine stops admitting requests); open
    requests then get ``--shutdown_timeout`` seconds, as uvicorn's graceful shutdown gives
    them. uvicorn re-raises a signal it handled once it is done, which would end the process
    with that signal's status: this server does not, so that it exits 0."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            logging.info("signal %s: draining", signal.Signals(sig).name)
            on_exit()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=_HOST.value,
        port=_PORT.value,
        log_level="warning",
        timeout_graceful_shutdown=max(1, int(_SHUTDOWN_TIMEOUT.value + 0.999)),
    )
    GracefulServer(config).run()


COMMAND = command.Command(
    name="jaxbased-serve",
    summary="serve a model over an OpenAI-compatible HTTP API with continuous batching",
    usage="jaxbased-serve (--workdir=DIR | --checkpoint=FOLDER) [flags]",
    examples=(
        "jaxbased-serve --workdir=workdirs/demo",
        "jaxbased-serve --workdir=workdirs/demo --num_slots=16 --max_len=1024 --port=8001",
        "jaxbased-serve --checkpoint=based-360m/ --tokenizer_file=gpt2.tiktoken",
        "jaxbased-serve --workdir=workdirs/demo_transformer --recycled_top_k=256",
    ),
    notes="Routes: POST /v1/completions, POST /v1/chat/completions (tokenizers with a chat "
    "template), GET /v1/models, /health, /metrics (Prometheus). Every program is compiled "
    "before the port opens. SIGTERM stops admitting, waits --shutdown_timeout seconds for "
    "running requests, cancels the rest and exits 0.",
    groups=(
        ("model", ("workdir", "checkpoint", "step", "tokenizer_file", "model_name")),
        ("server", ("host", "port", "max_body_bytes", "shutdown_timeout", "default_max_tokens")),
        ("engine", ("num_slots", "max_len", "max_queue", "prefill_chunk", "prefill_token_budget")),
        ("recycled attention", recycled_flags.FLAG_NAMES),
    ),
)


def run() -> None:
    """Console-script entry point."""
    command.run(main, COMMAND)


if __name__ == "__main__":
    run()
