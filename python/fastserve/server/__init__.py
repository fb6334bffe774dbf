"""HTTP serving of one Engine: an OpenAI-compatible embeddings API, the
classification, rerank (Cohere's, TEI's) and extraction routes, health and
readiness probes and Prometheus metrics.

FastAPI (on Starlette) builds the app and its OpenAPI document; uvicorn runs
it. Every route is async down to the engine's futures (fastserve.wait_all: one
event-loop wake-up per request): no thread waits per request.
`create_app(engine)` returns the ASGI app for any ASGI server; `serve(engine)`
runs it under uvicorn and closes the engine after a graceful shutdown.

The parts, each with one reason to change:
  schemas    the API's request and response bodies (and their OpenAPI document)
  replies    how an answer is encoded and sent (JSON bytes, raw ASGI or a Response)
  errors     exceptions to OpenAI-shaped HTTP errors
  metrics    the Prometheus registry: HTTP metrics and the engine's collector
  edge       the ASGI layer every request passes: metrics, API key, payload
             limit, and the embeddings fast path past Starlette and FastAPI
  lifecycle  one request in flight: its deadline, the watch on the client's
             connection, cancelling what it queued
  routes     what each route does with the engine
  task_routes  the rerank and extract routes (POST /v1/rerank, /v2/rerank, /rerank, /v1/extract)
  protocol   uvicorn's httptools protocol with bounds on the request line,
             headers and the time they take
  app        create_app (the routes wired into FastAPI) and serve (uvicorn)
Only the names below are the package's API.
"""

try:
    import fastapi  # noqa: F401
    import orjson  # noqa: F401
    import prometheus_client  # noqa: F401
    import pydantic  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"fastserve's HTTP server needs the 'serve' extra (missing module {e.name!r}): "
        "pip install \".[serve]\" in fastserve's source folder (from an index: pip install \"fastserve[serve]\")"
    ) from e

from .app import DEFAULT_MAX_PAYLOAD_BYTES, create_app, serve
from .errors import ApiError
from .routes import DEFAULT_MAX_INPUTS

__all__ = ["ApiError", "create_app", "serve", "DEFAULT_MAX_INPUTS", "DEFAULT_MAX_PAYLOAD_BYTES"]
