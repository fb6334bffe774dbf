"""Several workers in one engine: data-parallel replicas on one or more
devices, or the stages of a pipeline (python/fastserve/pipeline.py).

The engine keeps one scheduler and one queue. Each replica has a worker
thread that pulls its batches from that queue (`next_batch(worker=k)`, so
a batch goes to whichever worker is free), its own controller in the
scheduler (replicas on different devices cost differently), its own runner
and, on a CPU, its own share of the cores. Replicas on the same device share
the model's weights (read only under inference mode): a second copy would
only cost memory (benchmarks/README.md, "Replicas on one CPU")."""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import torch

from .models import parse_device, resolve_device
from .process import usable_cores

PARALLEL = ("data", "pipeline")


# The most workers (data-parallel replicas) one engine's scheduler takes.
MAX_WORKERS = 4096


def check_workers(device: Any, devices: Any, replicas: Any, parallel: Any) -> None:
    """worker_devices' checks that need none of this machine's devices
    (Engine.check_options makes them on a driver that may have other
    devices than the replicas): ValueError naming the first bad option."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1):
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    if replicas is not None and replicas > MAX_WORKERS:
        raise ValueError(f"replicas must be at most {MAX_WORKERS} (the scheduler's workers), got {replicas}")
    if device != "auto":
        parse_device(device)
    listed = None
    if devices is not None:
        if device != "auto":
            raise ValueError("give either device= or devices=, not both")
        if isinstance(devices, str):
            if devices != "all":
                raise ValueError(f"devices must be 'all' or a list of devices, got {devices!r}")
        else:
            if not isinstance(devices, Sequence) or not devices:
                raise ValueError(f"devices must be 'all' or a non-empty list of devices, got {devices!r}")
            for d in devices:
                if not isinstance(d, (str, torch.device)) or str(d) == "auto":
                    raise ValueError(f"devices must name each device ('cpu', 'cuda:0', ...), got {d!r}")
            listed = [parse_device(str(d)) for d in devices]
            if len({d.type for d in listed}) > 1 and parallel == "data":
                raise ValueError(f"data-parallel replicas must share one device type, got {[str(d) for d in listed]}")
    if parallel == "pipeline":
        if replicas not in (None, 1):
            raise ValueError("parallel='pipeline' runs one pipeline (replicas must be 1)")
        if devices is None or (listed is not None and len(listed) < 2):
            raise ValueError("parallel='pipeline' needs at least two devices (one per stage)")


def worker_devices(device: str, devices: Any, replicas: int | None, parallel: str) -> list[torch.device]:
    """The device of each worker (parallel="data") or of each stage
    (parallel="pipeline"), from Engine's device / devices / replicas.

    devices: None (the one `device`), "all" (every visible GPU) or a list;
    replicas: workers per device (data parallel only; default 1)."""
    check_workers(device, devices, replicas, parallel)
    if devices is None:
        listed = [resolve_device(device)]
    elif isinstance(devices, str):  # "all"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError("devices='all' found no visible GPU (use device='cpu' and replicas=N on a CPU)")
        listed = [torch.device("cuda", i) for i in range(count)]
    else:
        listed = [_indexed(resolve_device(str(d))) for d in devices]
    if parallel == "pipeline":
        if len(listed) < 2:
            raise ValueError("parallel='pipeline' needs at least two devices (one per stage)")
        return listed
    if len(listed) * (replicas or 1) > MAX_WORKERS:
        raise ValueError(f"replicas x devices must be at most {MAX_WORKERS} workers, got {replicas or 1} x "
                         f"{len(listed)}")
    return [d for d in listed for _ in range(replicas or 1)]


def default_replicas(device: str, devices: Any, parallel: str, torch_threads: int | None) -> int | None:
    """Engine(replicas=None): on a CPU of two or more usable cores, when the
    engine chooses the threads (torch_threads=None), two replicas, each on
    half the cores; else one. Measured in benchmarks/README.md, "Replicas on
    one CPU" and "Overload": two replicas of one thread keep far more
    goodput within the SLO than one replica of two threads from about 60%
    of capacity on, and at most a few req/s less below it."""
    if devices is not None or parallel != "data" or torch_threads is not None or usable_cores() < 2:
        return None
    return 2 if resolve_device(device).type == "cpu" else None


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:<current> and cpu:N -> cpu, so two names of one device
    compare equal (the replicas on it share the weights)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return torch.device("cpu")
    return device


def threads_per_worker(requested: int | None, devices: Sequence[torch.device]) -> int | None:
    """torch's intra-op threads each CPU worker sets in its own thread: the
    engine's torch_threads when given, else an equal share of the usable
    cores (at least one) among the CPU workers; None leaves torch's count
    (torch_threads=0, and GPU workers)."""
    cpu_workers = sum(1 for d in devices if d.type == "cpu")
    if requested == 0 or cpu_workers == 0:
        return None
    if requested is not None:
        return requested
    return max(1, usable_cores() // cpu_workers)


# Tokens per torch thread of a batch on a CPU worker for a model of hidden
# width 384 (all-MiniLM-L6-v2); a wider model's tokens carry more work per
# layer (hidden^2), so it takes fewer: TOKENS_PER_THREAD * (384 / hidden)^2,
# 40 for BERT-base. Below about 1.5 times that, a second thread made a batch
# slower, not faster: waking a thread team at every parallel op cost more
# than the op's share of work (benchmarks/README.md, "Threads per batch").
TOKENS_PER_THREAD = 160
_REFERENCE_HIDDEN = 384


def tokens_per_thread(hidden: int | None, emulated: bool) -> int:
    """The tokens of work a CPU batch needs per torch thread (Replica.
    threads_for) for a model of `hidden` width; 0 where every batch takes
    the worker's whole count: products in an emulated half precision (each
    token's work is several times float32's, and two threads won at every
    batch size measured) and a model whose width is unknown.
    FASTSERVE_TOKENS_PER_THREAD overrides it (0: the whole count always)."""
    forced = os.environ.get("FASTSERVE_TOKENS_PER_THREAD", "")
    if forced:
        if not forced.isdigit():
            raise ValueError(f"FASTSERVE_TOKENS_PER_THREAD must be a non-negative int, got {forced!r}")
        return int(forced)
    if emulated or not hidden:
        return 0
    return max(1, round(TOKENS_PER_THREAD * (_REFERENCE_HIDDEN / hidden) ** 2))


class Replica:
    """One worker: its device, its runner and what it has done."""

    def __init__(self, index: int, device: torch.device, runner: Any, threads: int | None,
                 sdpa_backends: Callable[[], Any], tokens_per_thread: int = 0) -> None:
        self.index = index
        self.device = device
        self.runner = runner
        self.threads = threads if device.type == "cpu" else None
        self.tokens_per_thread = tokens_per_thread
        # Batches run at each thread count (threads_for).
        self.batches_by_threads: dict[int, int] = {}
        self.sdpa_backends = sdpa_backends
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self.batches = 0
        self.requests = 0
        self.failed_batches = 0
        self.busy_s = 0.0
        # Engine(warmup=True): set once the worker's warm-up batch is done.
        self.warm = threading.Event()
        self.warmup_s: float | None = None
        self.warmup_error: BaseException | None = None

    def enter(self) -> None:
        """Run once in the worker's own thread: torch's intra-op thread count
        is per thread under its OpenMP backend (measured in
        benchmarks/python/replicas.py), so each worker sets its share."""
        if self.threads is not None:
            # torch initialises a thread's count lazily, at its first
            # parallel op, from the process-wide value the last
            # set_num_threads left (another worker's): initialise it first.
            torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def threads_for(self, tokens: int) -> int | None:
        """The torch threads a batch of `tokens` tokens (padded ones
        included) runs on: one per tokens_per_thread tokens (rounded to the
        nearest: a second thread from 1.5 times tokens_per_thread), at least
        one, at most the worker's count; the worker's count where
        tokens_per_thread is 0; None where the engine leaves torch's count
        alone."""
        if self.threads is None:
            return None
        if not self.tokens_per_thread:
            return self.threads
        return max(1, min(self.threads, (tokens + self.tokens_per_thread // 2) // self.tokens_per_thread))

    @contextlib.contextmanager
    def batch_threads(self, k: int | None) -> Iterator[None]:
        """In the worker's thread, around one batch: torch's thread count
        for it (k, from threads_for; None leaves it), the count before
        restored after (an urgent batch runs inside a paused one).
        set_num_threads is per thread (enter), so other workers keep theirs."""
        if k is None:
            yield
            return
        # Read, not remembered: an Engine built in this thread (from a hook
        # or a done callback) sets the thread's count too.
        before = torch.get_num_threads()
        if k == before:
            yield
            return
        torch.set_num_threads(k)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    @property
    def alive(self) -> bool:
        # A thread not yet started counts: the constructor starts the workers
        # one after another, and the first may fail before the last starts.
        t = self.thread
        return t is not None and (t.ident is None or t.is_alive()) and self.error is None

    def record(self, batch_size: int, seconds: float, failed: bool = False, threads: int | None = None) -> None:
        with self._lock:
            self.batches += 1
            self.requests += batch_size
            self.busy_s += seconds
            if failed:
                self.failed_batches += 1
            if threads is not None:
                self.batches_by_threads[threads] = self.batches_by_threads.get(threads, 0) + 1

    def report(self, controller: dict | None = None) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "index": self.index,
                "device": str(self.device),
                "alive": self.alive,
                "error": repr(self.error) if self.error else None,
                "torch_threads": self.threads,
                "batches_by_threads": dict(sorted(self.batches_by_threads.items())),
                "batches": self.batches,
                "requests": self.requests,
                "failed_batches": self.failed_batches,
                "busy_s": self.busy_s,
            }
        if controller is not None:
            out["controller"] = controller
        return out


def runner_copy(runner: Any) -> Any:
    """A second runner over the same model and weights (a shallow copy), with
    its own count of the attention that ran."""
    twin = copy.copy(runner)
    ran = getattr(runner, "attention_batches", None)
    if ran is not None:
        twin.attention_batches = dict.fromkeys(ran, 0)
    return twin


def attention_batches(replicas: Sequence[Replica]) -> dict[str, int] | None:
    """Batches by the attention that ran, summed over the replicas' runners,
    each counted once (a pipeline's stages share one runner)."""
    total: dict[str, int] | None = None
    for runner in {id(r.runner): r.runner for r in replicas}.values():
        ran = getattr(runner, "attention_batches", None)
        if ran is None:
            continue
        total = total or {}
        for k, v in dict(ran).items():
            total[k] = total.get(k, 0) + v
    return total
