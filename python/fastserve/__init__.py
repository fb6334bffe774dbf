"""fastserve: low-latency serving of transformer encoders inside Python services."""

from . import _core, corpus
from .admission import wait_all
from .engine import Classification, Engine
from .inputs import InputInfo
from .tasks import Entity, RerankResult
from .errors import (
    EngineClosedError,
    FastServeError,
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    OverloadedError,
    QueueFullError,
    ReplicaFailedError,
    RequestTimeoutError,
    StageError,
    UnsupportedModelError,
    WorkerThreadError,
)

__version__ = "0.1.0"

__all__ = [
    "Classification",
    "Engine",
    "Entity",
    "InputInfo",
    "RerankResult",
    "wait_all",
    "InferenceError",
    "ModelLoadError",
    "EngineClosedError",
    "FastServeError",
    "InvalidInputError",
    "OverloadedError",
    "QueueFullError",
    "ReplicaFailedError",
    "RequestTimeoutError",
    "StageError",
    "UnsupportedModelError",
    "WorkerThreadError",
    "__version__",
]
