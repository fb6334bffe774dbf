"""fastserve: low-latency serving of transformer encoders inside Python services."""

from . import _core, corpus
from .admission import wait_all
from .engine import Classification, Engine
from .errors import (
    EngineClosedError,
    FastServeError,
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    OverloadedError,
    QueueFullError,
    RequestTimeoutError,
)

__version__ = "0.1.0"

__all__ = [
    "Classification",
    "Engine",
    "wait_all",
    "InferenceError",
    "ModelLoadError",
    "EngineClosedError",
    "FastServeError",
    "InvalidInputError",
    "OverloadedError",
    "QueueFullError",
    "RequestTimeoutError",
    "__version__",
]
