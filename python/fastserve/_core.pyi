"""Type stubs for fastserve._core, the pybind11 extension (csrc/bindings/module.cpp)."""

from typing import Iterable, TypedDict

import numpy as np
from numpy.typing import ArrayLike, NDArray

# ----------------------------------------------------------------- errors

class FastServeError(Exception):
    """Base of fastserve's errors."""

class QueueFullError(FastServeError):
    """The engine's queue is at capacity (requests or tokens); retry later."""

class OverloadedError(QueueFullError):
    """The request was predicted to miss its deadline: the work queued ahead of it, at the measured throughput, takes too long. retry_after_s: seconds after which that backlog has drained enough (an HTTP server answers 429 with Retry-After)."""

    retry_after_s: float

class EngineClosedError(FastServeError, RuntimeError):
    """The engine was closed before the request could be served."""

# ------------------------------------------------------------ build/device

def bucket_floor(tokens: int) -> int:
    """The largest bucket of shapes.py's token ladder at or below tokens (tokens itself below 16)."""

def cuda_compiled() -> bool:
    """True when the extension was built with CUDA."""

def cuda_device_count() -> int:
    """Visible CUDA devices (0 without a driver or GPU, or without CUDA compiled in)."""

def cuda_runtime_version() -> str:
    """The CUDA runtime's version, e.g. '13.0'; the empty string without CUDA compiled in."""

# ------------------------------------------------------------------ clock

class ManualClock:
    """A clock that moves only when told to (tests, simulations)."""

    def __init__(self, start: float = 0.0) -> None: ...
    def now(self) -> float: ...
    def set(self, t: float) -> None: ...
    def advance(self, dt: float) -> None: ...

# ---------------------------------------------------------------- configs

class ControllerConfig:
    policy: str
    """One of "static", "aimd", "seed", "model" (validated by Controller/Scheduler)."""
    target_latency_s: float
    min_tokens: int
    max_tokens: int
    initial_tokens: int
    aimd_step_tokens: int
    aimd_backoff: float
    seed_lambda: float
    seed_smoothing: float
    max_step: float
    model_headroom: float
    model_load_margin: float
    fit_forgetting: float

    def __init__(
        self,
        *,
        policy: str = "model",
        target_latency_s: float = 0.05,
        min_tokens: int = 32,
        max_tokens: int = 16384,
        initial_tokens: int = 0,
        aimd_step_tokens: int = 64,
        aimd_backoff: float = 0.95,
        seed_lambda: float = 0.6,
        seed_smoothing: float = 0.01,
        max_step: float = 0.4,
        model_headroom: float = 0.98,
        model_load_margin: float = 1.25,
        fit_forgetting: float = 0.9,
    ) -> None:
        """Fields by keyword; an unknown keyword raises TypeError."""

    def validate(self) -> None:
        """Raise ValueError when a field is out of range."""

class SchedulerConfig:
    max_queue_requests: int
    max_queue_tokens: int
    max_batch_size: int
    max_request_tokens: int
    pad_token_id: int
    aging_s: float
    lookahead: int
    min_fill: float
    admission: bool
    """Refuse at submit, and shed before compute, requests predicted to miss their deadline."""
    attention_tokens: int
    """Packed cost counts attention: len * (1 + len / attention_tokens) per sequence (0: len)."""
    long_apart_tokens: int
    """Packed cost: requests longer than this are batched apart from shorter ones (0: off)."""
    extend_past_budget: bool
    """Packed cost: a short queue runs whole past the budget when a later batch would make a request late (off)."""
    token_buckets: bool
    """Batches run padded to a ladder of token counts: each is formed within its budget rounded down to one (off)."""
    balance_workers: bool
    """Several workers: each takes only its share of a queue shorter than their budgets together, so they end it together (on)."""
    preempt_layers: int
    """Points (the model's layers) at which a running batch may be paused for urgent requests (0: never)."""
    cost: str
    """Either 'padded' or 'packed'; setting any other value raises ValueError."""

    def __init__(
        self,
        *,
        max_queue_requests: int = 65536,
        max_queue_tokens: int = 16777216,
        max_batch_size: int = 256,
        max_request_tokens: int = 1048576,
        pad_token_id: int = 0,
        aging_s: float = 0.5,
        lookahead: int = 1024,
        min_fill: float = 0.8,
        cost: str = "padded",
        admission: bool = True,
        attention_tokens: int = 0,
        long_apart_tokens: int = 0,
        extend_past_budget: bool = False,
        token_buckets: bool = False,
        balance_workers: bool = True,
        preempt_layers: int = 0,
    ) -> None:
        """Fields by keyword; an unknown keyword raises TypeError."""

    def validate(self) -> None:
        """Raise ValueError when a field is out of range."""

