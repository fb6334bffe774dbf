"""The app: the routes wired into FastAPI behind the edge (create_app), and
uvicorn running it with a graceful shutdown (serve)."""

import contextlib
import functools
import logging
import math
import numbers
import signal
import socket
import threading
from typing import Any, Optional, Sequence, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Match

from ..engine import Engine
from ..admission import PRIORITY_RANGE
from .edge import URGENCY, Edge, Urgency, route_path
from .errors import ApiError, internal_error, invalid_json, validation_error
from .metrics import Metrics
from .protocol import DEFAULT_CLIENT_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES, guarded
from .routes import DEFAULT_MAX_INPUTS, Api
from .schemas import ERROR_RESPONSES, ClassifyRequest, ClassifyResponse, EmbeddingRequest, EmbeddingResponse
from .task_routes import TaskRoutes

DEFAULT_MAX_PAYLOAD_BYTES = 2_000_000  # text-embeddings-inference's default payload limit
# Answer headers a browser's script may read under CORS (besides the safelisted ones).
KEEP_ALIVE_S = 65.0  # idle keep-alive without a client timeout: past common client pools' expiry (httpx 5 s, aiohttp 15 s)
EXPOSED_HEADERS = ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time", "retry-after")


def check_app_options(*, max_payload_bytes: Any = DEFAULT_MAX_PAYLOAD_BYTES, max_inputs: Any = DEFAULT_MAX_INPUTS,
                      request_timeout: Any = None, client_timeout_s: Any = DEFAULT_CLIENT_TIMEOUT_S,
                      api_key: Any = None, model_name: Any = None, cors_allow_origins: Any = (),
                      max_priority: Any = 0) -> None:
    """create_app's checks of its options, without an engine (fastserve.ray.app
    makes them before deploying): ValueError naming the first bad one."""
    for name, value in (("max_payload_bytes", max_payload_bytes), ("max_inputs", max_inputs)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("client_timeout_s", client_timeout_s), ("request_timeout", request_timeout)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not 0 < value < math.inf):
            raise ValueError(f"{name} must be positive seconds or None, got {value!r}")
    for name, value in (("api_key", api_key), ("model_name", model_name)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a str or None, got {type(value).__name__}")
    if api_key is not None and (not api_key or api_key != api_key.strip()):
        # "" turned the key off without a word (api_key=os.environ.get("KEY", "")
        # with KEY unset); a key with outer spaces could never match.
        raise ValueError("api_key must be None (no key) or a non-empty key without leading or trailing whitespace")
    if isinstance(cors_allow_origins, str) or not all(isinstance(o, str) for o in cors_allow_origins):
        raise ValueError(f"cors_allow_origins must be a list of origins, got {cors_allow_origins!r}")
    # At least 0: a request without the header runs at 0, so a bound below it
    # would refuse a header asking for what no header gets.
    hi = PRIORITY_RANGE[1]
    if isinstance(max_priority, bool) or not isinstance(max_priority, numbers.Integral) or not 0 <= max_priority <= hi:
        raise ValueError(f"max_priority must be an int within [0, {hi}], got {max_priority!r}")


def create_app(
    engine: Engine,
    *,
    api_key: Optional[str] = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_inputs: int = DEFAULT_MAX_INPUTS,
    request_timeout: Optional[float] = None,
    model_name: Optional[str] = None,
    client_timeout_s: Optional[float] = DEFAULT_CLIENT_TIMEOUT_S,
    cors_allow_origins: Sequence[str] = (),
    max_priority: int = 0,
) -> FastAPI:
    """The ASGI app serving `engine`. The caller keeps ownership of the engine.

    api_key: when set, every route (/v1/*, /rerank, the docs) needs `Authorization: Bearer <key>`
    (/health, /ready and /metrics stay open for probes and scrapers).
    max_payload_bytes, max_inputs: larger requests get 413.
    request_timeout: seconds from arrival; a request not served by then gets
    504 (its queued inputs never reach the model). Default: the engine's
    request_timeout_s (an engine made with None: no deadline).
    model_name: the id reported in responses and /v1/models (default: the
    engine's model name).
    client_timeout_s: seconds a request's body may go without a byte
    arriving before it gets 408 (None: no limit; serve() also bounds the
    headers' time with it).
    cors_allow_origins: origins a browser may call the API from ("*" for
    any): CORS headers on every answer, preflights answered without the key.
    max_priority: the highest priority a request may ask for with its
    `X-Fastserve-Priority: N` header (the engine's `priority`: higher runs
    first; without the header, 0). The default 0 lets a client lower its
    requests' priority (a bulk job sending -100 stays behind interactive
    requests), not raise it; a value above it is a 400.
    """
    check_app_options(max_payload_bytes=max_payload_bytes, max_inputs=max_inputs, request_timeout=request_timeout,
                      client_timeout_s=client_timeout_s, api_key=api_key, model_name=model_name,
                      cors_allow_origins=cors_allow_origins, max_priority=max_priority)
    if request_timeout is None:
        request_timeout = engine.request_timeout_s
    metrics = Metrics(engine)
    api = Api(engine, metrics, model_name=model_name or engine.model_name, max_inputs=max_inputs,
              request_timeout=request_timeout)
    # No redirect for a trailing slash (an empty 307 to an address built from
    # the client's Host header): /v1/embeddings/ gets the shaped 404.
    app = App(title="fastserve", version=_version(), redirect_slashes=False,
              description="OpenAI-compatible embeddings (and classification, reranking, entity "
                          "extraction) served by fastserve.")
    app.max_priority = max_priority
    app.state.engine = engine
    app.state.metrics = metrics
    # The endpoints reach the Api through the request's app, never through a
    # closure or a bound method: FastAPI keeps every endpoint in module-level
    # caches (lru_cache, 4,096 entries), which would keep the engine and its
    # model alive after the app is gone.
    app.state.api = api
    app.state.task_routes = TaskRoutes(api)

    if engine.task == "embed":
        @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES,
                  summary="Create embeddings (OpenAI-compatible)")
        async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
            return (await _api(request).embeddings(body, request.receive, _urgency_of(request))).response()
    elif engine.task == "classify":
        @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES,
                  summary="Classify texts")
        async def classify(body: ClassifyRequest, request: Request) -> Response:
            return (await _api(request).classify(body, request.receive, _urgency_of(request))).response()
    else:
        add_task_routes(app, engine.task)
    def get(path: str, **kw):
        """GET, and HEAD beside it (RFC 9110: a HEAD health check, `wget
        --spider` say, got 405), kept out of the OpenAPI document."""
        def add(fn):
            app.head(path, include_in_schema=False, **{k: v for k, v in kw.items() if k == "response_class"})(fn)
            return app.get(path, **kw)(fn)
        return add

    get("/v1/models", summary="The served model")(models)
    get("/v1/models/{model_id:path}", summary="The served model by its id (404 for any other)")(model)
    get("/health", summary="Liveness: the process answers")(health)
    get("/ready", summary="Readiness: the engine is loaded and its worker alive",
        responses={503: {"description": "the engine is not serving"}})(ready)
    get("/metrics", summary="Prometheus metrics", response_class=Response)(metrics_text)

    @app.exception_handler(ApiError)
    async def _on_api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc, request.url.path).response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            # FastAPI's answer to a body json.loads fails on other than by
            # JSONDecodeError: not UTF-8, or nested past the recursion limit.
            return invalid_json().response()
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        wanted = TASK_OF_ROUTE.get(route_path(request.scope)) if exc.status_code == 404 else None
        if wanted is not None:  # another task's route: say which server serves it
            return ApiError(404, f"this server runs task '{engine.task}'; {route_path(request.scope)} is task "
                                 f"'{wanted}' (fastserve serve --task {wanted})", code="not_found").response()
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path (Starlette names the first route's alone)
            headers["Allow"] = ", ".join(sorted({m for r in app.routes if r.matches(request.scope)[0] != Match.NONE
                                                 for m in getattr(r, "methods", None) or ()}))
        err = ApiError(exc.status_code, str(exc.detail), code=kind, headers=headers)
        return err.response()

    @app.exception_handler(Exception)
    async def _on_unhandled(request: Request, exc: Exception) -> Response:
        # Starlette's last resort (it re-raises after answering, and the edge logs it).
        return internal_error().response()

    app.edge = Edge(functools.partial(FastAPI.__call__, app), metrics=metrics, api_key=api_key,
                    max_payload_bytes=max_payload_bytes, api=api if engine.task == "embed" else None,
                    client_timeout_s=client_timeout_s, max_priority=max_priority)
    if cors_allow_origins:  # outermost: the edge's own answers (401, 413, the fast path) carry the headers too
        app.edge = CORSMiddleware(app.edge, allow_origins=list(cors_allow_origins),
                                  allow_methods=["GET", "HEAD", "POST"], allow_headers=["*"],
                                  expose_headers=list(EXPOSED_HEADERS))
    return app


def _api(request: Request) -> Api:
    return request.app.state.api


def _routes(request: Request) -> TaskRoutes:
    return request.app.state.task_routes


def _urgency_of(request: Request) -> Urgency:
    """What the request's headers ask for, as the edge checked them."""
    return request.scope.get(URGENCY, Urgency())


# The GET endpoints: named, annotated and documented as the Api methods they
# call, so that the OpenAPI document (operation ids, schemas) is theirs.
async def models(request: Request) -> dict[str, Any]:
    return await _api(request).models()


async def model(model_id: str, request: Request) -> dict[str, Any]:
    return await _api(request).model(model_id)


model.__doc__ = Api.model.__doc__


async def health(request: Request) -> dict[str, str]:
    return await _api(request).health()


async def ready(request: Request) -> Response:
    return await _api(request).ready()


async def metrics_text(request: Request) -> Response:
    return await _api(request).metrics_text()


# Each task's POST routes: a request for another task's gets a 404 saying so.
TASK_OF_ROUTE = {"/v1/embeddings": "embed", "/v1/classify": "classify", "/v1/rerank": "rerank", "/v2/rerank": "rerank",
                 "/rerank": "rerank", "/v1/extract": "token-classify"}


def add_task_routes(app: FastAPI, task: str) -> None:
    """The routes of a rerank or token-classify engine (app.state.task_routes)."""
    from .schemas import ExtractRequest, ExtractResponse, RerankRequest, RerankResponse, TeiRank, TeiRerankRequest

    if task == "rerank":
        @app.post("/v1/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES,
                  summary="Rank documents against a query (Cohere / Jina / vLLM shape)")
        async def rerank(body: RerankRequest, request: Request) -> Response:
            return (await _routes(request).rerank(body, request.receive, urgency=_urgency_of(request))).response()

        @app.post("/v2/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES,
                  summary="The same, at the path of Cohere's v2 API (cohere.ClientV2)")
        async def rerank_v2(body: RerankRequest, request: Request) -> Response:
            return (await _routes(request).rerank(body, request.receive, "/v2/rerank", _urgency_of(request))).response()

        @app.post("/rerank", response_model=list[TeiRank], responses=ERROR_RESPONSES,
                  summary="Rank texts against a query (text-embeddings-inference shape)")
        async def tei_rerank(body: TeiRerankRequest, request: Request) -> Response:
            return (await _routes(request).tei_rerank(body, request.receive, _urgency_of(request))).response()
    else:
        @app.post("/v1/extract", response_model=ExtractResponse, responses=ERROR_RESPONSES,
                  summary="Extract entities (token classification)")
        async def extract(body: ExtractRequest, request: Request) -> Response:
            return (await _routes(request).extract(body, request.receive, _urgency_of(request))).response()


def urgency_headers(max_priority: int) -> list[dict]:
    """The request headers every inference route reads (checked by the edge,
    so not FastAPI parameters), as the OpenAPI document declares them."""
    return [
        {"name": "X-Fastserve-Priority", "in": "header", "required": False,
         "description": "the priority of the request's inputs: higher runs first (default 0), at most the "
                        "server's --max-priority",
         "schema": {"type": "integer", "default": 0, "minimum": PRIORITY_RANGE[0], "maximum": max_priority}},
        {"name": "X-Fastserve-Timeout", "in": "header", "required": False,
         "description": "seconds: a deadline shorter than the server's request timeout (a longer one is cut to it)",
         "schema": {"type": "number", "exclusiveMinimum": 0}},
    ]


class App(FastAPI):
    """FastAPI with fastserve's edge (Edge: metrics, API key, payload limit,
    the embeddings fast path) outside all of Starlette's middleware, so a
    request the fast path serves pays for none of it (CORS, when asked for,
    wraps the edge)."""

    edge: Union[Edge, CORSMiddleware]
    max_priority = 0  # create_app's: the highest X-Fastserve-Priority the document declares

    async def __call__(self, scope, receive, send) -> None:
        await self.edge(scope, receive, send)

    def openapi(self) -> dict:
        """FastAPI's document without the 422 it adds to every route with a
        body: an invalid body is answered 400 in the API's error shape
        (documented by each route's ERROR_RESPONSES)."""
        if self.openapi_schema is None:
            schema = super().openapi()
            for path in schema.get("paths", {}).values():
                for method, op in path.items():
                    op.get("responses", {}).pop("422", None)
                    if method == "post":  # the headers the edge reads (Urgency)
                        op.setdefault("parameters", []).extend(urgency_headers(self.max_priority))
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return self.openapi_schema


def _version() -> str:
    from .. import __version__

    return __version__


class Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the caught SIGTERM/SIGINT after
    shutdown (uvicorn does, which would kill the process before serve() could
    close the engine): a signalled shutdown ends serve() normally."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if sockets and self.started:  # uvicorn names its address only where it bound it itself
            host, port = self.config.host, sockets[0].getsockname()[1]
            logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                    f"[{host}]" if ":" in host else host, port)


