"""HTTP serving of one Engine: an OpenAI-compatible embeddings API, a
classification route, health and readiness probes and Prometheus metrics.

FastAPI (on Starlette) builds the app and its OpenAPI document; uvicorn runs
it. Every route is async down to the engine's futures (engine.all_done: one
event-loop wake-up per request): no thread waits per request.
POST /v1/embeddings with a valid body takes a fast path past Starlette and
FastAPI (_Edge._fast_embeddings). `create_app(engine)` returns the ASGI app for any
ASGI server; `serve(engine)` runs it under uvicorn and closes the engine after
a graceful shutdown.
"""

import asyncio
import base64
import concurrent.futures as cf
import contextlib
import functools
import hmac
import logging
import signal
import threading
import time
from typing import Any, Literal, NamedTuple, Optional, Union

import numpy as np

try:
    import orjson
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import Response
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"fastserve's HTTP server needs the 'serve' extra (missing module {e.name!r}): "
        "pip install 'fastserve[serve]'"
    ) from e

from .engine import ADMIT_PAUSE_S, Engine, InferenceError, all_done
from .errors import EngineClosedError, InvalidInputError, QueueFullError, RequestTimeoutError

log = logging.getLogger("fastserve.server")

DEFAULT_MAX_PAYLOAD_BYTES = 2_000_000  # text-embeddings-inference's default payload limit
DEFAULT_MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
RETRY_AFTER_S = 1
# Texts are tokenized on the event loop up to this many characters in one
# request (well under a millisecond with the Rust tokenizer); longer requests
# are tokenized in a worker thread so one large request cannot stall the loop.
INLINE_TOKENIZE_CHARS = 8192
# Paths a probe or scraper reaches without the API key.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
ROUTES = frozenset({"/v1/embeddings", "/v1/classify", "/v1/models", "/health", "/ready", "/metrics",
                    "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   30.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BODILESS = ("GET", "HEAD", "OPTIONS")  # methods whose body the edge does not read
_CLIENT_CLOSED = 499  # nginx's status for "client closed the request": recorded, never sent


# ----------------------------------------------------------------- schemas

Texts = Union[StrictStr, list[StrictStr]]
EmbeddingInput = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request. `model` and `user` are accepted and
    ignored: the server serves one model."""

    input: EmbeddingInput = Field(description="a text, a list of texts, token ids, or a list of token-id lists")
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = Field(default=None, description="keep the first N dimensions (Matryoshka)")
    user: Optional[str] = None


class ClassifyRequest(BaseModel):
    input: Texts
    model: Optional[str] = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ClassificationItem(BaseModel):
    object: Literal["classification"] = "classification"
    index: int
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClassificationItem]
    model: str
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    model_config = ConfigDict(title="Error")
    error: ErrorBody


_ERROR_RESPONSES: dict[Union[int, str], dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in {
        400: "invalid input",
        401: "missing or wrong API key",
        413: "payload or number of inputs over the limit",
        429: "the engine's queue is full (see Retry-After)",
        503: "the engine is closed or unhealthy",
        504: "the request's deadline passed",
    }.items()
}


# ------------------------------------------------------------------ errors


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def reply(self) -> "_Reply":
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return _Reply(self.status, _dumps(body), self.headers)

    def response(self) -> Response:
        return self.reply().response()


class _Reply(NamedTuple):
    """A JSON answer: what a route computes, sent either as a Starlette
    Response (FastAPI's routes) or as the two raw ASGI messages (the
    embeddings fast path, which skips building Response objects)."""

    status: int
    body: bytes
    headers: dict[str, str]

    def response(self) -> Response:
        return Response(self.body, status_code=self.status, media_type="application/json", headers=self.headers)

    async def send(self, send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body))]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def _api_error(exc: BaseException) -> ApiError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(429, "the server is at capacity (queue full); retry later", type="rate_limit_error",
                        code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, RequestTimeoutError):
        return ApiError(504, "the request's deadline passed before it could be served", type="timeout_error",
                        code="request_timeout")
    if isinstance(exc, EngineClosedError):
        return ApiError(503, "the engine is not serving (closed or unhealthy)", type="service_unavailable",
                        code="engine_unavailable")
    if isinstance(exc, InvalidInputError):
        return ApiError(400, str(exc), param="input", code="invalid_input")
    if isinstance(exc, InferenceError):
        log.error("inference failed: %r", exc.__cause__ or exc)
    else:
        log.error("unhandled error while serving a request", exc_info=exc)
    return _internal_error()


def _internal_error() -> ApiError:
    return ApiError(500, "internal server error", type="server_error", code="internal_error")


def _validation_error(exc: RequestValidationError, path: str) -> ApiError:
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    if errors and all(tuple(err.get("loc", ()))[:2] == ("body", "input") for err in errors):
        # One message for the union's four branches rather than one per branch.
        what = ("a string or a list of strings" if path == "/v1/classify" else
                "a string, a list of strings, a list of token ids (int), or a list of lists of token ids")
        return ApiError(400, f"input must be {what}", param="input", code="invalid_input")
    parts, param = [], None
    for err in errors[:4]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # A union's branch names ("str", "list[int]") are noise in a location.
        loc = [x for x in loc if not x.startswith(("list[", "str", "int"))]
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    more = f" (and {len(errors) - 4} more)" if len(errors) > 4 else ""
    return ApiError(400, "invalid request: " + "; ".join(parts) + more, param=param, code="invalid_request")


# ----------------------------------------------------------------- metrics


class _EngineCollector:
    """The engine's own counters and summaries, read from engine.stats() at
    each scrape (the C++ core already keeps them; nothing is double-counted)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list:
        return []  # collected lazily: the stats dict decides what exists

    def collect(self):
        s = self.engine.stats()
        outcomes = CounterMetricFamily("fastserve_engine_requests", "Engine requests by outcome", labels=["outcome"])
        for key in ("submitted", "completed", "failed", "expired", "cancelled", "rejected", "closed_unserved"):
            if key in s:
                outcomes.add_metric([key], float(s[key]))
        yield outcomes
        yield CounterMetricFamily("fastserve_engine_batches", "Batches run", value=float(s.get("batches", 0)))
        yield CounterMetricFamily("fastserve_engine_failed_batches", "Batches whose model call raised",
                                  value=float(s.get("failed_batches", 0)))
        tokens = CounterMetricFamily("fastserve_engine_tokens", "Tokens run, real and with padding", labels=["kind"])
        tokens.add_metric(["real"], float(s.get("real_tokens", 0)))
        tokens.add_metric(["padded"], float(s.get("padded_tokens", 0)))
        yield tokens
        yield GaugeMetricFamily("fastserve_engine_queue_depth", "Requests waiting in the queue",
                                value=float(s.get("queue_depth", 0)))
        yield GaugeMetricFamily("fastserve_engine_queued_tokens", "Tokens waiting in the queue",
                                value=float(s.get("queued_tokens", 0)))
        yield GaugeMetricFamily("fastserve_engine_padding_ratio", "Share of computed tokens that were padding",
                                value=float(s.get("padding_ratio", 0.0)))
        ctl = s.get("controller", {})
        yield GaugeMetricFamily("fastserve_engine_controller_budget_tokens",
                                "The adaptive controller's current token budget per batch",
                                value=float(ctl.get("budget_tokens", 0)))
        for key, name, doc in (
            ("latency_s", "fastserve_engine_latency_seconds", "Engine latency per request, submit to result"),
            ("queue_s", "fastserve_engine_queue_seconds", "Time a request waited in the queue"),
            ("batch_compute_s", "fastserve_engine_batch_compute_seconds", "Model time per batch"),
            ("batch_size", "fastserve_engine_batch_size", "Requests per batch"),
            ("batch_tokens", "fastserve_engine_batch_tokens", "Tokens per batch (cost in the batch's layout)"),
        ):
            if key in s:
                yield _summary(name, doc, s[key])
        health = s.get("health", {})
        yield GaugeMetricFamily("fastserve_engine_healthy", "1 while the engine serves",
                                value=1.0 if health.get("healthy") else 0.0)
        info = GaugeMetricFamily("fastserve_engine_info", "The served model and how it runs",
                                 labels=["model", "task", "device", "dtype", "execution", "policy"])
        info.add_metric([str(s.get("model", "")), str(s.get("task", "")), str(s.get("device", "")),
                         str(s.get("dtype", "")), str(s.get("execution", "")), str(ctl.get("policy", ""))], 1.0)
        yield info


def _summary(name: str, doc: str, h: dict[str, float]) -> Metric:
    """An engine histogram snapshot (count, mean, p50/p95/p99) as a Prometheus summary."""
    m = Metric(name, doc, "summary")
    for key, q in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
        if key in h:
            m.add_sample(name, {"quantile": q}, float(h[key]))
    count = float(h.get("count", 0))
    m.add_sample(name + "_count", {}, count)
    m.add_sample(name + "_sum", {}, float(h.get("mean", 0.0)) * count)
    return m


class _Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("fastserve_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("fastserve_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_progress = Gauge("fastserve_http_requests_in_progress", "HTTP requests being served",
                                 registry=self.registry)
        self.inputs = Counter("fastserve_http_inputs", "Inputs (texts or token lists) received, by route",
                              ["route"], registry=self.registry)
        self.prompt_tokens = Counter("fastserve_http_prompt_tokens", "Tokens of the inputs served, by route",
                                     ["route"], registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        # The children of each label set, looked up once (bounded label sets).
        self.requests_for = functools.lru_cache(maxsize=None)(self.requests.labels)
        self.latency_for = functools.lru_cache(maxsize=None)(self.latency.labels)
        self.inputs_for = functools.lru_cache(maxsize=None)(self.inputs.labels)
        self.prompt_tokens_for = functools.lru_cache(maxsize=None)(self.prompt_tokens.labels)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --------------------------------------------------------------- middleware


class _Edge:
    """The outer layer of every HTTP request: metrics, the API key, and the
    payload limit (the body is read here, at most max_payload_bytes of it,
    before any parsing). Anything a route lets escape becomes a generic 500:
    no stack trace reaches a client."""

    def __init__(self, app, *, metrics: _Metrics, api_key: Optional[str], max_payload_bytes: int,
                 api: Optional["_Api"] = None) -> None:
        self.app = app
        self.api = api
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_payload_bytes = max_payload_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "other"  # bounded label set, whatever clients send
        status: list[Optional[int]] = [None]

        async def send_recording(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        self.metrics.in_progress.inc()
        try:
            error = self._check_key(scope) if path not in OPEN_PATHS else None
            body = b""
            if error is None:
                body, error = await self._read_body(scope, receive)
            if body is None:  # the client left while sending its body
                status[0] = _CLIENT_CLOSED
            elif error is not None:
                await error.reply().send(send_recording)
            elif not await self._fast_embeddings(scope, body, receive, send_recording):
                method = scope.get("method")
                if method == "POST" and path.startswith("/v1/"):
                    scope = _as_json(scope)
                await self.app(scope, receive if method in _BODILESS else _replaying(body, receive), send_recording)
        except Exception as exc:
            log.error("unhandled error on %s %s", scope.get("method"), path, exc_info=exc)
            if status[0] is None:
                await _internal_error().reply().send(send_recording)
        finally:
            self.metrics.in_progress.dec()
            self.metrics.latency_for(route).observe(time.perf_counter() - t0)
            method = scope.get("method", "")
            method = method if method in _METHODS else "other"
            self.metrics.requests_for(route, method, str(status[0] or 500)).inc()

    async def _fast_embeddings(self, scope, body: bytes, receive, send) -> bool:
        """POST /v1/embeddings with a valid body, straight to the route:
        pydantic's (compiled) JSON validation, then the two ASGI messages of
        the answer, without Starlette's middleware, FastAPI's routing and
        dependency machinery, or Request and Response objects. Anything else,
        including every invalid body, is left to the app (False), so errors
        and the OpenAPI document are FastAPI's. `receive` is the server's
        own (the body has been read): the route watches it for the client
        leaving."""
        if self.api is None or scope["path"] != "/v1/embeddings" or scope.get("method") != "POST":
            return False
        try:
            request = EmbeddingRequest.model_validate_json(body)
        except ValueError:  # pydantic's ValidationError, or a body that is not JSON
            return False
        try:
            reply = await self.api.embeddings(request, receive)
        except ApiError as exc:  # what the app's exception handler would answer
            reply = exc.reply()
        await reply.send(send)
        return True

    def _check_key(self, scope) -> Optional[ApiError]:
        if self.api_key is None:
            return None
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
                break
        if hmac.compare_digest(given, self.api_key):
            return None
        message = "missing API key (send 'Authorization: Bearer <key>')" if not given else "invalid API key"
        return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope, receive):
        """(body, error): the whole body (b"" for GET, HEAD and OPTIONS, None
        if the client disconnected while sending it); an ApiError if it is
        too large."""
        if scope.get("method") in _BODILESS:
            return b"", None
        limit = self.max_payload_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return b"", _too_large(int(value), limit)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", _too_large(size, limit, at_least=True)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), None


def _replaying(body: bytes, receive):
    """A receive that gives the app the body already read, then the server's
    own messages (after the body: the disconnect)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _as_json(scope):
    """The API's bodies are always JSON: parse them as such whatever the
    client's Content-Type says (curl -d sends a form type)."""
    headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    return {**scope, "headers": headers}


def _too_large(size: int, limit: int, at_least: bool = False) -> ApiError:
    return ApiError(413, f"request body is {'over ' if at_least else ''}{size} bytes; the limit is {limit}",
                    code="payload_too_large")


# ------------------------------------------------------------------- routes


class _Request:
    """One API request in flight: its deadline, and a watch on the client's
    connection. Every wait goes through wait(), which gives up when the
    client leaves (_ClientGone) or the deadline passes (RequestTimeoutError);
    close() then cancels whatever the request still has queued in the engine.

    Kept lean, since it runs on the event loop for every request: the watch is
    one pending receive() (re-armed if a message other than http.disconnect
    comes), the deadline one timer armed only while waiting, and a wait
    cancels the awaited future directly instead of racing it in
    asyncio.wait()."""

    def __init__(self, receive, timeout: Optional[float]) -> None:
        self.start = time.perf_counter()
        self.deadline = None if timeout is None else self.start + timeout
        self.futures: list[cf.Future] = []
        self._receive = receive
        self._gone = False
        self._expired = False
        self._waiting: Optional[asyncio.Future] = None
        self._watch: Optional[asyncio.Future] = None
        self._arm()

    def _arm(self) -> None:
        self._watch = asyncio.ensure_future(self._receive())
        self._watch.add_done_callback(self._on_message)

    def _on_message(self, watch: asyncio.Future) -> None:
        if watch.cancelled():
            return
        if watch.exception() is not None or watch.result().get("type") == "http.disconnect":
            self._gone = True
            if self._waiting is not None:
                self._waiting.cancel()
        else:  # the body was replayed to a route; the next message is the disconnect
            self._arm()

    def _on_deadline(self) -> None:
        self._expired = True
        if self._waiting is not None:
            self._waiting.cancel()

    def remaining(self) -> Optional[float]:
        if self.deadline is None:
            return None
        left = self.deadline - time.perf_counter()
        if left <= 0:
            raise RequestTimeoutError("the request's deadline passed before it could be served")
        return left

    async def wait(self, awaitable):
        if self._gone:
            _abandon(asyncio.ensure_future(awaitable))
            raise _ClientGone()
        left = self.remaining()  # raises once the deadline has passed
        fut = asyncio.ensure_future(awaitable)
        timer = None if left is None else asyncio.get_running_loop().call_later(left, self._on_deadline)
        self._waiting = fut
        try:
            return await fut
        except asyncio.CancelledError:
            if self._gone:
                raise _ClientGone() from None
            if self._expired:
                raise RequestTimeoutError("the request's deadline passed before it could be served") from None
            raise  # the task itself was cancelled (server shutdown)
        finally:
            self._waiting = None
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for f in self.futures:
            f.cancel()  # a no-op for done or running ones; a queued one leaves the queue

    def timing_headers(self, tokenize_s: float) -> dict[str, str]:
        """text-embeddings-inference's timing headers, in ms; for several
        inputs, the largest queue and inference time among them."""
        queue = inference = 0.0
        for f in self.futures:
            t = getattr(f, "timing", None)
            if t:
                queue = max(queue, t.get("queue_s", 0.0))
                inference = max(inference, t.get("inference_s", 0.0))
        return {
            "x-total-time": _ms(time.perf_counter() - self.start),
            "x-tokenization-time": _ms(tokenize_s),
            "x-queue-time": _ms(queue),
            "x-inference-time": _ms(inference),
        }


def _abandon(task: asyncio.Future) -> None:
    """Cancel a wait nobody will read; its outcome (a gather reports its
    children's cancellation as an exception) is consumed, not logged."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


class _Api:
    def __init__(self, engine: Engine, metrics: _Metrics, *, model_name: str, max_inputs: int,
                 request_timeout: Optional[float]) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.max_inputs = max_inputs
        self.request_timeout = request_timeout
        self.created = int(time.time())
        self.vocab_size = engine.vocab_size

    # ---------------------------------------------------------------- inputs

    def _check_count(self, n: int) -> None:
        if n == 0:
            raise ApiError(400, "input must not be empty", param="input", code="invalid_input")
        if n > self.max_inputs:
            raise ApiError(413, f"{n} inputs in one request; the limit is {self.max_inputs}", param="input",
                           code="too_many_inputs")

    def _check_ids(self, inputs: list[list[int]]) -> list[list[int]]:
        """Validate every token list before any is queued, so a bad one late in
        a request never leaves earlier ones running for nothing."""
        out = []
        for i, ids in enumerate(inputs):
            if not ids:
                raise ApiError(400, f"token list at index {i} is empty", param="input", code="invalid_input")
            bad = next((t for t in ids if t < 0 or t >= self.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} at index {i} is outside the vocabulary [0, {self.vocab_size})",
                               param="input", code="invalid_input")
            if len(ids) > self.engine.max_length:
                if not self.engine.truncate:
                    raise ApiError(400, f"input at index {i} is {len(ids)} tokens long; the model's limit is "
                                   f"{self.engine.max_length}", param="input", code="invalid_input")
                ids = ids[: self.engine.max_length]
            out.append(ids)
        return out

    async def _tokenize(self, req: _Request, texts: list[str]) -> list[list[int]]:
        if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
            return self.engine.tokenize(texts)
        return await req.wait(asyncio.to_thread(self.engine.tokenize, texts))

    async def _run(self, req: _Request, token_lists: list[list[int]]) -> list:
        """Queue every input (Engine._admit: as many at a time as the queue
        takes; once something is accepted, a full queue means waiting its
        turn; only a request with nothing accepted yet is refused with 429),
        then wait for all."""
        for wait in self.engine._admit(token_lists, req.futures, 0, req.remaining):
            await req.wait(asyncio.sleep(ADMIT_PAUSE_S) if wait is None else asyncio.wrap_future(wait))
        await req.wait(all_done(req.futures))
        return [f.result() for f in req.futures]

    async def _serve(self, receive, route: str, texts: Optional[list[str]],
                     token_lists: Optional[list[list[int]]], answer) -> _Reply:
        """Tokenize, run and answer one request; every failure becomes an
        OpenAI-shaped error."""
        req = _Request(receive, self.request_timeout)
        try:
            t0 = time.perf_counter()
            if texts is not None:
                token_lists = await self._tokenize(req, texts)
            tokenize_s = time.perf_counter() - t0
            results = await self._run(req, token_lists)
            n_tokens = sum(len(ids) for ids in token_lists)
            self.metrics.inputs_for(route).inc(len(token_lists))
            self.metrics.prompt_tokens_for(route).inc(n_tokens)
            body = answer(results, {"prompt_tokens": n_tokens, "total_tokens": n_tokens})
            return _Reply(200, body, req.timing_headers(tokenize_s))
        except _ClientGone:
            return _Reply(_CLIENT_CLOSED, b"", {})  # never reaches the client; counted in metrics
        except Exception as exc:
            return _api_error(exc).reply()
        finally:
            req.close()

    # ---------------------------------------------------------------- routes

    async def embeddings(self, body: EmbeddingRequest, receive) -> _Reply:
        """POST /v1/embeddings. `receive` is the request's ASGI receive, its
        body already read (the watch on the client's connection)."""
        raw = body.input
        if isinstance(raw, str):
            texts, token_lists = [raw], None
        elif raw and isinstance(raw[0], str):
            texts, token_lists = list(raw), None
        elif raw and isinstance(raw[0], int):
            texts, token_lists = None, [list(raw)]
        else:
            texts, token_lists = None, [list(x) for x in raw]
        self._check_count(len(texts if texts is not None else token_lists))
        dim = self.engine.dim
        dims = body.dimensions
        if dims is not None and not 1 <= dims <= dim:
            raise ApiError(400, f"dimensions must be in [1, {dim}] for this model, got {dims}", param="dimensions",
                           code="invalid_dimensions")
        if token_lists is not None:
            token_lists = self._check_ids(token_lists)
        b64 = body.encoding_format == "base64"
        renormalize = self.engine.normalize

        def answer(vectors: list[np.ndarray], usage: dict[str, int]) -> bytes:
            data = []
            for i, v in enumerate(vectors):
                v = np.asarray(v, dtype=np.float32)
                if dims is not None and dims < dim:
                    v = v[:dims]
                    if renormalize:  # Matryoshka: truncate, then back to unit length
                        norm = float(np.linalg.norm(v))
                        v = v / norm if norm > 0 else v
                if b64:
                    emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                else:
                    emb = v if v.flags.c_contiguous else np.ascontiguousarray(v)
                data.append({"object": "embedding", "index": i, "embedding": emb})
            return _dumps({"object": "list", "data": data, "model": self.model_name, "usage": usage})

        return await self._serve(receive, "/v1/embeddings", texts, token_lists, answer)

    async def classify(self, body: ClassifyRequest, receive) -> _Reply:
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        self._check_count(len(texts))

        def answer(results: list, usage: dict[str, int]) -> bytes:
            data = [{"object": "classification", "index": i, "label": c.label, "score": c.score, "scores": c.scores}
                    for i, c in enumerate(results)]
            return _dumps({"object": "list", "data": data, "model": self.model_name, "usage": usage})

        return await self._serve(receive, "/v1/classify", texts, None, answer)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                             "owned_by": "fastserve", "task": self.engine.task,
                                             "dimensions": self.engine.dim, "max_length": self.engine.max_length}]}

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def ready(self) -> Response:
        h = self.engine.health()
        body = {"status": "ready" if h["healthy"] else "unavailable", **h}
        return Response(_dumps(body), status_code=200 if h["healthy"] else 503, media_type="application/json")

    async def metrics_text(self) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _dumps(obj: Any) -> bytes:
    """Compact JSON; numpy float32 arrays are written directly (float32's
    shortest round-trip form), about 30x faster than json.dumps of a list."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


# ---------------------------------------------------------------------- app


def create_app(
    engine: Engine,
    *,
    api_key: Optional[str] = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    max_inputs: int = DEFAULT_MAX_INPUTS,
    request_timeout: Optional[float] = None,
    model_name: Optional[str] = None,
) -> FastAPI:
    """The ASGI app serving `engine`. The caller keeps ownership of the engine.

    api_key: when set, /v1/* and the docs need `Authorization: Bearer <key>`
    (/health, /ready and /metrics stay open for probes and scrapers).
    max_payload_bytes, max_inputs: larger requests get 413.
    request_timeout: seconds from arrival; a request not served by then gets
    504 (its queued inputs never reach the model).
    model_name: the id reported in responses and /v1/models (default: the
    engine's model name).
    """
    if max_payload_bytes < 1 or max_inputs < 1:
        raise ValueError("max_payload_bytes and max_inputs must be positive")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError("request_timeout must be positive seconds or None")
    metrics = _Metrics(engine)
    api = _Api(engine, metrics, model_name=model_name or engine.model_name, max_inputs=max_inputs,
               request_timeout=request_timeout)
    app = _App(title="fastserve", version=_version(),
               description="OpenAI-compatible embeddings (and classification) served by fastserve.")
    app.state.engine = engine
    app.state.metrics = metrics

    if engine.task == "embed":
        @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERROR_RESPONSES,
                  summary="Create embeddings (OpenAI-compatible)")
        async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
            return (await api.embeddings(body, request.receive)).response()
    else:
        @app.post("/v1/classify", response_model=ClassifyResponse, responses=_ERROR_RESPONSES,
                  summary="Classify texts")
        async def classify(body: ClassifyRequest, request: Request) -> Response:
            return (await api.classify(body, request.receive)).response()
    app.get("/v1/models", summary="The served model")(api.models)
    app.get("/health", summary="Liveness: the process answers")(api.health)
    app.get("/ready", summary="Readiness: the engine is loaded and its worker alive",
            responses={503: {"description": "the engine is not serving"}})(api.ready)
    app.get("/metrics", summary="Prometheus metrics", response_class=Response)(api.metrics_text)

    @app.exception_handler(ApiError)
    async def _on_api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc, request.url.path).response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = ApiError(exc.status_code, str(exc.detail), code=kind, headers=dict(exc.headers or {}))
        return err.response()

    @app.exception_handler(Exception)
    async def _on_unhandled(request: Request, exc: Exception) -> Response:
        # Starlette's last resort (it re-raises after answering, and _Edge logs it).
        return _internal_error().response()

    app.edge = _Edge(functools.partial(FastAPI.__call__, app), metrics=metrics, api_key=api_key,
                     max_payload_bytes=max_payload_bytes, api=api if engine.task == "embed" else None)
    return app


class _App(FastAPI):
    """FastAPI with fastserve's edge (_Edge: metrics, API key, payload limit,
    the embeddings fast path) outside all of Starlette's middleware, so a
    request the fast path serves pays for none of it."""

    edge: "_Edge"

    async def __call__(self, scope, receive, send) -> None:
        await self.edge(scope, receive, send)


def _version() -> str:
    from . import __version__

    return __version__


class _Server(uvicorn.Server):
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
) -> None:
    """Serve `engine` over HTTP until SIGTERM/SIGINT. Shutdown is graceful:
    stop accepting, let in-flight requests finish (at most graceful_timeout
    seconds), then close the engine (unless close_engine=False)."""
    app = create_app(engine, api_key=api_key, max_payload_bytes=max_payload_bytes, max_inputs=max_inputs,
                     request_timeout=request_timeout, model_name=model_name)
    # Proxy headers (X-Forwarded-For) only matter for the client addresses of
    # the access log; without it uvicorn's proxy middleware is skipped.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            proxy_headers=access_log, timeout_graceful_shutdown=graceful_timeout, lifespan="off")
    try:
        _Server(config).run()
    finally:
        if close_engine:
            engine.close()


__all__ = ["ApiError", "create_app", "serve", "DEFAULT_MAX_INPUTS", "DEFAULT_MAX_PAYLOAD_BYTES"]
