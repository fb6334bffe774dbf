"""fastserve's exceptions, in one place (those the C++ core raises are
re-exported from it). Each subclasses FastServeError and, where one fits, the
builtin a caller would naturally catch. OverloadedError (a QueueFullError)
carries retry_after_s: the request was predicted to miss its deadline."""

from ._core import EngineClosedError, FastServeError, OverloadedError, QueueFullError


class RequestTimeoutError(FastServeError, TimeoutError):
    """The request's deadline passed before it could be served."""


class InvalidInputError(FastServeError, ValueError):
    """The input cannot be served as given (wrong type, empty, too long, ...)."""


class InferenceError(FastServeError, RuntimeError):
    """The model raised while computing the batch holding this request; the
    model's exception is chained as __cause__."""


class ReplicaFailedError(InferenceError):
    """The replica (worker) that was running this request's batch died; the
    engine's other replicas keep serving. Not retried by the engine: the
    request may be submitted again."""


class WorkerThreadError(FastServeError, RuntimeError):
    """A blocking call (embed, classify, score, rerank, extract, a list that
    would wait for room, close(drain=True)) made on one of the engine's own
    worker threads, from a future's done callback or a model hook: it would
    wait for the thread it runs on. submit() and the async forms do not block."""


class StageError(FastServeError, RuntimeError):
    """A pipeline stage raised (the __cause__ of the InferenceError its
    requests get); the stage's exception is this one's __cause__."""

    def __init__(self, stage: int, device: object, error: BaseException) -> None:
        super().__init__(f"pipeline stage {stage} ({device}) raised: {error!r}")
        self.stage = stage
        self.device = device


class ModelLoadError(FastServeError, OSError):
    """The model or its tokenizer could not be loaded."""


class UnsupportedModelError(ModelLoadError):
    """The model's sentence-transformers module stack has a module the engine
    cannot reproduce exactly; `module` names it (Pooling, Dense, ...)."""

    def __init__(self, module: str, reason: str) -> None:
        super().__init__(f"sentence-transformers module {module}: {reason}")
        self.module = module


__all__ = [
    "EngineClosedError",
    "FastServeError",
    "InferenceError",
    "InvalidInputError",
    "ModelLoadError",
    "OverloadedError",
    "QueueFullError",
    "ReplicaFailedError",
    "RequestTimeoutError",
    "StageError",
    "UnsupportedModelError",
    "WorkerThreadError",
]