# ------------------------------------------------------------- controller

class Controller:
    """A batch-size controller on its own (simulations, tests)."""

    def __init__(self, config: ControllerConfig) -> None: ...
    @property
    def policy(self) -> str: ...
    @property
    def budget(self) -> int: ...
    def observe(
        self,
        tokens: int,
        latency_s: float,
        budget: int = 0,
        batch_size: int = 1,
        now: float = 0.0,
        queue_depth: int = 0,
        arrival_tokens_per_s: float = 0.0,
        queued_tokens: float = 0.0,
    ) -> None:
        """Feed one finished batch; budget=0 means the controller's current budget."""

    def state(self) -> dict[str, float]: ...

# ------------------------------------------------------------------ batch

class Batch:
    """Requests assembled for one model call. Array properties are zero-copy
    views whose base keeps the batch alive."""

    @property
    def seq(self) -> int: ...
    @property
    def worker(self) -> int:
        """The worker (replica) whose controller sized this batch."""

    @property
    def size(self) -> int: ...
    def __len__(self) -> int: ...
    @property
    def ids(self) -> NDArray[np.uint64]:
        """Request ids [B] uint64."""

    @property
    def lengths(self) -> NDArray[np.int32]:
        """Request lengths [B] int32."""

    @property
    def arrivals(self) -> NDArray[np.float64]:
        """Arrival time of each request [B] float64, on the scheduler's clock."""

    @property
    def expired(self) -> list[int]:
        """Ids dropped (deadline passed) while this batch was assembled."""

    @property
    def shed(self) -> list[int]:
        """Ids dropped while this batch was assembled: predicted to finish after their deadline."""

    @property
    def abandoned(self) -> list[int]:
        """Ids dropped from this batch while it was paused (Scheduler.preempt): never completed."""

    @property
    def shed_retry_after_s(self) -> list[float]:
        """For each shed id, how late it was predicted to finish (seconds)."""

    @property
    def deadlines(self) -> NDArray[np.float64]:
        """Deadline of each request [B] float64 (inf: none), on the scheduler's clock."""

    @property
    def total_tokens(self) -> int: ...
    @property
    def padded_tokens(self) -> int: ...
    @property
    def max_seqlen(self) -> int: ...
    @property
    def padding_ratio(self) -> float: ...
    @property
    def budget(self) -> int: ...
    @property
    def assembled_at(self) -> float: ...
    @property
    def input_ids(self) -> NDArray[np.int64]:
        """Padded token ids [B, L] int64 (zero-copy)."""

    @property
    def attention_mask(self) -> NDArray[np.int64]:
        """Padded attention mask [B, L] int64 (zero-copy)."""

    @property
    def packed_input_ids(self) -> NDArray[np.int64]:
        """Packed token ids [T] int64 (zero-copy)."""

    @property
    def position_ids(self) -> NDArray[np.int64]:
        """Packed position ids [T] int64, restarting at 0 per sequence (zero-copy)."""

    @property
    def cu_seqlens(self) -> NDArray[np.int32]:
        """Cumulative sequence lengths [B + 1] int32 (zero-copy)."""

# -------------------------------------------------------------- scheduler

class _Summary(TypedDict):
    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    max: float

