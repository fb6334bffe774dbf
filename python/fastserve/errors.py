"""fastserve's exceptions, in one place (those the C++ core raises are
re-exported from it). Each subclasses FastServeError and, where one fits, the
builtin a caller would naturally catch. OverloadedError (a QueueFullError)
carries retry_after_s: the request was predicted to miss its deadline.

Each round-trips through pickle (a process pool, multiprocessing, Ray hand
exceptions across processes) with its message and attributes: those whose
constructor takes other arguments than the message (StageError,
UnsupportedModelError) would otherwise fail to unpickle with a TypeError."""

from typing import Any

from ._core import EngineClosedError, FastServeError, OverloadedError, QueueFullError


def _builtin(cls: type) -> type:
    """The first builtin exception class among cls's bases (RuntimeError, OSError, ...)."""
    return next(c for c in cls.__mro__ if c.__module__ == "builtins")


def _rebuilt(cls: type, args: tuple) -> BaseException:
    """An exception of `cls` with these args, its own __init__ not called
    (its attributes come back from the pickled __dict__): the builtin base's
    __init__ takes the args as they were (OSError's errno, strerror, ...)."""
    e = cls.__new__(cls, *args)
    _builtin(cls).__init__(e, *args)
    return e


def _reduce(self: BaseException) -> tuple[Any, ...]:
    """__reduce__ of the exceptions defined here: the builtin base's (the
    class, its args, the __dict__ holding the attributes), rebuilt without
    calling the class's own __init__."""
    parts = _builtin(type(self)).__reduce__(self)
    return (_rebuilt, (type(self), tuple(parts[1]))) + tuple(parts[2:])


class RequestTimeoutError(FastServeError, TimeoutError):
    """The request's deadline passed before it could be served."""

    __reduce__ = _reduce


class InvalidInputError(FastServeError, ValueError):
    """The input cannot be served as given (wrong type, empty, too long, ...)."""

    __reduce__ = _reduce


class InferenceError(FastServeError, RuntimeError):
    """The model raised while computing the batch holding this request; the
    model's exception is chained as __cause__."""

    __reduce__ = _reduce


class ReplicaFailedError(InferenceError):
    """The replica (worker) that was running this request's batch died; the
    engine's other replicas keep serving. Not retried by the engine: the
    request may be submitted again."""


class WorkerThreadError(FastServeError, RuntimeError):
    """A blocking call (embed, classify, score, rerank, extract, a list that
    would wait for room, close(drain=True)) made on a worker thread of any
    fastserve engine, from a future's done callback or a model hook, or an
    async form (aembed, ascore, asubmit_many, aclose, ...) run to completion
    there (asyncio.run): it would wait for the thread it runs on, or, on
    another engine's, for a worker that may be waiting for this one. submit()
    does not block; a coroutine made there may be run on an event loop in
    another thread (asyncio.run_coroutine_threadsafe)."""

    __reduce__ = _reduce


class StageError(FastServeError, RuntimeError):
    """A pipeline stage raised (the __cause__ of the InferenceError its
    requests get); the stage's exception is this one's __cause__."""

    __reduce__ = _reduce

    def __init__(self, stage: int, device: object, error: BaseException) -> None:
        super().__init__(f"pipeline stage {stage} ({device}) raised: {error!r}")
        self.stage = stage
        self.device = device


class ModelLoadError(FastServeError, OSError):
    """The model or its tokenizer could not be loaded."""

    __reduce__ = _reduce


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