def keep_alive_s(client_timeout_s: Optional[float]) -> float:
    """Seconds a kept-alive connection may stay idle after an answer: the
    client timeout, as long as a new connection may stay silent (protocol.py),
    and KEEP_ALIVE_S without one. uvicorn's own 5 s equals httpx's pool
    expiry, and a client reusing a connection just as the server closed it
    got a connection error (1 request in 200 after 4.95 s idle)."""
    return KEEP_ALIVE_S if client_timeout_s is None else max(float(client_timeout_s), 5.0)


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_key: Optional[str] = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_inputs: int = DEFAULT_MAX_INPUTS,
    request_timeout: Optional[float] = None,
    model_name: Optional[str] = None,
    graceful_timeout: Optional[float] = 30.0,
    log_level: str = "info",
    access_log: bool = False,
    close_engine: bool = True,
    client_timeout_s: Optional[float] = DEFAULT_CLIENT_TIMEOUT_S,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    cors_allow_origins: Sequence[str] = (),
    sockets: Optional[Sequence[socket.socket]] = None,
    max_priority: int = 0,
) -> None:
    """Serve `engine` over HTTP until SIGTERM/SIGINT. Shutdown is graceful:
    stop accepting, let in-flight requests finish (at most graceful_timeout
    seconds), then close the engine (unless close_engine=False).
    sockets: already bound to host:port (the CLI binds before it loads the
    model), else uvicorn binds them.
    client_timeout_s: a request's headers must all arrive within it (else
    408), and its body must not stall longer (408; None: no time bound);
    max_header_bytes: a larger request line and headers get 431
    (protocol.py)."""
    try:
        app = create_app(engine, api_key=api_key, max_payload_bytes=max_payload_bytes, max_inputs=max_inputs,
                         request_timeout=request_timeout, model_name=model_name, client_timeout_s=client_timeout_s,
                         cors_allow_origins=cors_allow_origins, max_priority=max_priority)
        # Proxy headers (X-Forwarded-For) only matter for the client addresses of
        # the access log; without it uvicorn's proxy middleware is skipped.
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                                proxy_headers=access_log, timeout_graceful_shutdown=graceful_timeout,
                                timeout_keep_alive=keep_alive_s(client_timeout_s),
                                lifespan="off", http=guarded(max_header_bytes, client_timeout_s, app.state.metrics))
        Server(config).run(sockets=list(sockets) if sockets else None)
    finally:
        if close_engine:
            engine.close()
