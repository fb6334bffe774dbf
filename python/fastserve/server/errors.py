"""Errors answered in OpenAI's shape, {"error": {message, type, param,
code}}, and which HTTP answer each of fastserve's exceptions gets. No stack
trace or internal detail reaches a client: anything unexpected is logged and
answered with a generic 500."""

import logging
from typing import Optional

from fastapi.exceptions import RequestValidationError
from starlette.responses import Response

import math

from ..errors import EngineClosedError, InferenceError, InvalidInputError, OverloadedError, QueueFullError
from ..errors import RequestTimeoutError
from .replies import Reply, dumps
from .schemas import UnknownField

log = logging.getLogger("fastserve.server")

RETRY_AFTER_S = 1  # the Retry-After of a 429 (queue full) and of a 503
CLIENT_CLOSED = 499  # nginx's status for "client closed the request": recorded in metrics, never sent


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

    def reply(self) -> Reply:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return Reply(self.status, dumps(body), self.headers)

    def response(self) -> Response:
        return self.reply().response()


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def api_error(exc: BaseException) -> ApiError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, OverloadedError):
        # Retry-After is whole seconds: the predicted backlog's drain, rounded up.
        after = getattr(exc, "retry_after_s", RETRY_AFTER_S)
        retry = max(1, math.ceil(after)) if math.isfinite(after) else RETRY_AFTER_S  # (the core bounds it)
        return ApiError(429, "the server is overloaded: the request would not be served before its deadline; "
                        "retry later", type="rate_limit_error", code="overloaded",
                        headers={"Retry-After": str(retry)})
    if isinstance(exc, QueueFullError):
        return ApiError(429, "the server is at capacity (queue full); retry later", type="rate_limit_error",
                        code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, RequestTimeoutError):
        return ApiError(504, "the request's deadline passed before it could be served", type="timeout_error",
                        code="request_timeout")
    if isinstance(exc, EngineClosedError):
        return unavailable("the engine is not serving (closed or unhealthy)")
    if isinstance(exc, InvalidInputError):
        return ApiError(400, str(exc), param="input", code="invalid_input")
    if isinstance(exc, InferenceError):
        log.error("inference failed: %r", exc.__cause__ or exc)
    else:
        log.error("unhandled error while serving a request", exc_info=exc)
    return internal_error()


def internal_error() -> ApiError:
    return ApiError(500, "internal server error", type="server_error", code="internal_error")


def unavailable(message: str) -> ApiError:
    """503: the engine is not serving, or the server cut the request off at
    shutdown. Retry-After 1: another replica, or this server restarted, may
    serve it (clients without it retried at once or not at all)."""
    return ApiError(503, message, type="service_unavailable", code="engine_unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def invalid_json() -> ApiError:
    return ApiError(400, "the request body is not valid JSON", code="invalid_json")


def validation_error(exc: RequestValidationError, path: str) -> ApiError:
    """A 400 naming what FastAPI's validation of the body found wrong."""
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return invalid_json()
    for err in errors:
        unknown = (err.get("ctx") or {}).get("error")
        if isinstance(unknown, UnknownField):
            return ApiError(400, str(unknown), param=unknown.field, code="unknown_field")
    empty = [err for err in errors if err.get("type") == "too_short"]
    if empty:  # an empty list of inputs (the schema's min_length), whichever union branch saw it
        loc = [str(x) for x in empty[0].get("loc", ()) if x != "body" and not str(x).startswith(("list[", "str"))]
        if loc and loc[0] in ("input", "documents", "texts"):
            what = loc[0] + "".join(f"[{x}]" for x in loc[1:])  # input[1]: an empty token-id list in a list
            return ApiError(400, f"{what} must not be empty", param=loc[0], code="invalid_input")
    if errors and all(tuple(err.get("loc", ()))[:2] == ("body", "input") for err in errors):
        # One message for the union's four branches rather than one per branch.
        what = ("a string or a list of strings" if path in ("/v1/classify", "/v1/extract") else
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


def too_large(size: int, limit: int, at_least: bool = False) -> ApiError:
    # The rest of the body is never read: the connection closes after the
    # answer, or a client could go on streaming into it.
    return ApiError(413, f"request body is {'over ' if at_least else ''}{size} bytes; the limit is {limit}",
                    code="payload_too_large", headers={"Connection": "close"})