class _Stats(TypedDict):
    submitted: int
    admitted: int
    rejected: int
    refused: int
    shed: int
    preempted: int
    balanced: int
    completed: int
    failed: int
    expired: int
    cancelled: int
    closed_unserved: int
    batches: int
    failed_batches: int
    queue_depth: int
    queued_tokens: int
    latency_s: _Summary
    queue_s: _Summary
    batch_compute_s: _Summary
    batch_size: _Summary
    batch_tokens: _Summary
    real_tokens: int
    padded_tokens: int
    padding_ratio: float
    throughput_rps: float
    throughput_tokens_per_s: float
    controller: dict[str, str | float]
    """Keys 'policy' (str), 'budget_tokens' (int) and the policy's own state (float)."""
    controllers: list[dict[str, str | float]]
    """Every worker's controller (worker 0 first), with the same keys as `controller`."""

class Scheduler:
    """Thread-safe request queue with adaptive batch assembly."""

    def __init__(
        self,
        config: SchedulerConfig = ...,
        controller: ControllerConfig = ...,
        clock: ManualClock | None = None,
        workers: int = 1,
    ) -> None:
        """Raise ValueError for an invalid configuration; clock=None: the steady clock.
        workers: consumers with a controller each (next_batch's `worker`)."""

    def submit(
        self,
        tokens: ArrayLike,
        priority: int = 0,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> int:
        """Enqueue a 1-D sequence of token ids in [0, 2**31); return its id (never 0).

        Raises ValueError (bad tokens, both timeout and deadline, negative
        timeout), QueueFullError, OverloadedError (predicted to miss its
        deadline), EngineClosedError.
        """

    def submit_many(
        self,
        requests: Iterable[ArrayLike],
        priority: int = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        whole: bool = False,
        waiting: bool = False,
    ) -> list[int]:
        """Enqueue several requests under one lock, in order, as many as fit;
        return the accepted prefix's ids. Every request is validated first (a
        bad one raises ValueError naming its index and nothing is queued).
        Raises QueueFullError when not even the first fits, EngineClosedError.
        whole=True: all of them or none (QueueFullError when the queue cannot
        hold them all now, OverloadedError when the last is predicted late,
        ValueError when they exceed the queue's bounds). waiting=True: an
        empty list where not even the first fits, not counted as a refusal
        (the caller has part of its list queued and waits for room).
        """

    def cancel(self, id: int) -> bool: ...
    def next_batch(self, timeout: float, worker: int = 0) -> Batch | None:
        """Wait up to timeout seconds (real time, GIL released) for a batch,
        sized by worker `worker`'s controller (ValueError out of range)."""

    def preempt(self, running: Batch, done: float) -> Batch | None:
        """Between two layers of the running batch (done: the fraction of its layers run):
        a batch of urgent requests to run before resuming it, or None. Its `shed` lists
        the running batch's rows dropped (lower priority the pause makes late), also
        added to running.abandoned."""

    def start(self, batch: Batch, cancelled: list[int] = ...) -> list[int]:
        """Call just before running the batch: removes and returns the ids whose deadline has passed,
        and removes `cancelled` (ids cancelled since assembly; counted as cancelled)."""

    def predict_completion(self, tokens: int, priority: int = 0) -> float:
        """Predicted completion time (scheduler clock) of a request submitted now; inf before any batch is measured or with admission off."""

    def complete(self, batch: Batch, compute_seconds: float, extra_tokens: int = 0) -> None:
        """Record a computed batch; extra_tokens: tokens computed beyond its own (ghost
        sequences), counted in padded_tokens."""
    def fail(self, batch: Batch) -> None: ...
    def close(self) -> list[int]:
        """Refuse new work, wake waiting workers, return the ids still queued."""

    @property
    def closed(self) -> bool: ...
    @property
    def depth(self) -> int: ...
    @property
    def queued_tokens(self) -> int: ...
    @property
    def budget(self) -> int:
        """Worker 0's token budget."""

    def budget_of(self, worker: int) -> int:
        """The token budget of worker `worker`'s controller."""

    @property
    def workers(self) -> int: ...
    def retire(self, worker: int) -> None:
        """Mark a worker dead: admission and the queue's split count only the live ones."""

    @property
    def live_workers(self) -> int: ...
    def now(self) -> float: ...
    def stats(self) -> _Stats: ...
