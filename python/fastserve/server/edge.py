"""The ASGI layer every HTTP request passes first, outside all of Starlette's
middleware: metrics, the API key, the payload limit, and the embeddings fast
path that answers a valid POST /v1/embeddings without Starlette or FastAPI."""

import asyncio
import hmac
import math
import re
import time
from typing import TYPE_CHECKING, NamedTuple, Optional

from ..admission import PRIORITY_RANGE
from .errors import CLIENT_CLOSED, ApiError, internal_error, log, too_large, unavailable
from .metrics import Metrics
from .schemas import EmbeddingRequest

if TYPE_CHECKING:
    from .routes import Api

# Paths a probe or scraper reaches without the API key.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
# The route label of the metrics: a fixed set, whatever paths clients send.
ROUTES = frozenset({"/v1/embeddings", "/v1/classify", "/v1/rerank", "/v2/rerank", "/rerank", "/v1/extract",
                    "/v1/models", "/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                    "/redoc"})
MODEL_ROUTE = "/v1/models/{id}"
# A scope key set by a host under which the request's task is cancelled only
# when its client is gone (Ray Serve: fastserve.ray.BodyGuard): a cancelled
# request is then the client's 499, not the server's shutdown.
CANCEL_IS_CLIENT = "fastserve.cancel_is_client"
# The request headers that set its inputs' priority (the engine's `priority`:
# higher first) and its deadline (seconds), and the scope key the edge
# stores their checked values under (an Urgency).
PRIORITY_HEADER = b"x-fastserve-priority"
TIMEOUT_HEADER = b"x-fastserve-timeout"
URGENCY = "fastserve.urgency"


def _route_label(path: str) -> str:
    """The metrics' route label: a bounded set, whatever paths clients send."""
    if path in ROUTES:
        return path
    return MODEL_ROUTE if path.startswith("/v1/models/") else "other"


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def count_answer(metrics, scope, status: int, t0: float) -> None:
    """One answered request in the metrics (the edge's, and what answers
    before it: Ray's BodyGuard): its latency since t0 and its count by route,
    method and status."""
    route = _route_label(route_path(scope))
    metrics.latency_for(route).observe(time.perf_counter() - t0)
    method = scope.get("method", "")
    metrics.requests_for(route, method if method in _METHODS else "other", str(status)).inc()


def route_path(scope) -> str:
    """The path the app routes on: scope["path"] less the root path an ASGI
    server or proxy mounts it under (uvicorn --root-path, a Ray Serve route
    prefix), as Starlette takes it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


class StatusRecorder:
    """An ASGI send that records the status of the answer it sends (None
    until the answer starts)."""

    __slots__ = ("send", "status")

    def __init__(self, send) -> None:
        self.send = send
        self.status: Optional[int] = None

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class Edge:
    """The outer layer of every HTTP request: metrics, the API key, and the
    payload limit (the body is read here, at most max_payload_bytes of it,
    before any parsing). Anything a route lets escape becomes a generic 500:
    no stack trace reaches a client; a request cancelled (at shutdown) before
    its answer started gets 503, or, under a host that cancels a request
    when its client leaves (CANCEL_IS_CLIENT), is recorded as the client's
    499."""

    def __init__(self, app, *, metrics: Metrics, api_key: Optional[str], max_payload_bytes: int,
                 api: Optional["Api"] = None, client_timeout_s: Optional[float] = None,
                 max_priority: int = 0) -> None:
        self.app = app
        self.api = api
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_payload_bytes = max_payload_bytes
        # Seconds a request's body may go without a byte arriving (None: no limit).
        self.client_timeout_s = client_timeout_s
        self.max_priority = max_priority  # the highest X-Fastserve-Priority a client may ask for

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        send_recording = StatusRecorder(send)
        t0 = time.perf_counter()
        self.metrics.in_progress.inc()
        try:
            error = self._check_key(scope) if path not in OPEN_PATHS else None
            if error is None:
                error = _encoded(scope)
            if error is None and scope.get("method") == "POST" and path not in OPEN_PATHS:
                # (only work is queued: a probe or scrape behind a proxy that
                # sets the headers on all traffic must still get its answer)
                urgency, error = _urgency(scope, self.max_priority)
                scope = {**scope, URGENCY: urgency}
            body = b""
            if error is None:
                body, error = await self._read_body(scope, receive)
            if body is None:  # the client left while sending its body
                send_recording.status = CLIENT_CLOSED
            elif error is not None:
                await error.reply().send(send_recording)
            elif not await self._fast_embeddings(scope, path, body, receive, send_recording):
                if scope.get("method") == "POST" and (path.startswith("/v1/") or path in ("/rerank", "/v2/rerank")):
                    scope = _as_json(scope)
                await self.app(scope, _replaying(body, receive), send_recording)
        except asyncio.CancelledError:
            # Cut off at shutdown (uvicorn's graceful timeout): the typed 503
            # rather than uvicorn's plain-text 500, and the request ends there
            # (re-raised, uvicorn logged a traceback for each). An answer
            # already started is cut: that one uvicorn reports. Under Ray
            # Serve the client left: nobody reads an answer (499, as the
            # route records a client gone), and the task stays cancelled.
            if scope.get(CANCEL_IS_CLIENT) and send_recording.status is None:
                send_recording.status = CLIENT_CLOSED
            if send_recording.status is not None:
                raise
            await unavailable("the server shut down before this request was served").reply().send(send_recording)
        except Exception as exc:
            log.error("unhandled error on %s %s", scope.get("method"), path, exc_info=exc)
            if send_recording.status is None:
                await internal_error().reply().send(send_recording)
        finally:
            self.metrics.in_progress.dec()
            count_answer(self.metrics, scope, send_recording.status or 500, t0)

    async def _fast_embeddings(self, scope, path: str, body: bytes, receive, send) -> bool:
        """POST /v1/embeddings with a valid body, straight to the route:
        pydantic's (compiled) JSON validation, then the two ASGI messages of
        the answer, without Starlette's middleware, FastAPI's routing and
        dependency machinery, or Request and Response objects. Anything else,
        including every invalid body, is left to the app (False), so errors
        and the OpenAPI document are FastAPI's. `receive` is the server's
        own (the body has been read): the route watches it for the client
        leaving."""
        if self.api is None or path != "/v1/embeddings" or scope.get("method") != "POST":
            return False
        try:
            request = EmbeddingRequest.model_validate_json(body)
        except ValueError:  # pydantic's ValidationError, or a body that is not JSON
            return False
        try:
            reply = await self.api.embeddings(request, receive, scope.get(URGENCY, Urgency()))
        except ApiError as exc:  # what the app's exception handler would answer
            reply = exc.reply()
        await reply.send(send)
        return True

    def _check_key(self, scope) -> Optional[ApiError]:
        if self.api_key is None:
            return None
        sent = [value for name, value in scope.get("headers", ()) if name == b"authorization"]
        parts = sent[0].split(None, 1) if len(sent) == 1 else []  # (the scheme, then spaces or tabs)
        if len(parts) == 2 and parts[0].lower() == b"bearer":
            if hmac.compare_digest(parts[1].strip(), self.api_key):
                return None
            message = "invalid API key"
        elif not sent:
            message = "missing API key (send 'Authorization: Bearer <key>')"
        elif len(sent) > 1:
            message = f"{len(sent)} Authorization headers: send one, 'Authorization: Bearer <key>'"
        else:
            message = "the Authorization header must be 'Bearer <key>'"
        # Answered before the body is read: the connection closes after it,
        # or a client without the key could go on streaming into it.
        return ApiError(401, message, code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer", "Connection": "close"})

    async def _read_body(self, scope, receive):
        """(body, error): the whole body, whatever the method (a GET's too:
        left unread, a client could stream into the connection for as long
        as it liked), None if the client disconnected while sending it; an
        ApiError if it is too large (413) or stalls (408)."""
        limit = self.max_payload_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return b"", too_large(int(value), limit)
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.client_timeout_s)
            except asyncio.TimeoutError:
                return b"", ApiError(408, f"the request's body stalled: no byte for {self.client_timeout_s:g} s",
                                     type="timeout_error", code="request_timeout", headers={"Connection": "close"})
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_large(size, limit, at_least=True)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), None


def _encoded(scope) -> Optional[ApiError]:
    """415 for a body sent compressed (Content-Encoding gzip, br, ...): it
    was read as JSON and refused as 'not valid JSON'. Answered before the
    body is read, so the connection closes after it."""
    for name, value in scope.get("headers", ()):
        if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            coding = value.decode("latin-1").strip()
            return ApiError(415, f"request bodies are read uncompressed: Content-Encoding '{coding}' is not "
                                 "supported; send the JSON as it is", code="unsupported_content_encoding",
                            headers={"Connection": "close"})
    return None


class Urgency(NamedTuple):
    """What a request's headers ask of the engine: its inputs' priority
    (X-Fastserve-Priority: higher runs first) and a deadline of its own
    (X-Fastserve-Timeout, seconds: None, the server's request timeout; a
    longer one than the server's is cut to it)."""

    priority: int = 0
    timeout: Optional[float] = None


# What the two headers may hold: an integer (at most 12 characters), a plain
# decimal number of seconds (at most 32; no sign but +, no inf, nan or "_").
_PRIORITY_TEXT = re.compile(r"[+-]?[0-9]{1,11}|[0-9]{12}")
_SECONDS_TEXT = re.compile(r"\+?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _header_text(values: list, name: str, pattern: "re.Pattern[str]", longest: int,
                 ask: str) -> tuple[Optional[str], Optional[str]]:
    """(text, None) for a header sent once whose value matches `pattern`, or
    (None, what is wrong)."""
    if len(values) > 1:
        return None, f"{len(values)} {name} headers: send one"
    text = values[0].decode("latin-1").strip()
    if len(text) > longest or not pattern.fullmatch(text):
        return None, f"{name} {text[:40]!r}: {ask}"
    return text, None


def _urgency(scope, highest: int) -> tuple[Urgency, Optional[ApiError]]:
    """(urgency, error): the X-Fastserve-Priority and X-Fastserve-Timeout
    headers, or a 400 naming the one that is not a single integer within
    [PRIORITY_RANGE's low end, `highest`] (the server's --max-priority: by
    default a client may lower its requests' priority, not raise it), or not
    a single positive finite number of seconds. Answered before the body is
    read, so the connection closes after it. One pass over the headers."""
    sent: dict[bytes, list] = {}
    for key, value in scope.get("headers", ()):
        if key == PRIORITY_HEADER or key == TIMEOUT_HEADER:
            sent.setdefault(key, []).append(value)
    if not sent:
        return Urgency(), None

    def refused(param: str, code: str, message: str) -> tuple[Urgency, ApiError]:
        return Urgency(), ApiError(400, message, param=param, code=code, headers={"Connection": "close"})

    priority, timeout = 0, None
    if PRIORITY_HEADER in sent:
        name = "X-Fastserve-Priority"
        text, wrong = _header_text(sent[PRIORITY_HEADER], name, _PRIORITY_TEXT, 12,
                                   "send one integer (higher runs first; default 0)")
        if wrong:
            return refused(name, "invalid_priority", wrong)
        priority, lo = int(text), PRIORITY_RANGE[0]
        if not lo <= priority <= highest:
            return refused(name, "priority_not_allowed", f"{name} {priority} is outside [{lo}, {highest}]: this "
                                                         f"server lets a client ask for at most {highest} (--max-priority)")
    if TIMEOUT_HEADER in sent:
        name = "X-Fastserve-Timeout"
        ask = "send one positive number of seconds"
        text, wrong = _header_text(sent[TIMEOUT_HEADER], name, _SECONDS_TEXT, 32, ask)
        timeout = None if wrong else float(text)
        if timeout is None or not 0 < timeout < math.inf:
            return refused(name, "invalid_timeout", wrong or f"{name} {text!r}: {ask}")
    return Urgency(priority, timeout), None


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
