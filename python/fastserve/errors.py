"""fastserve's exceptions. Each subclasses FastServeError and, where one fits,
the builtin a caller would naturally catch."""

from ._core import EngineClosedError, FastServeError, QueueFullError


class RequestTimeoutError(FastServeError, TimeoutError):
    """The request's deadline passed before it could be served."""


class InvalidInputError(FastServeError, ValueError):
    """The input cannot be served as given (wrong type, empty, too long, ...)."""


__all__ = [
    "EngineClosedError",
    "FastServeError",
    "InvalidInputError",
    "QueueFullError",
    "RequestTimeoutError",
]
