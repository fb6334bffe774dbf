"""fastserve: low-latency serving of transformer encoders inside Python services."""

from . import _core, corpus
from .engine import Classification, Engine, InferenceError
from .models import ModelLoadError
from .errors import (
    EngineClosedError,
    FastServeError,
    InvalidInputError,
    QueueFullError,
    RequestTimeoutError,
)

__version__ = "0.1.0"

__all__ = [
    "Classification",
    "Engine",
    "InferenceError",
    "ModelLoadError",
    "EngineClosedError",
    "FastServeError",
    "InvalidInputError",
    "QueueFullError",
    "RequestTimeoutError",
    "__version__",
]
