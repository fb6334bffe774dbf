"""fastserve: low-latency serving of transformer encoders inside Python services."""

from . import _core
from .errors import (
    EngineClosedError,
    FastServeError,
    InvalidInputError,
    QueueFullError,
    RequestTimeoutError,
)

__version__ = "0.1.0"

__all__ = [
    "EngineClosedError",
    "FastServeError",
    "InvalidInputError",
    "QueueFullError",
    "RequestTimeoutError",
    "__version__",
]
