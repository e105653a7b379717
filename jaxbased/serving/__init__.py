"""Serving: a continuous-batching engine (:mod:`jaxbased.serving.engine`) behind an
OpenAI-compatible HTTP API (:mod:`jaxbased.serving.app`), with Prometheus metrics
(:mod:`jaxbased.serving.metrics`). docs/serving.md describes them.

The engine needs only JAX; the HTTP API needs the ``serve`` extra (FastAPI, uvicorn).
"""

from jaxbased.serving.engine import (
    Completion,
    Engine,
    EngineConfig,
    EngineStoppedError,
    QueueFullError,
    Request,
    SamplingParams,
)
from jaxbased.serving.metrics import ServingMetrics

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineStoppedError",
    "QueueFullError",
    "Request",
    "SamplingParams",
    "ServingMetrics",
]
