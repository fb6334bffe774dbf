"""fastserve.Engine: dynamic batching of single-text requests from many
callers onto one transformer encoder, through the C++ scheduler."""

from __future__ import annotations

import asyncio
import atexit
import collections.abc
import concurrent.futures as cf
import copy
import functools
import inspect
import logging
import math
import numbers
import operator
import os
import threading
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Sequence

import numpy as np
import torch

from . import _core, admission, footprint, gemm, precision, process, shapes, tasks
from . import replicas as replicas_
from .admission import Timeout, all_results, result_of, results_of
from .errors import EngineClosedError, InferenceError, InvalidInputError, OverloadedError, QueueFullError
from .errors import ReplicaFailedError, RequestTimeoutError, UnsupportedModelError, WorkerThreadError
from .inputs import Fit, Gathered, Template, attach, infos_of, truncation_mode, weighted_mean
from .pipeline import PipelineRunner
from .models import DEFAULT_MODEL_NAME, POOLINGS, TASKS, LoadedModel, default_model_path, load, model_max_length
from .models import TextEncoder
from .heads import EmbeddingHead
from .families import select as select_runner
from .runners import ACTIVATIONS, BatchAbandoned, PackedRunner, classification_activation, fused_layers, layer_gemm
from .st_spec import prompt_length

log = logging.getLogger("fastserve")

POLICIES = ("model", "aimd", "seed", "static")
# The largest batch, in tokens, when the caller sets none. On a CPU, batches
# past about 2,048 tokens buy no throughput but grow the peak activations the
# process keeps (benchmarks/README.md, "Memory"); a GPU needs large batches.
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 2048, "cuda": 8192}
EXECUTIONS = ("auto", "packed", "padded")
# How long the constructor waits for each worker's warm-up batch (a slow one
# goes on in its worker, which serves once it is done).
WARMUP_WAIT_S = 120.0
# submit_many (embed, classify of a list) tokenizes a list of more texts than
# this in pieces of this many, each queued once it is tokenized: the model
# starts on the first piece while the rest tokenize (the tokenizer lets go of
# the GIL), where the whole list used to be tokenized first with the device
# idle (Engine._pieces; benchmarks/README.md, "Tokenizing while the model runs").
TOKENIZE_PIECE_TEXTS = 512
# Futures a list waiting for room in the queue makes ahead of each try
# (Engine._submit_prefix).
WAITING_FUTURES = 64


def _queued(submit: Callable[..., Any], *args: Any) -> Any:
    """The scheduler's submit, whose refusal of a request it can never hold
    (more tokens than max_queue_tokens) is a plain ValueError: that is the
    caller's input, so InvalidInputError (QueueFullError, a refusal worth
    retrying, passes as it is)."""
    try:
        return submit(*args)
    except QueueFullError:
        raise
    except ValueError as e:
        raise InvalidInputError(str(e)) from e


def _distinct_labels(labels: list[str]) -> list[str]:
    """A classifier's labels with any name id2label gives more than once
    made distinct by its id ("name_3"), with a warning, so that every logit
    keeps its score in Classification.scores."""
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if not repeated:
        return labels
    out = [f"{x}_{i}" if x in repeated else x for i, x in enumerate(labels)]
    taken = set()
    for i, x in enumerate(out):  # a made-up name that another label already has
        while x in taken or (x != labels[i] and x in labels):
            x += "_"
        out[i] = x
        taken.add(x)
    warnings.warn(f"the model's id2label names {', '.join(map(repr, repeated))} more than once; they are reported "
                  f"as {', '.join(repr(y) for x, y in zip(labels, out) if x != y)} so that each keeps its score",
                  stacklevel=4)  # the Engine(...) call, past __init__ and its wrapper
    return out


def overloaded(retry_after_s: float) -> OverloadedError:
    """The error of a queued request dropped before compute: predicted to
    finish retry_after_s after its deadline."""
    err = OverloadedError(f"overloaded: dropped before compute, predicted to finish {retry_after_s * 1e3:.1f} ms "
                          f"after its deadline; retry after {retry_after_s:.3f} s")
    err.retry_after_s = retry_after_s
    return err


# Engines not yet closed. Each is closed at interpreter exit, while threads
# can still run: a worker blocked in the C++ scheduler when the interpreter
# finalises would be killed mid-call (pthread_exit unwinding through a
# noexcept frame aborts the process with "terminate called without an active
# exception").
_open_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()
# The workers of engines collected without close(): their scheduler is
# closed, but one may not have left its loop yet; they are joined at exit
# too, for the same reason.
_ending_workers: set[threading.Thread] = set()
# Every engine made in this process, closed or not: a forked child marks
# each and gives each fresh locks (_after_fork_in_child).
_all_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()
# .active is True on a worker thread of any engine (_worker_loop), where
# done callbacks and model hooks run.
_worker_here = threading.local()

_FORKED = ("this engine was made before the process forked: its worker threads are in the parent only; "
          "make an Engine in this process")


def _on_worker_thread() -> bool:
    """Whether the calling thread is a worker of some fastserve engine (a
    future's done callback or a model hook runs there): a call that waits
    for any engine's results would wait for this thread, or for another
    engine's worker that may itself be waiting for this one."""
    return getattr(_worker_here, "active", False)


def _worker_thread_error(what: str, how: str) -> WorkerThreadError:
    name = threading.current_thread().name
    return WorkerThreadError(
        f"{what} was {how} on the fastserve worker thread {name!r} (a future's done callback or a model hook "
        "runs there) and would wait for a worker: this engine's (itself), or another engine's, whose callbacks "
        "may be waiting for this one; use submit() there, or hand the work to another thread (an async form: "
        "asyncio.run_coroutine_threadsafe onto an event loop running in another thread)")


def _awaited_off_workers(method: Callable[..., Any], what: str) -> Callable[..., Any]:
    """A task call's coroutine (tasks.py) with Engine._may_await's check,
    made as it starts to run."""
    @functools.wraps(method)
    async def checked(self: "Engine", *args: Any, **kwargs: Any) -> Any:
        self._may_await(what)
        return await method(self, *args, **kwargs)
    return checked


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: the engines it
    inherited refuse new work (instead of queueing it for no worker) and are
    left alone at exit (their scheduler's locks may have been held at the
    fork). Their own locks may have been held too, by a thread that does not
    exist here: each gets fresh ones, so a refusal never waits on one."""
    for engine in list(_all_engines):
        engine._forked = True
        engine._lock = threading.Lock()
        timer = getattr(engine, "_tokenize", None)
        if timer is not None:
            timer._lock = threading.Lock()
        private = getattr(engine, "_private_tokenizer", None)
        if isinstance(private, tasks.PrivateTokenizer):
            private._lock = threading.Lock()
    _open_engines.clear()
    _ending_workers.clear()
    _worker_here.active = False  # forked from a worker's thread: no engine's worker here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_open_engines() -> None:
    for engine in list(_open_engines):
        engine.close()
    for thread in list(_ending_workers):
        if thread is not threading.current_thread():
            thread.join()


@dataclass(frozen=True)
class Classification:
    """The top label and every label's score. Scores are the classifier's
    logits after the engine's activation: softmax probabilities (single-label
    heads), independent sigmoid probabilities (multi-label and one-logit
    heads) or the raw logits (activation="none", regression heads)."""

    label: str
    score: float
    scores: dict[str, float]


class _Timer:
    """Running count / total / max of a duration, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float, n: int = 1) -> None:
        with self._lock:
            self.count += n
            self.total += seconds
            self.max = max(self.max, seconds)

    def summary(self) -> dict[str, float]:
        with self._lock:
            return {
                "count": self.count,
                "total": self.total,
                "mean_per_text": self.total / self.count if self.count else 0.0,
                "max_call": self.max,
            }


def _undo_process_changes_on_refusal(init: Callable[..., None]) -> Callable[..., None]:
    """Engine.__init__, undoing what it changed in the process (torch's
    thread count, oneDNN's registration) when it raises after those changes:
    most arguments are checked before them, the rest (a preempt the chosen
    runner cannot do, the scheduler's own checks) only after."""
    @functools.wraps(init)
    def wrapped(self: "Engine", *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            changed = getattr(self, "_process", None)
            if changed is not None:
                threads = changed["torch_threads"]
                if threads["changed"]:
                    torch.set_num_threads(threads["before"])
                release = getattr(self, "_release_onednn", None)
                if release is not None:
                    release()
            if isinstance(getattr(self, "runner", None), PipelineRunner):
                self.runner.close()  # its hooks off the model (the caller's, with copy_model=False)
            raise
    return wrapped


def _check_dense_widths(post: Sequence[Any], width: int) -> None:
    """Each Dense module after pooling takes the width before it (the pooled
    width: one hidden width per pooling mode, at the first): else
    UnsupportedModelError now, not an InferenceError on every request (a
    folder's Pooling changed, or pooling= given, in front of its Dense)."""
    from .st_spec import DenseLayer

    for i, layer in enumerate(p for p in post if isinstance(p, DenseLayer)):
        takes = int(layer.weight.shape[1])
        if width and takes != width:
            raise UnsupportedModelError("Dense", f"Dense module {i} takes {takes} features but is given {width} "
                                                 "(the pooled width: the hidden width times the pooling modes)")
        width = int(layer.weight.shape[0])


def _preempt_choice(preempt: bool | None, parallel: str, pausable: bool, device: torch.device, choice: Any) -> bool:
    """Engine(preempt=...): on where the runner can pause (pausable) with
    data-parallel workers, by default on a CPU; True where it cannot is a
    ValueError."""
    able = pausable and parallel == "data"
    if preempt and not able:
        why = (f"parallel={parallel!r} (pausing needs parallel='data')" if parallel != "data" else
               f"this engine's {choice.capabilities.layout} runner (family {choice.family or 'none'}) "
               "cannot pause (the packed BERT-family runner can)")
        raise ValueError(f"preempt=True pauses a running batch between layers; not possible here: {why}")
    return able and (preempt if preempt is not None else device.type == "cpu")


class _Once:
    """fn(*args) on the first call only, whichever comes first: close(), a
    refused constructor, or the finalizer of an engine dropped unclosed."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._fn, self._args, self._lock, self.done = fn, args, threading.Lock(), False

    def __call__(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
        self._fn(*self._args)


# Per-prompt caches: prompts come from callers (HTTP bodies up to 2 MB), so
# both the entries and each key are bounded: at most 1,024 prompts of at most
# 1,024 characters (an instruction prompt is far shorter; a longer one is
# counted again on each call).
PROMPT_CACHE_ENTRIES = PROMPT_CACHE_CHARS = 1024


def _claim(fut: cf.Future) -> bool:
    """fut.set_running_or_notify_cancel() for a request a worker takes:
    False where its caller cancelled it, or settled it already (set_result
    and set_exception are public on a Future; that raised here, in the
    worker, and lost the batch's other requests)."""
    try:
        return fut.set_running_or_notify_cancel()
    except RuntimeError:  # "Future in unexpected state": finished
        return False


def _settle(fut: cf.Future, result: Any = None, *, error: Optional[BaseException] = None) -> None:
    """A taken request's result, or its exception, unless its caller settled
    the future meanwhile: one caller's doing never fails the others'."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except cf.InvalidStateError:
        pass
    except BaseException as e:  # noqa: BLE001 - a done callback's, past the `except Exception` that logs one
        # Settled by then; raised on, it would kill the worker with the
        # batch's other requests taken and never settled.
        log.error("a done callback raised %r; the engine goes on", e, exc_info=e)


def _remember(cache: dict[str, int], prompt: str, n: int) -> None:
    if len(cache) < PROMPT_CACHE_ENTRIES and len(prompt) <= PROMPT_CACHE_CHARS:
        cache[prompt] = n


def _dropped(scheduler: _core.Scheduler, release_onednn: _Once, replicas: list, pending: dict[int, cf.Future],
             pid: int) -> None:
    """An engine collected without close() (weakref.finalize): its workers,
    which hold it only while they run a batch, end once its scheduler is
    closed, and its oneDNN registration is released. Queued requests keep
    it alive: this finalizer holds `pending` (the engine's map of queued
    futures), each future's done callback refers to the engine, so the
    engine is collected only once none is queued (what is left is failed
    here all the same). A dead worker's exception lets go of its frames,
    which hold the replica in a cycle that gc.freeze() would keep with the
    model. In a forked child (pid not the engine's) nothing is touched:
    the scheduler's locks may have been held at the fork."""
    if os.getpid() != pid:
        return
    for rid in scheduler.close():
        fut = pending.pop(rid, None)
        if fut is not None and _claim(fut):
            _settle(fut, error=EngineClosedError("the engine was dropped before this request ran"))
    release_onednn()
    _forget_frames(r.error for r in replicas)
    _ending_workers.difference_update([t for t in list(_ending_workers) if not t.is_alive()])
    _ending_workers.update(r.thread for r in replicas)


def _forget_frames(errors) -> None:
    """Each exception (and those it chains) without its traceback: the
    frames hold the engine or a replica, and the exception stays for repr()."""
    seen: set[int] = set()
    for e in errors:
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            e.__traceback__ = None
            e = e.__cause__ or e.__context__


def _worker_loop(ref: "weakref.ref[Engine]", replica: replicas_.Replica) -> None:
    """A worker thread: the engine's batches for this replica until its
    scheduler closes. It holds the engine only while it runs one (a strong
    reference the whole time would keep an engine dropped without close()
    alive with its threads and model to the end of the process)."""
    _worker_here.active = True  # blocking calls here are refused (Engine._may_block, _may_await)
    engine = ref()
    if engine is None:
        return
    sched = engine._scheduler
    worker = replica.index if engine.parallel == "data" else 0
    try:
        replica.enter()
        with torch.inference_mode():
            engine._warm_up(replica)
            del engine
            while True:
                batch = sched.next_batch(0.1, worker)
                if batch is None:
                    if sched.closed:
                        return
                    continue
                engine = ref()
                if engine is None:
                    return
                engine._handle(batch, replica)
                del engine
    except BaseException as e:  # the worker must never die silently
        engine = ref()
        if engine is not None:
            engine._worker_died(replica, worker, e)
        # The engine keeps the exception (health()) and the exception its
        # frames: those it went through (the warm-up's, holding the engine)
        # lose their locals, and this one its reference to the engine.
        traceback.clear_frames(e.__traceback__)
        del engine
        raise


# Whether a module is in training mode (checked for every module of the
# model per batch: map over attrgetter is the loop without Python frames).
_TRAINING = operator.attrgetter("training")

# The most any count option (max_queue, max_batch_tokens, ...) may be: the
# scheduler's int64 fields, with room for sums of them.
MAX_COUNT = 2**40

# The Engine's on/off options: True, False, or None for its default.
_SWITCHES = ("normalize", "tune_malloc", "cudnn_attention", "tune_onednn", "copy_model", "preempt", "warmup",
             "freeze_gc")


def _switch(name: str, value: Any) -> Optional[bool]:
    """An on/off option as a bool (None stays None: the default): True,
    False, a numpy bool, or an int 0 / 1; anything else (the string "no",
    say, which is truthy) is a ValueError naming it."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be True or False (or None for the default), got {value!r}")


def _check_options(*, task: str, pooling: str, normalize: Optional[bool], policy: str, execution: str,
                   target_latency_ms: Any,
                   request_timeout_s: Any, activation: str, truncate: Any, pair_truncation: str, max_queue: Any,
                   max_batch_size: Any, min_batch_tokens: Any, max_queue_tokens: Any, max_batch_tokens: Any,
                   max_length: Any, chunk_overlap: Any, torch_threads: Any) -> str:
    """The Engine's options but the on/off ones (_switch) checked before
    anything is loaded (ValueError naming the first bad one); returns
    `truncate` as inputs.TRUNCATIONS names it."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if pooling != "auto" and pooling not in POOLINGS:
        raise ValueError(f"pooling must be 'auto' or one of {POOLINGS}, got {pooling!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    for name, value in (("target_latency_ms", target_latency_ms),
                        ("request_timeout_s", 1 if request_timeout_s is None else request_timeout_s)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if not 0 < admission.seconds(target_latency_ms) < math.inf:
        raise ValueError(f"target_latency_ms must be a positive finite number, got {target_latency_ms!r}")
    if request_timeout_s is not None and not request_timeout_s > 0:
        raise ValueError(f"request_timeout_s must be positive seconds or None, got {request_timeout_s!r}")
    if activation not in ACTIVATIONS + tasks.PAIR_ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    truncate = truncation_mode(truncate)
    if truncate == "chunk" and task != "embed":
        raise ValueError(f"truncate='chunk' is for task='embed' (a {task} engine cuts or refuses long inputs)")
    if pair_truncation not in tasks.PAIR_TRUNCATIONS:
        raise ValueError(f"pair_truncation must be one of {tasks.PAIR_TRUNCATIONS}, got {pair_truncation!r}")
    for name, value in (("max_queue", max_queue), ("max_batch_size", max_batch_size),
                        ("min_batch_tokens", min_batch_tokens), ("max_queue_tokens", max_queue_tokens),
                        ("max_batch_tokens", max_batch_tokens), ("max_length", max_length)):
        if value is None and name in ("max_queue_tokens", "max_batch_tokens", "max_length"):
            continue  # None: the default
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_COUNT:
            raise ValueError(f"{name} must be an int >= 1 (at most {MAX_COUNT}), got {value!r}")
    if max_batch_tokens is not None and min_batch_tokens > max_batch_tokens:
        raise ValueError(f"min_batch_tokens ({min_batch_tokens}) must not exceed max_batch_tokens ({max_batch_tokens})")
    if isinstance(chunk_overlap, bool) or not isinstance(chunk_overlap, numbers.Integral) or chunk_overlap < 0:
        raise ValueError(f"chunk_overlap must be an int >= 0, got {chunk_overlap!r}")
    # An option that would do nothing here is refused, not ignored.
    if chunk_overlap and truncate != "chunk":
        raise ValueError(f"chunk_overlap is for truncate='chunk' (this engine's truncate is {truncate!r})")
    if pair_truncation != "longest_first" and task != "rerank":
        raise ValueError(f"pair_truncation is for task='rerank' (this engine's task is {task!r})")
    if (pooling != "auto" or normalize is not None) and task != "embed":
        raise ValueError(f"{'pooling' if pooling != 'auto' else 'normalize'} is for task='embed' (this engine's "
                         f"task is {task!r}: its scores come from the model's own head)")
    if activation != "auto" and task in ("embed", "token-classify"):
        raise ValueError(f"activation is for task='classify' or 'rerank' (this engine's task is {task!r}: "
                         + ("embeddings have no activation)" if task == "embed" else "scores are softmax per token)"))
    process.check_torch_threads(torch_threads)
    return truncate


class _TokenizedPieces(collections.abc.Sequence):
    """A list of texts as the token lists submit_many queues, tokenized in
    order as they are asked for, at least `piece` texts at a time:
    admission._admit has each piece made (prepare) before it slices it, in
    the caller's thread or, for asubmit_many, in a worker thread. The lists
    so far, with their InputInfos, in `.lists`."""

    def __init__(self, texts: list[str], tokenize: Callable[[list[str]], Sequence[Sequence[int]]],
                 piece: int) -> None:
        self._texts = texts
        self._tokenize = tokenize
        self.piece = piece  # texts per scheduler call too (admission._admit)
        self.lists = admission.TokenLists()
        self.lists.infos = []

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def infos(self) -> list:
        """The InputInfos so far (all of them once the call has queued every piece: inputs.infos_of)."""
        return self.lists.infos

    def ready(self, stop: int) -> bool:
        return len(self.lists) >= min(stop, len(self._texts))

    def prepare(self, stop: int) -> None:
        """The texts up to `stop` tokenized (those not yet), a whole piece
        at least: after a queue that took part of a piece, the next call
        still tokenizes `piece` texts, not the few it took."""
        done = len(self.lists)
        if stop > done:
            more = self._tokenize(self._texts[done : max(stop, done + self.piece)])
            self.lists.extend(more)
            self.lists.infos.extend(infos_of(more))

    def __getitem__(self, index):  # type: ignore[override]
        forward = isinstance(index, slice) and index.step is None and (index.start or 0) >= 0 \
            and index.stop is not None and index.stop >= 0
        self.prepare(index.stop if forward else len(self._texts))  # anything else: all of them first
        return self.lists[index]


class Engine(tasks.TaskCalls):
    """Serve a Hugging Face encoder to many concurrent callers.

    Callers' threads tokenize and submit single texts; a worker thread per
    replica pulls batches assembled by the C++ scheduler, runs the model under
    torch.inference_mode(), and resolves each caller's future exactly once.

    target_latency_ms is the 99th percentile of a request's whole latency
    (queueing included) that the engine holds from light load to overload.
    The controller aims each batch's compute time at half of it (less the
    measured tail of compute): a request that arrives while a batch runs
    waits for that batch, then runs in the next.

    request_timeout_s is every request's deadline unless its call gives a
    timeout (None: no deadline). A request predicted to miss its deadline
    is refused at submit (OverloadedError, with retry_after_s) or dropped
    before compute (its future fails with OverloadedError); one whose
    deadline passes before its batch starts fails with RequestTimeoutError.
    Pass request_timeout_s=target_latency_ms / 1000 to serve every accepted
    request within the target and shed the rest under overload.

    preempt lets a running batch be paused between two layers of the packed
    runner to run requests of a higher priority class first, then resumed;
    its rows the pause would make late are dropped (OverloadedError)
    (docs/design.md, "Pausing a batch"). None: on for the packed runner on
    a CPU with data-parallel workers; True asks for it (ValueError where the
    runner has no layers to pause between); False: off.

    warmup runs one small batch through each data-parallel worker on its own
    thread before the constructor returns, outside the scheduler and the
    statistics: the one-off costs of a worker's first batch (thread-local
    state in torch and its BLAS, first-touch allocations) then never land on
    a caller's request. stats()["warmup_s"] gives each worker's time.

    freeze_gc: once built, collect and then freeze the garbage collector's
    objects (gc.freeze), so its full passes, which held the GIL for 311 ms
    over what torch and transformers leave alive, skip them
    (process.py; stats()["process"]["gc"]). False leaves the collector alone.
    """

    _forked = False  # True in a forked child (_after_fork_in_child)

    # The task calls' coroutines refuse to run on a worker thread, as
    # aembed does (Engine._may_await).
    asubmit_pairs = _awaited_off_workers(tasks.TaskCalls.asubmit_pairs, "asubmit_pairs")
    ascore = _awaited_off_workers(tasks.TaskCalls.ascore, "ascore")
    arerank = _awaited_off_workers(tasks.TaskCalls.arerank, "arerank")
    aextract = _awaited_off_workers(tasks.TaskCalls.aextract, "aextract")

    @_undo_process_changes_on_refusal
    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        task: str = "embed",
        pooling: str = "auto",
        normalize: bool | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
        truncate: bool | str = True,
        chunk_overlap: int = 0,
        pair_truncation: str = "longest_first",
        target_latency_ms: float = 50.0,
        request_timeout_s: float | None = 30.0,
        policy: str = "model",
        execution: str = "auto",
        activation: str = "auto",
        max_batch_tokens: int | None = None,
        max_batch_memory_mb: float | None = None,
        min_batch_tokens: int = 32,
        max_batch_size: int = 256,
        max_queue: int = 65536,
        max_queue_tokens: int | None = None,
        torch_threads: int | None = None,
        tune_malloc: bool = True,
        cudnn_attention: bool | None = None,
        tune_onednn: bool = True,
        copy_model: bool = True,
        devices: str | Sequence[str] | None = None,
        replicas: int | None = None,
        parallel: str = "data",
        preempt: bool | None = None,
        clock: _core.ManualClock | None = None,
        warmup: bool = True,
        freeze_gc: bool = True,
    ) -> None:
        normalize, tune_malloc, cudnn_attention, tune_onednn, copy_model, preempt, warmup, freeze_gc = (
            _switch(name, value) for name, value in zip(_SWITCHES, (
                normalize, tune_malloc, cudnn_attention, tune_onednn, copy_model, preempt, warmup, freeze_gc)))
        own_side = truncate is True  # cut where the tokenizer cuts (its truncation_side), once it is loaded
        truncate = _check_options(
            task=task, pooling=pooling, normalize=normalize, policy=policy, execution=execution,
            target_latency_ms=target_latency_ms, request_timeout_s=request_timeout_s, activation=activation,
            truncate=truncate, pair_truncation=pair_truncation, max_queue=max_queue, max_batch_size=max_batch_size,
            min_batch_tokens=min_batch_tokens, max_queue_tokens=max_queue_tokens, max_batch_tokens=max_batch_tokens,
            max_length=max_length, chunk_overlap=chunk_overlap, torch_threads=torch_threads)
        # One device per worker (data parallel) or per stage (pipeline); the
        # first is the engine's device (python/fastserve/replicas.py).
        if replicas is None:
            replicas = replicas_.default_replicas(device, devices, parallel, torch_threads)
        worker_devices = replicas_.worker_devices(device, devices, replicas, parallel)
        self.parallel = parallel
        self.device = worker_devices[0]
        self.precision = precision.resolve(dtype, self.device)
        self.dtype = self.precision.weights
        # What the runners compute in where it is not the weights' (autocast's).
        compute = self.precision.autocast
        if max_batch_tokens is None:
            max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS[self.device.type]
        self.max_batch_tokens = int(max_batch_tokens)

        loaded: LoadedModel = load(default_model_path() if model is None else model, tokenizer, task)
        # The model as the caller named it (the embedded default by its own
        # name, not the folder it is installed in): the id HTTP answers carry.
        self.model_name = DEFAULT_MODEL_NAME if model is None else loaded.name
        self.task = task
        self.tokenizer = loaded.tokenizer
        limit = model_max_length(loaded.model, self.tokenizer, loaded.st, max_length)
        if max_length is not None and (max_length < 1 or max_length > limit):
            raise ValueError(f"max_length must be in [1, {limit}] for this model, got {max_length}")
        # The execution path, from what each family's adapter declares
        # (families.py); execution='packed' without support raises here.
        choice = select_runner(loaded.model, task, execution)
        packed = choice.capabilities.layout == "packed"
        # The pooling, and the Dense modules after it fitting its width (pooling= may change it).
        modes = (pooling,) if pooling != "auto" else (loaded.st.pooling or ("mean",))
        _check_dense_widths(loaded.st.post, len(modes) * int(getattr(loaded.model.config, "hidden_size", 0) or 0))
        # The batch bound that keeps a batch's activations within the budget
        # (python/fastserve/footprint.py); checked before anything changes.
        cfg = loaded.model.config
        self._activation_bytes_per_token = footprint.per_token(
            cfg, self.dtype, "packed" if packed else "padded", max_length=max_length or limit,
            scores=getattr(cfg, "_attn_implementation", None) == "eager",
            fused=packed and fused_layers(loaded.model, self.device, self.precision.compute))
        shape = footprint.shape_of(cfg)
        # Whether batches may pause between layers: the chosen runner's, two
        # layers at least, data parallel (a preempt=True that cannot is
        # refused here, before anything changes).
        pausable = getattr(choice.runner, "pausable", False) and shape is not None and shape.layers > 1
        self.preempt = _preempt_choice(preempt, parallel, pausable, self.device, choice)
        # A CPU batch's threads (replicas.tokens_per_thread; its override checked here).
        self._tokens_per_thread = replicas_.tokens_per_thread(shape.hidden if shape else None,
                                                              precision.emulated(self.precision))
        scratch = piece_row = 0
        # How the CPU layers' products run (gemm.py), where the layers are fused.
        products = layer_gemm(loaded.model, self.device, self.precision.compute) \
            if packed and self.device.type == "cpu" else None
        if shape is not None and self.device.type == "cpu":
            # The threads each worker runs a batch on (not the count left in
            # the thread that builds the engine).
            threads = replicas_.threads_per_worker(torch_threads, worker_devices) or torch.get_num_threads()
            if products == "onednn":
                # A piece of a product, copied into it (weights reordered once: no per-call buffer).
                piece_row = footprint.gemm_piece_row_bytes(shape, self.dtype)
            else:  # a bfloat16 product's own buffer through torch.mm, per thread (autocast's too)
                scratch = footprint.mm_scratch_bytes(loaded.model, self.precision.compute, threads)
        if shape is not None and packed and self.device.type == "cpu":
            scratch += footprint.attention_scratch_bytes(shape, self.dtype, max_length=max_length or limit,
                                                         threads=threads)
        # A max_length sequence's attention mask or relative bias, made afresh.
        scratch += footprint.per_batch(cfg, self.dtype, max_length=max_length or limit)
        # Packed CPU batches run padded with ghost rows (shapes.target): the
        # budget holds the padded batch.
        # Whether every product over a batch's tokens runs through gemm.py's
        # pieces, which bound oneDNN's cache of shapes without token buckets:
        # not token-classify's head (a torch product over every token).
        pieces = products == "onednn" and task != "token-classify"
        runs_at = process.onednn_buckets(self.device, self.precision.compute, tune_onednn, pieces) \
            if packed and self.device.type == "cpu" else None
        self.memory_budget = footprint.memory_budget(max_batch_memory_mb, self._activation_bytes_per_token,
                                                     cfg.model_type, scratch, piece_row, gemm.PIECE, runs_at)
        self._activation_formula = None if self._activation_bytes_per_token is None else footprint.formula(
            self._activation_bytes_per_token, scratch, piece_row, gemm.PIECE, runs_at)
        if self.memory_budget is not None:
            self.max_batch_tokens = min(self.max_batch_tokens, self.memory_budget.tokens)
        # What the engine changes outside itself (python/fastserve/process.py),
        # only once every argument has been checked: a refused Engine(...)
        # leaves the process and the caller's model as they were.
        on_cpu = self.device.type == "cpu"
        self._process: dict[str, Any] = {
            "torch_threads": process.set_torch_threads(torch_threads if on_cpu or torch_threads else 0),
        }
        if cudnn_attention is None:
            cudnn_attention = os.environ.get("FASTSERVE_CUDNN_ATTENTION") == "1"
        self._sdpa_backends, switches = process.sdpa_backends_for(self.device, cudnn_attention)
        self._onednn, self._process["onednn"] = process.onednn_for(self.device, self.precision.compute, tune_onednn,
                                                                   pieces)
        self._release_onednn = _Once(process.onednn_release, self._process["onednn"])
        self._process["sdpa_backends_switched_per_batch"] = switches
        # A pipeline's model is prepared on the CPU and placed stage by stage
        # (python/fastserve/pipeline.py): it need not fit on one device.
        src, callers = loaded.model, loaded.model is model
        if parallel == "pipeline" and callers and copy_model:
            copied = copy.deepcopy(src)  # its layers get hooks and move: never the caller's
            home = next(src.parameters()).device
            if process.needs_change(src, home, self.dtype) or any(d != home for d in worker_devices):
                process.refuse_forwards_bound_to(src, copied)
            src, callers = copied, False
        net, self._process["model"] = process.prepare_model(
            src, self.device if parallel == "data" else torch.device("cpu"), self.dtype,
            callers=callers, copy_model=copy_model)
        if src is not loaded.model:
            self._process["model"] = "copied"

        self.model = net
        self._model_modules = tuple(net.modules())  # each batch checks none is in training mode
        self._precision_context = self.precision.context()
        precision.warn_if_slow(self.precision)
        spec = loaded.st
        self.pooling = "+".join(modes)
        # The stack after pooling: the model's (sentence-transformers), with
        # normalize=False dropping its Normalize and normalize=True ending in one;
        # a plain encoder's is normalised unless normalize=False.
        post = [op for op in spec.post if normalize is not False or op != "normalize"]
        if (normalize or (normalize is None and not spec.sentence_transformers)) and post[-1:] != ["normalize"]:
            post.append("normalize")
        self.normalize = post[-1:] == ["normalize"]
        self.prompts = dict(spec.prompts)
        self.default_prompt_name = spec.default_prompt_name
        # As SentenceTransformer reports it: the model's, else cosine.
        self.similarity_fn_name = spec.similarity_fn_name or "cosine"
        # A chunked text's windows are normalised once combined (_combine), not each.
        self._head = EmbeddingHead(modes, include_prompt=spec.include_prompt,
                                   post=post[:-1] if truncate == "chunk" and self.normalize else post,
                                   device=self.device)
        self._prompt_tokens: dict[str, int] = {}
        self._prompt_leads: dict[str, int] = {}
        self.max_length = int(max_length or limit)  # (a numpy int: stats() must stay JSON)
        # "right" | "left" | "error" | "chunk" (inputs.py): texts are tokenized
        # whole, then cut, refused or split into windows.
        if own_side and getattr(self.tokenizer, "truncation_side", "right") == "left":
            truncate = "left"  # as sentence-transformers and transformers cut with this tokenizer
        self.truncate = truncate
        self.chunk_overlap = int(chunk_overlap)
        # The engine's own calls of tokenizer(...) after construction go
        # through a copy under a lock, made on the first such call (tasks.py).
        self._private_tokenizer = tasks.PrivateTokenizer(self.tokenizer, truncate if truncate in ("left", "right")
                                                         else None)
        self._encode = TextEncoder(self.tokenizer, self.max_length, False, self._private_tokenizer)
        # A tokenizer with tokens the model has no embeddings for (added
        # without resizing the model): a text holding one is refused. None:
        # every id the tokenizer makes has one, so texts' ids go unchecked.
        n = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else None
        self._vocab_gap: str | None = "" if n is None else None
        if n is not None and n > self.vocab_size:
            self._vocab_gap = (f" (the tokenizer has {n} tokens, the model's embeddings {self.vocab_size}: "
                               "tokens added to the tokenizer without resizing the model)")
            warnings.warn(f"the tokenizer has {n} tokens but the model only {self.vocab_size} embeddings; "
                          "texts holding the tokens past them are refused", stacklevel=3)  # past the wrapper
        self._fit = self._make_fit(truncate, chunk_overlap)
        # Made now where requests will need it (a copy takes 0.1-0.2 s: not
        # on the first such request, in the HTTP server on its event loop).
        if truncate == "chunk" or self._head.needs_prompt_lengths or not self._encode.direct \
                or self._fit.retokenize is not None:
            self._private_tokenizer.ready()
        if task != "embed":
            id2label = getattr(net.config, "id2label", None) or {}
            n = net.config.num_labels
            self.labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(n)]
            if task == "classify":  # Classification.scores is keyed by label: one key per logit
                self.labels = _distinct_labels(self.labels)
            # What the scores are: the model's problem_type and head decide, as in transformers' pipeline
            # (classify); a rerank engine's as CrossEncoder.predict; token-classify: softmax per token.
            self.activation: str | None = (
                classification_activation(net.config, activation) if task == "classify" else
                tasks.cross_encoder_activation(loaded.source, net.config, activation)
                if task == "rerank" else
                "softmax")
        else:
            self.labels = []
            self.activation = None

        # Pairs carry token types when the tokenizer makes them and the model has more than one, or,
        # without a type table (XLM, FlauBERT: the types' word embeddings), its forward takes them.
        makes_types = "token_type_ids" in getattr(self.tokenizer, "model_input_names", ())
        type_table = getattr(net.config, "type_vocab_size", None)
        types = makes_types and (type_table > 1 if isinstance(type_table, int) else
                                 "token_type_ids" in inspect.signature(net.forward).parameters)
        self._pairs = tasks.PairEncoder(self._private_tokenizer, self.max_length, truncate, pair_truncation,
                                        types) if task == "rerank" else None
        # Where each pair's second segment starts rides on its future to the
        # runner, for a model with token types only (DistilBERT's forward
        # refuses token_type_ids in transformers 4.x).
        self._typed_pairs = task == "rerank" and types
        self._token_encoder = tasks.TokenEncoder(self._private_tokenizer, self.max_length, truncate) \
            if task == "token-classify" else None
        self._merger = tasks.EntityMerger(self.tokenizer, self.labels, self._token_encoder.word_aware) \
            if self._token_encoder else None

        self._choice = choice

        # classify's activation runs in the worker, rerank and token-classify
        # scores in the caller's thread (tasks.py).
        # token_types: the padded runner passes a text's token types where the tokenizer makes them, as
        # encode does (the packed families count them left out as zeros, as BERT does).
        def make_runner(m: torch.nn.Module, dev: torch.device, own: bool, head: EmbeddingHead) -> Any:
            return choice.runner(m, task=task, pooling=modes[0], normalize=self.normalize, device=dev,
                                 activation=self.activation if task == "classify" else "none", head=head,
                                 compute=compute, own_weights=own, token_types=makes_types)

        # Q/K/V views of one tensor on a model the engine owns only (FusedQKV).
        self.runner = make_runner(net, self.device, self._process["model"] in ("loaded", "copied"), self._head)
        # Replicas and pipeline stages (replicas.py); a replica on another
        # device gets its own runner with the head on that device.
        head = self._head
        self._replicas = self._make_replicas(
            worker_devices, torch_threads, cudnn_attention, lambda m, dev, own: make_runner(
                m, dev, own, EmbeddingHead(head.modes, include_prompt=head.include_prompt, post=head.post, device=dev)))
        self.runner = self._replicas[0].runner
        pad = self.tokenizer.pad_token_id
        # Packed CPU batches get ghost sequences (shapes.py): up to a few token
        # counts in bf16/fp16 whose products run through torch.mm
        # (process.onednn_buckets), else up to shapes.MIN_ROWS tokens.
        self._ghost_pad = (pad if pad is not None else 0) \
            if self.device.type == "cpu" and self.runner.name == "packed" else None
        self._ghost_buckets = bool(runs_at)
        if self._process["onednn"] == "on":
            for r in self._replicas:
                if isinstance(r.runner, PackedRunner):
                    r.runner.unbounded_warning = (
                        f"a layer of this {self.precision.compute} engine now runs through its modules (a hook or a "
                        "change made after the engine was built): their products give oneDNN a new shape per "
                        "batch size, which it caches (up to 1,024), growing the process by hundreds of MiB; "
                        "build the Engine after such changes, so that it plans for them")
        # Batches that replay CUDA graphs (graphs.py): not where they always
        # run eagerly (pausing, pipeline stages, rerank pairs with types).
        self._graphs = getattr(self.runner, "graphs", None) \
            if not self.preempt and parallel == "data" and task != "rerank" else None
        batch_cfg = dict(
            max_batch_size=max_batch_size,
            max_request_tokens=min(self.max_length, self.memory_budget.tokens if self.memory_budget else 1 << 30),
            pad_token_id=pad if pad is not None else 0,
            cost=self.runner.name,
            # Packed batches are charged their attention too (len^2 per
            # sequence): per token a BERT layer's matmuls cost ~24 h^2 FLOPs,
            # attention ~4 h len, so len / (6 h) on top of each token.
            attention_tokens=6 * int(getattr(net.config, "hidden_size", 0) or 0) if packed else 0,
            preempt_layers=len(self.runner.blocks) if self.preempt else 0,
            # Batches padded up to token buckets (CUDA graphs, or ghosts on the
            # CPU: shapes.py) are formed to fill the bucket within the budget.
            token_buckets=self._graphs is not None or (self._ghost_pad is not None and self._ghost_buckets),
        )
        sched_cfg = _core.SchedulerConfig(
            max_queue_requests=max_queue,
            max_queue_tokens=max_queue * self.max_length if max_queue_tokens is None else max_queue_tokens,
            **batch_cfg)
        self._max_queue_tokens = sched_cfg.max_queue_tokens  # (Engine._pieces)
        ctl_cfg = _core.ControllerConfig(
            policy=policy,
            target_latency_s=target_latency_ms / 2000.0,
            min_tokens=min(min_batch_tokens, self.max_batch_tokens),
            max_tokens=self.max_batch_tokens,
            # static: every batch may carry max_batch_tokens (adaptive policies
            # start between the bounds and move)
            initial_tokens=self.max_batch_tokens if policy == "static" else 0,
        )
        # One controller per data-parallel replica; a pipeline's workers share one.
        controllers = 1 if parallel == "pipeline" else len(self._replicas)
        self._scheduler = _core.Scheduler(sched_cfg, ctl_cfg, clock, workers=controllers)
        # A pipeline's stages pass each batch on to one another: no warm-up there.
        # Its queue is its own: the engine's queue bounds, however small, never
        # keep the warm-up's two texts out.
        self._warmup_cfg = (_core.SchedulerConfig(**batch_cfg), ctl_cfg) if warmup and parallel == "data" else None
        self.request_timeout_s = None if request_timeout_s is None else admission.seconds(request_timeout_s)
        self._pending: dict[int, cf.Future] = {}
        self._lock = threading.Lock()  # guards _pending and the submit/register pair
        self._closing = False
        self._closed_out = False  # close()'s end done (_after_workers)
        self._worker_error: BaseException | None = None
        self._tokenize = _Timer()
        _all_engines.add(self)  # its locks made afresh in a forked child
        for r in self._replicas:
            name = "fastserve-worker" if len(self._replicas) == 1 else f"fastserve-worker-{r.index}"
            r.thread = threading.Thread(target=_worker_loop, args=(weakref.ref(self), r), name=name, daemon=True)
        self._worker = self._replicas[0].thread
        # On collection only: at exit, _close_open_engines closes what is open.
        # The finalizer holds the pending futures (whose callbacks refer to
        # the engine): an engine dropped with requests queued lives until
        # they are served, and every one resolves (_dropped).
        weakref.finalize(self, _dropped, self._scheduler, self._release_onednn, self._replicas, self._pending,
                         os.getpid()).atexit = False
        for r in self._replicas:
            r.thread.start()
        _open_engines.add(self)
        if self._warmup_cfg is not None:
            for r in self._replicas:
                r.warm.wait(WARMUP_WAIT_S)
        # Last, where nothing can refuse the engine any more (glibc's
        # thresholds cannot be put back as they were): malloc keeps freed
        # memory, and what construction made is long-lived too (process.py).
        self._process["malloc"] = process.keep_freed_memory() if tune_malloc and on_cpu else {"tuned": False}
        self._process["gc"] = process.freeze_gc() if freeze_gc else {"frozen": False}

    # ------------------------------------------------------------------ calls

    def embed(self, texts: str | Sequence[str], *, priority: int = 0, timeout: float | None = None,
              prompt_name: str | None = None, prompt: str | None = None) -> np.ndarray:
        """[dim] float32 for one text, [n, dim] for a list (of texts, or of
        token-id lists: see submit_many, which queues it).

        prompt_name / prompt: as SentenceTransformer.encode takes them: the
        prompt (one of the model's `prompts` by name, or given) is put in
        front of each text; with neither, the model's default prompt is (none
        when it has no default_prompt_name); prompt="" means no prompt. A
        given prompt wins over prompt_name."""
        self._require_task("embed")
        self._may_block("embed")
        if isinstance(texts, str):  # interrupted, it leaves the queue
            return result_of(self.submit(texts, priority=priority, timeout=timeout, prompt_name=prompt_name,
                                         prompt=prompt))
        return self._stack(results_of(self.submit_many(texts, priority=priority, timeout=timeout,
                                                       prompt_name=prompt_name, prompt=prompt)))

    def classify(self, texts: str | Sequence[str], *, priority: int = 0, timeout: float | None = None):
        """A Classification for one text, a list of them for a list."""
        self._require_task("classify")
        self._may_block("classify")
        if isinstance(texts, str):
            return result_of(self.submit(texts, priority=priority, timeout=timeout))
        return results_of(self.submit_many(texts, priority=priority, timeout=timeout))

    async def aembed(self, texts: str | Sequence[str], *, priority: int = 0, timeout: float | None = None,
                     prompt_name: str | None = None, prompt: str | None = None) -> np.ndarray:
        """embed, awaited: no thread waits, and cancelling the task cancels the requests."""
        self._may_await("aembed")
        self._require_task("embed")
        if isinstance(texts, str):
            return await asyncio.wrap_future(self.submit(texts, priority=priority, timeout=timeout,
                                                         prompt_name=prompt_name, prompt=prompt))
        return self._stack(await all_results(await self.asubmit_many(texts, priority=priority, timeout=timeout,
                                                                     prompt_name=prompt_name, prompt=prompt)))

    async def aclassify(self, texts: str | Sequence[str], *, priority: int = 0, timeout: float | None = None):
        """classify, awaited (as aembed)."""
        self._may_await("aclassify")
        self._require_task("classify")
        if isinstance(texts, str):
            return await asyncio.wrap_future(self.submit(texts, priority=priority, timeout=timeout))
        return await all_results(await self.asubmit_many(texts, priority=priority, timeout=timeout))

    def submit(self, text: str, *, priority: int = 0, timeout: float | None = None,
               prompt_name: str | None = None, prompt: str | None = None) -> cf.Future:
        """Queue one text; the future yields what embed/classify would return
        for it, and once done carries `future.timing` = {"queue_s",
        "inference_s"}. Raises QueueFullError at once when the queue is full,
        OverloadedError (a QueueFullError) when it is predicted to miss its
        deadline (timeout, else the engine's request_timeout_s).
        priority: higher runs first (every call's `priority` is this one).
        Waiting raises a request one level per 0.5 s, so a lower class cannot
        starve: work meant to stay behind others' (a bulk job) needs a priority
        far below theirs, -100 (50 s of waiting), not -1.
        prompt_name / prompt: as embed's."""
        self._refuse_if_forked()  # before the tokenizer's lock, which a thread of the parent may have held
        timeout = admission.check_timeout(timeout)
        p = self._prompt(prompt_name, prompt)
        return self._submit_one(self._tokens(self._prompted([text], p), self._lead(p)), priority, timeout, p)

    def submit_tokens(self, token_ids: Sequence[int], *, priority: int = 0, timeout: float | None = None,
                      prompt_name: str | None = None, prompt: str | None = None) -> cf.Future:
        """Queue one already tokenized input (ids of this engine's tokenizer,
        special tokens included), checked as validate_token_ids does.
        prompt_name / prompt: as submit_many's for token-id lists (the ids as
        tokenize() gives them with the same arguments: the prompt, the
        model's default one without them, already in front)."""
        self._refuse_if_forked()
        timeout = admission.check_timeout(timeout)
        p = self._prompt(prompt_name, prompt)
        return self._submit_one(self._validated([token_ids], self._lead(p)), priority, timeout, p)

    def submit_many(self, inputs: Sequence[str] | Sequence[Sequence[int]], *, priority: int = 0,
                    timeout: Timeout = None, prompt_name: str | None = None,
                    prompt: str | None = None) -> list[cf.Future]:
        """Queue a list of inputs, each its own request (so they batch with
        other callers' inputs), and return their futures in order (each as
        submit's).

        inputs: texts, or token-id lists (checked as validate_token_ids does);
        the first input says which. Every input is checked before any is
        queued: InvalidInputError names the first bad one's index. A list of
        more than TOKENIZE_PIECE_TEXTS texts is tokenized in pieces, each
        queued once tokenized (the model starts on the first while the rest
        tokenize), where no refusal needs the tokens (_pieces).
        timeout: seconds each input may wait in the queue (RequestTimeoutError
        after; one predicted to miss it is refused or shed early with
        OverloadedError), or a callable giving the seconds left (None: no
        limit), asked as each chunk is queued; what it raises fails the call.

        Backpressure: when the queue is full and nothing of this call is
        queued yet, QueueFullError (the call is refused whole). Once part of
        it is queued, the call blocks until there is room for the rest
        rather than fail half served. A call that fails part way cancels what
        it had queued.

        prompt_name / prompt: as embed's, for texts. Token-id lists are taken
        as tokenize() gives them with the same prompt arguments (the prompt
        already in front): on a model whose Pooling leaves the prompt out
        (include_prompt=False), that prompt's tokens are left out.

        Each future carries `.info` (InputInfo: the input's full token
        count, the tokens computed, truncated, chunks). With
        truncate="chunk", a long input's windows are queued as requests of
        their own (each starting with the prompt) and its future is theirs
        combined."""
        self._refuse_if_forked()
        p = self._prompt(prompt_name, prompt)
        requests, queued, spans = self._planned(inputs, p, timeout)
        futures = admission.submit_all(self._submitter(p), queued, priority, admission.timeout_callable(timeout),
                                       functools.partial(self._may_block, "submit_many waiting for room"))
        return self._answered(requests, queued, spans, futures)

    async def asubmit_many(self, inputs: Sequence[str] | Sequence[Sequence[int]], *, priority: int = 0,
                           timeout: Timeout = None,
                           wait: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
                           prompt_name: str | None = None, prompt: str | None = None) -> list[cf.Future]:
        """submit_many for the event loop: waiting for room in the queue is
        awaited, never blocking the loop; a call the queue takes at once does
        not suspend at all. A list of more than TOKENIZE_PIECE_TEXTS texts is
        tokenized in pieces in a worker thread (asyncio.to_thread), each
        piece queued once tokenized, so the loop goes on meanwhile, where no
        refusal needs the tokens (_pieces); other texts are tokenized in the
        calling thread (for a very large list of them, tokenize() it in a
        worker thread and pass the token lists). Cancelling the call cancels
        what it had queued.

        wait: when given, each wait for room goes through it (`await
        wait(awaitable)`), so a caller can end it early (the HTTP server ends
        it when the client leaves or its deadline passes); what it raises
        fails the call. `await fastserve.wait_all(futures)` gives the results.
        prompt_name / prompt: as submit_many's."""
        self._may_await("asubmit_many")
        p = self._prompt(prompt_name, prompt)
        requests, queued, spans = self._planned(inputs, p, timeout)
        futures = await admission.asubmit_all(self._submitter(p), queued, priority,
                                              admission.timeout_callable(timeout), wait)
        return self._answered(requests, queued, spans, futures)

    def validate_token_ids(self, token_lists: Sequence[Sequence[int]], *, prompt_name: str | None = None,
                           prompt: str | None = None) -> list[Sequence[int]]:
        """Token-id lists as the engine would queue them: each must be a
        non-empty sequence of int in [0, vocab_size); longer than max_length,
        it is cut to it (truncate "right"/"left": the tokenizer's special
        tokens around it kept when it carries them), split at submit
        ("chunk"), or refused ("error"). InvalidInputError names the first
        bad list's index (when there are several). The result, passed to
        submit_many with the same prompt arguments, is queued without a
        second check. prompt_name / prompt: the prompt the ids start with
        (the model's default without them), which starts every window of a
        chunked input."""
        return self._validated(token_lists, self._lead(self._prompt(prompt_name, prompt)))

    def _validated(self, token_lists: Sequence[Sequence[int]], lead: int = 0) -> list[Sequence[int]]:
        checked = admission.validate_token_ids(token_lists, vocab_size=self.vocab_size, max_length=1 << 62,
                                               truncate=False)
        return self._within_budget(self._fit.fit(checked, what="input", lead=lead))

    def tokenize(self, texts: Sequence[str], *, prompt_name: str | None = None,
                 prompt: str | None = None) -> list[list[int]]:
        """Token ids of each text, as the engine would submit them (the prompt
        in front as embed puts it, special tokens added, cut to max_length as
        `truncate` says); passed back to submit_many with the same prompt
        arguments, they are queued without being checked again."""
        admission.check_texts(texts, "tokenize")
        p = self._prompt(prompt_name, prompt)
        lists = self._tokens(self._prompted(texts, p), self._lead(p))
        return lists if isinstance(lists, admission.TokenLists) else admission.TokenLists(lists)

    # ------------------------------------------------------------- lifecycle

    def close(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the engine. The batch running now completes. Queued requests
        fail with EngineClosedError, or with drain=True are served first.
        Idempotent; new submissions raise EngineClosedError."""
        if self._forked:  # a forked child's copy: no workers, and the scheduler's locks may be held
            _open_engines.discard(self)
            return
        if drain:
            self._may_block("close(drain=True)")
        with self._lock:
            already = self._closing
            self._closing = True
        if drain and not already:
            with self._lock:
                outstanding = list(self._pending.values())
            cf.wait(outstanding, timeout=timeout)
        for rid in self._scheduler.close():
            self._fail(rid, EngineClosedError("the engine was closed before this request ran"))
        if _on_worker_thread():
            # From a worker (a done callback), this engine's or another's:
            # the workers end by themselves now the scheduler is closed.
            # Joining them here deadlocked two workers whose callbacks both
            # closed the engine (each joined the other), and two engines
            # whose callbacks closed each other the same way; a thread of
            # its own joins them, then lets go of what the engine holds
            # outside itself (oneDNN's switch, the pipeline's hooks). A
            # close() from outside, or the exit hook, joins here.
            threading.Thread(target=self._after_workers, name="fastserve-close", daemon=True).start()
            return
        self._after_workers()

    def _after_workers(self) -> None:
        """close()'s end, once the scheduler is closed: the workers joined,
        then what the engine holds outside itself let go (once)."""
        for r in self._replicas:
            r.thread.join()
        with self._lock:
            if self._closed_out:
                return
            self._closed_out = True
        if isinstance(self.runner, PipelineRunner):
            self.runner.close()
        # A worker's exception keeps its frames (the replica) in a cycle,
        # which gc.freeze() keeps for good if the worker died while the
        # engine was built.
        _forget_frames((self._worker_error, *(r.error for r in self._replicas)))
        # Anything still registered (a batch's futures if the worker died).
        with self._lock:
            left = list(self._pending)
        for rid in left:
            self._fail(rid, EngineClosedError("the engine was closed before this request ran"))
        _open_engines.discard(self)
        self._release_onednn()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def aclose(self, drain: bool = False, timeout: float | None = None) -> None:
        """close() for the event loop: the drain and the workers' exit are
        awaited in a thread, never blocking the loop. (Run on a worker's
        thread, that thread would join the worker: WorkerThreadError; call
        close() there.)"""
        if self._forked:  # as close() there: nothing to stop, and no error
            self.close()
            return
        self._may_await("aclose")
        await asyncio.to_thread(self.close, drain, timeout)

    async def __aenter__(self) -> "Engine":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    def check_options(**options: Any) -> None:
        """The checks Engine(**options) makes before it loads anything: a
        TypeError for a keyword it does not take, a ValueError for a bad value
        (fastserve.ray.app runs them before deploying)."""
        bound = inspect.signature(Engine).bind(**options)
        bound.apply_defaults()
        for name in _SWITCHES:
            _switch(name, bound.arguments[name])
        _check_options(**{k: bound.arguments[k] for k in inspect.signature(_check_options).parameters})
        # The workers' devices as named (not whether this machine has them:
        # the replicas' may differ) and the dtype's name.
        a = bound.arguments
        replicas_.check_workers(a["device"], a["devices"], a["replicas"], a["parallel"])
        precision.check_dtype(a["dtype"])
        footprint.check_mib(a["max_batch_memory_mb"])

    def health(self) -> dict[str, Any]:
        # Serving while any worker is: a replica that died leaves the others
        # serving ("degraded"); the engine fails only with the last one.
        live = sum(r.alive for r in self._replicas)
        alive = live > 0
        return {
            "healthy": alive and not self._closing and not self._forked and self._worker_error is None,
            "worker_alive": alive,
            "closed": self._closing or self._forked,  # a forked child's copy refuses work as a closed engine
            "error": repr(self._worker_error) if self._worker_error else None,
            "replicas": len(self._replicas),
            "replicas_alive": live,
            "degraded": 0 < live < len(self._replicas),
        }

    def stats(self) -> dict[str, Any]:
        # In a forked child the scheduler's lock may have been held at the
        # fork (as close() there, stats() leaves the scheduler alone): its
        # counts are the parent's anyway.
        self._refuse_if_forked()
        s = self._scheduler.stats()
        s["tokenize_s"] = self._tokenize.summary()
        s["model"] = self.model_name
        s["task"] = self.task
        s["device"] = str(self.device)
        s["dtype"] = self.precision.name  # float32 / float16 / bfloat16 / autocast
        s["weights_dtype"] = str(self.dtype).removeprefix("torch.")
        s["compute_dtype"] = str(self.precision.compute).removeprefix("torch.")
        s["cpu"] = precision.cpu_features()
        s["execution"] = self.runner.name
        # The runner's family adapter, and why the engine runs padded when it does.
        s["family"] = self._choice.family
        s["padded_reason"] = self._choice.reason
        # Packed execution only (None when padded): the packing kernels'
        # implementation (cpu / cuda: the extension's; torch: the fallback),
        # the attention method, and batches by the attention that actually ran.
        kernels = getattr(self.runner, "kernels", None)
        s["kernels"] = kernels.name if kernels is not None else None
        s["attention"] = getattr(self.runner, "attention", None)
        # Packed layers through the CPU kernels only (else None): how their
        # matrix products run, "mm" or "onednn" (python/fastserve/gemm.py).
        s["gemm"] = getattr(self.runner, "gemm", None)
        # Padded only: the Hugging Face model's own attention implementation.
        s["model_attention"] = None if self.runner.name == "packed" else \
            (getattr(self.model.config, "_attn_implementation", None) or "eager")
        s["attention_batches"] = replicas_.attention_batches(self._replicas)
        # The CUDA graphs (python/fastserve/graphs.py), each set once (replicas
        # on one device share their runner's); None: none are used.
        graphs = list({id(g): g for r in self._replicas if (g := getattr(r.runner, "graphs", None))}.values())
        s["cuda_graphs"] = [g.stats() for g in graphs] or None
        # Each worker's warm-up batch, seconds (None: none ran, or it failed).
        s["warmup_s"] = [r.warmup_s for r in self._replicas]
        s["activation"] = self.activation
        s["pooling"] = self.pooling
        s["max_length"] = self.max_length
        s["max_batch_tokens"] = self.max_batch_tokens
        # Each worker's own count (set in its thread; None: torch's, a GPU
        # worker or torch_threads=0), not the count of the thread asking.
        s["torch_threads"] = [r.threads for r in self._replicas]
        s["process"] = copy.deepcopy(self._process)
        s["memory"] = process.memory_report(self.device)
        # Bytes of the layer weights' copies the fused layers keep: oneDNN's
        # reordered ones (gemm="onednn") and autocast's bfloat16 ones.
        s["memory"]["gemm_weights_bytes"] = sum(f.extra_bytes for f in getattr(self.runner, "fused", None) or ()
                                                   if f is not None)
        # The activation formula's view (python/fastserve/footprint.py): bytes
        # per token the scheduler counts, the largest batch allowed, and the
        # budget it comes from (None: max_batch_tokens alone).
        formula = self._activation_formula
        s["memory"]["activations"] = {
            "bytes_per_token": self._activation_bytes_per_token,
            "max_batch_bytes": formula.running_bytes(self.max_batch_tokens) if formula is not None else None,
            "max_batch_memory_mb": self.memory_budget.mib if self.memory_budget else None,
        }
        s["health"] = self.health()
        # Each worker: device, threads, batches, failures, its controller.
        ctls = s.get("controllers") or []
        s["parallel"] = self.parallel
        s["replicas"] = [r.report(ctls[r.index] if self.parallel == "data" and r.index < len(ctls) else None)
                         for r in self._replicas]
        s["pipeline"] = self.runner.report() if isinstance(self.runner, PipelineRunner) else None
        return s

    @functools.cached_property
    def vocab_size(self) -> int:
        # Cached: every token-id list is checked against it, and a
        # transformers config's attribute lookup is slow.
        return int(self.model.config.vocab_size)

    @property
    def dim(self) -> int:
        return len(self.labels) if self.task != "embed" else self._head.dim(int(self.model.config.hidden_size))

    # -------------------------------------------------------------- internals

    def _require_task(self, task: str) -> None:
        if self.task != task:
            raise InvalidInputError(f"this engine was built with task={self.task!r}; use Engine(task={task!r})")

    def _stack(self, rows: list) -> np.ndarray:
        if not rows:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.stack(rows)

    def _tokens(self, texts: Sequence[Any], lead: int = 0) -> list[list[int]]:
        """Texts as token lists, fitted to max_length (lead: a prompt's tokens, for chunk windows)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"text{admission.where(i, len(texts))} must be a str, got {type(t).__name__}")
        if not texts:
            return []
        t0 = time.perf_counter()
        try:
            enc = self._encode(list(texts))
        except (UnicodeError, TypeError, ValueError) as e:
            raise admission.untokenizable("text", texts, e) from e
        self._tokenize.add(time.perf_counter() - t0, len(texts))
        lists = self._fit.fit(enc, texts, lead=lead)
        if self._vocab_gap is not None:
            admission.in_vocabulary(lists, self.vocab_size, self._vocab_gap)
        return self._within_budget(lists)

    def _side_tokenizer(self, truncate: str) -> Any:
        """The tokenizer, cutting on the side truncate="left" / "right" names
        (a copy where that is not its own: the caller's is not changed)."""
        if truncate not in ("left", "right") or getattr(self.tokenizer, "truncation_side", "right") == truncate:
            return self.tokenizer
        tok = copy.copy(self.tokenizer)
        tok.truncation_side = truncate
        return tok

    def _make_fit(self, truncate: str, overlap: int) -> Fit:
        template = Template.detect(self.tokenizer)
        retokenize = None
        if template is None and truncate in ("right", "left"):  # the tokenizer cuts
            retokenize = TextEncoder(self._side_tokenizer(truncate), self.max_length, True, self._private_tokenizer)
        window = self.max_length
        if truncate == "chunk" and self.memory_budget is not None:  # windows any batch can hold
            window = min(window, self.memory_budget.tokens)
        try:
            return Fit(truncate, window, template=template, overlap=overlap, retokenize=retokenize)
        except ValueError as e:
            if window == self.max_length:
                raise
            raise ValueError(f"{e}: the windows are cut to {window} tokens, the most one batch holds within "
                             f"max_batch_memory_mb (max_length {self.max_length})") from e

    def _planned(self, inputs: Sequence[Any], prompt: str, timeout: Timeout) -> tuple[Sequence, Sequence,
                                                                                       Optional[list]]:
        """(the inputs as token lists, what gets queued, each input's [start,
        end) in it): with truncate="chunk" a long input's windows are queued,
        otherwise the lists themselves (spans None), tokenized as they are
        queued where _pieces allows. On a closed engine EngineClosedError,
        an empty list's too."""
        self._refuse_if_forked()
        with self._lock:
            self._refuse_if_closed()
        pieces = self._pieces(inputs, prompt, timeout)
        if pieces is not None:
            return pieces, pieces, None
        requests = self._requests(inputs, prompt)
        if self.truncate != "chunk":
            return requests, requests, None
        flat, spans = self._fit.split(requests, self._lead(prompt))
        return requests, flat, spans

    def _pieces(self, inputs: Sequence[Any], prompt: str, timeout: Timeout) -> Optional["_TokenizedPieces"]:
        """A list of more than TOKENIZE_PIECE_TEXTS texts as token lists
        tokenized piece by piece as submit_all queues them, where nothing
        but the text itself can refuse one: every input is checked first (a
        str, valid Unicode: the InvalidInputError names the first bad
        input's index, before anything is queued), and no check needs the
        tokens or the whole list: truncate "right" or "left"; every token id
        in the model's vocabulary; any input fitting the memory budget and
        the queue's max_queue_tokens; no text without tokens (the tokenizer
        adds special tokens); and no timeout, since the scheduler refuses a
        list whose own work misses its deadline only seeing all of it. Else
        None: the list is tokenized whole first (_planned)."""
        if (type(inputs) is not list or len(inputs) <= TOKENIZE_PIECE_TEXTS or not isinstance(inputs[0], str)
                or timeout is not None or self.truncate not in ("right", "left") or self._vocab_gap is not None
                or (self.memory_budget is not None and self.memory_budget.tokens < self.max_length)
                or self._max_queue_tokens < self.max_length or not self._empty_text_has_tokens()):
            return None
        n = len(inputs)
        for i, t in enumerate(inputs):
            if not isinstance(t, str):
                raise InvalidInputError(f"text{admission.where(i, n)} must be a str, got {type(t).__name__}")
            # (isascii is a flag CPython keeps: only other texts are encoded to look for a lone surrogate)
            found = None if t.isascii() else admission.not_unicode(f"text{admission.where(i, n)}", t)
            if found is not None:
                raise found
        # A copy: the caller's list may change once the call (aembed) yields.
        return _TokenizedPieces(list(inputs), functools.partial(self._requests, prompt=prompt),
                                TOKENIZE_PIECE_TEXTS)

    def _empty_text_has_tokens(self) -> bool:
        """Whether every text, "" too, gets at least one token: the special
        tokens the tokenizer's template puts around it (found at
        construction, inputs.Template), so that no text queues an empty
        request, which the scheduler refuses. Without a template: not known."""
        template = self._fit.template
        return template is not None and bool(template.prefix or template.suffix)

    def _answered(self, requests, queued, spans, futures: list[cf.Future]) -> list[cf.Future]:
        """One future per input: its own, with `.info`, or its windows' combined."""
        if spans is not None:
            return self._combine(requests, queued, spans, futures)
        attach(futures, infos_of(requests))
        return futures

    def _combine(self, requests, flat, spans, parts: list[cf.Future]) -> list[cf.Future]:
        """Each input's future over its windows' (truncate="chunk")."""
        out = []
        for info, (a, b) in zip(infos_of(requests), spans):
            # n_i: the tokens each window's pooling averaged (a prompt it
            # leaves out, pooled_from, not among them).
            weights = [len(ids) - getattr(p, "pooled_from", 0) for ids, p in zip(flat[a:b], parts[a:b])]
            g = Gathered(parts[a:b], functools.partial(weighted_mean, weights=weights, normalize=self.normalize))
            g.info = info
            out.append(g)
        return out

    def _within_budget(self, token_lists: list) -> list:
        """token_lists, or InvalidInputError for the first input no batch
        within max_batch_memory_mb can hold (a chunking engine's windows are
        cut to fit: _make_fit)."""
        budget = self.memory_budget
        if budget is not None and budget.tokens < self.max_length and self.truncate != "chunk":
            for i, ids in enumerate(token_lists):
                if len(ids) > budget.tokens:
                    raise budget.refuse(len(ids), admission.where(i, len(token_lists)))
        return token_lists

    def _submit_tokens(self, ids: Sequence[int], priority: int, timeout: float | None,
                       pooled_from: int = 0) -> cf.Future:
        timeout = self.request_timeout_s if timeout is None else timeout
        priority = admission.check_priority(priority)
        fut: cf.Future = cf.Future()
        fut.pooled_from = pooled_from  # type: ignore[attr-defined]
        if self._typed_pairs:  # a pair's token types, as submit_many carries them
            tasks.mark_segments([fut], [ids])
        with self._lock:
            self._refuse_if_closed()
            rid = _queued(self._scheduler.submit, ids, priority, timeout)
            self._pending[rid] = fut
        fut.add_done_callback(lambda f, rid=rid: self._on_done(rid, f))
        return fut

    def _submit_one(self, lists, priority: int, timeout: float | None, prompt: str = "") -> cf.Future:
        """Queue one input (a one-item list from _tokens or validate_token_ids,
        `prompt` already in front)."""
        if self.truncate == "chunk":  # its windows, queued together or refused at once, then combined
            timeout = self.request_timeout_s if timeout is None else timeout  # one request: the default deadline
            flat, spans = self._fit.split(lists, self._lead(prompt))
            # All windows or none: QueueFullError or OverloadedError (the
            # last one predicted late) refuses the text as one request;
            # windows past the queue's bounds, InvalidInputError.
            try:
                parts = self._submit_prefix(flat, priority, timeout, self._pooled_from(prompt), whole=True)
            except InvalidInputError as e:
                raise InvalidInputError(f"the text's windows: {e}") from e
            return self._combine(lists, flat, spans, parts)[0]
        fut = self._submit_tokens(lists[0], priority, timeout, self._pooled_from(prompt))
        fut.info = lists.infos[0]
        return fut

    def _refuse_if_forked(self) -> None:
        """EngineClosedError in a forked child, checked before any lock (one
        may have been held at the fork by a thread the child does not have)."""
        if self._forked:
            raise EngineClosedError(_FORKED)

    def _refuse_if_closed(self) -> None:
        """Under self._lock: no new request once the engine is closing; the
        error names the worker's fault when that is why."""
        self._refuse_if_forked()
        if self._closing:
            if self._worker_error is not None:
                raise EngineClosedError(f"the engine's worker died: {self._worker_error!r}")
            raise EngineClosedError("the engine is closed")

    def _submit_prefix(self, token_lists: Sequence[Sequence[int]], priority: int,
                       timeout: float | None, pooled_from: int = 0, whole: bool = False,
                       waiting: bool = False) -> list[cf.Future]:
        """Queue as many of token_lists as fit (with `whole`, all or none),
        in order, under one lock (the worker sees them at once, not one by
        one): their futures. A list is one job: without `timeout` its items
        have no deadline (the engine's request_timeout_s is for single
        requests, _submit_tokens). `waiting`: none fitting is an empty list,
        not a refusal (admission's wait for room)."""
        priority = admission.check_priority(priority)
        # The futures are made before the lock: made under it, a list's 4,096
        # held it for 20 ms, with the workers unable to take a batch and every
        # other caller's submit waiting (benchmarks/README.md, "Tokenizing
        # while the model runs"). All of them on a first try; a few while the
        # call waits for room (it tries again every admission.PAUSE_S), the
        # rest under the lock where more fit.
        ahead = self._futures(token_lists[: len(token_lists) if not waiting else WAITING_FUTURES], pooled_from)
        with self._lock:
            self._refuse_if_closed()
            rids = _queued(self._scheduler.submit_many, token_lists, priority, timeout, None, whole, waiting)
            if len(rids) > len(ahead):
                ahead += self._futures(token_lists[len(ahead) : len(rids)], pooled_from)
            futures = ahead[: len(rids)]
            self._pending.update(zip(rids, futures))
        for rid, fut in zip(rids, futures):
            fut.add_done_callback(functools.partial(self._on_done, rid))
        return futures

    def _futures(self, token_lists: Sequence[Sequence[int]], pooled_from: int) -> list[cf.Future]:
        """A future per token list, carrying what the worker reads from it
        (where pooling starts; a pair's segment)."""
        futures = [cf.Future() for _ in token_lists]
        for fut in futures:
            fut.pooled_from = pooled_from  # type: ignore[attr-defined]
        if self._typed_pairs:
            tasks.mark_segments(futures, token_lists)
        return futures

    def _requests(self, inputs: Sequence[Any], prompt: str = "") -> list[Sequence[int]]:
        """A list of inputs as the token lists submit_many queues."""
        tokens = (lambda texts: self._tokens(self._prompted(texts, prompt), self._lead(prompt))) if prompt \
            else self._tokens
        return admission.token_lists(inputs, tokens, functools.partial(self._validated, lead=self._lead(prompt)),
                                     self.vocab_size)

    def _prompt(self, prompt_name: str | None, prompt: str | None) -> str:
        """The prompt text SentenceTransformer.encode would use."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidInputError(f"prompt must be a str, got {type(prompt).__name__}")
            try:  # the tokenizer would raise its own TypeError on it (a chunked text's lead, a prompt's length)
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise admission.untokenizable("prompt", [prompt], e) from None
            return prompt
        if prompt_name is not None:
            if not isinstance(prompt_name, str):
                raise InvalidInputError(f"prompt_name must be a str, got {type(prompt_name).__name__}")
            if prompt_name not in self.prompts:
                known = ", ".join(repr(k) for k in sorted(self.prompts)) or "none"
                raise InvalidInputError(f"prompt_name {prompt_name!r} is not one of this model's prompts ({known})")
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None:
            return self.prompts[self.default_prompt_name]
        return ""

    @staticmethod
    def _prompted(texts: Sequence[Any], prompt: str) -> Sequence[Any]:
        if not prompt:
            return texts
        return [prompt + t if isinstance(t, str) else t for t in texts]

    def _pooled_from(self, prompt: str) -> int:
        """Where pooling starts in a text with this prompt in front: past the
        prompt's tokens when the model's Pooling leaves them out, else 0."""
        if not prompt or not self._head.needs_prompt_lengths:
            return 0
        return self._prompt_length(prompt)

    def _lead(self, prompt: str) -> int:
        """The prompt's content tokens (special tokens aside), which start
        every window of a chunked input."""
        if not prompt or self.truncate != "chunk":
            return 0
        n = self._prompt_leads.get(prompt)
        if n is None:
            content = self._fit.template.content
            alone = content(self._private_tokenizer(prompt, add_special_tokens=True)["input_ids"])[1]
            n = len(alone)
            # Only the tokens a text in front of them leaves as they are: a
            # trailing space is a token of its own alone (byte-level BPE's
            # "Ġ", SentencePiece's "▁") but joins the text's first word.
            for probe in ("x", "A"):
                joined = content(self._private_tokenizer(prompt + probe, add_special_tokens=True)["input_ids"])[1]
                n = min(n, next((i for i, (a, b) in enumerate(zip(alone, joined)) if a != b), len(alone)))
            _remember(self._prompt_leads, prompt, n)
        return n

    def _prompt_length(self, prompt: str) -> int:
        n = self._prompt_tokens.get(prompt)
        if n is None:
            n = prompt_length(self._private_tokenizer, prompt, self.max_length)
            _remember(self._prompt_tokens, prompt, n)
        return n

    def _submitter(self, prompt: str) -> Callable[..., list[cf.Future]]:
        n = self._pooled_from(prompt)
        return functools.partial(self._submit_prefix, pooled_from=n) if n else self._submit_prefix

    def _on_done(self, rid: int, fut: cf.Future) -> None:
        if fut.cancelled():
            if not self._forked:  # (a forked child leaves the scheduler alone: its lock may be held)
                self._scheduler.cancel(rid)
            with self._lock:
                mine = self._pending.pop(rid, None) is not None
            if mine:  # left the queue (not taken by a worker, which notifies those it takes):
                fut.set_running_or_notify_cancel()  # cf.wait / as_completed count it done

    def _may_block(self, what: str, how: str = "called") -> None:
        """Before a call that waits for the engine: EngineClosedError in a
        forked child; WorkerThreadError on a worker thread of any engine (a
        done callback, a model hook): on this engine's it would wait for
        itself, and on another's a cycle of such waits (each engine's
        callbacks calling the other) would hold both for good."""
        self._refuse_if_forked()
        if _on_worker_thread():
            raise _worker_thread_error(what, how)

    def _may_await(self, what: str) -> None:
        """_may_block for a coroutine (aembed, ascore, aclose, ...), checked
        when it runs, not when it is made: run to completion on a worker
        (asyncio.run in a done callback) it waits for the workers as a
        blocking call does; handed to an event loop in another thread
        (asyncio.run_coroutine_threadsafe) it runs there as any."""
        self._may_block(what, "run")

    def _take_all(self, rids) -> list[cf.Future | None]:
        """The futures of requests leaving the queue (one lock for the whole
        batch), None where the caller no longer wants the result."""
        with self._lock:
            futs = [self._pending.pop(int(rid), None) for rid in rids]
        return [f if f is not None and _claim(f) else None for f in futs]

    def _take(self, rid: int) -> cf.Future | None:
        return self._take_all((rid,))[0]

    def _fail(self, rid: int, error: BaseException) -> None:
        fut = self._take(rid)
        if fut is not None:
            _settle(fut, error=error)

    def _make_replicas(self, devices: list, torch_threads: int | None, cudnn_attention: bool,
                       make_runner: Callable[[Any, Any, bool], Any]) -> list[replicas_.Replica]:
        """The workers: for a pipeline, one per stage over one staged runner;
        else one per device entry, sharing the model (and a runner copy) with
        an earlier replica on the same device, a copy of the model otherwise."""
        threads = replicas_.threads_per_worker(torch_threads, devices)
        if self.parallel == "pipeline":
            staged = PipelineRunner(self.runner, devices, self.model)
            return [replicas_.Replica(k, devices[0], staged, threads, self._sdpa_backends)
                    for k in range(len(devices))]
        out: list[replicas_.Replica] = []
        for k, dev in enumerate(devices):
            same = next((r for r in out if r.device == dev), None)
            if k == 0:
                runner, backends = self.runner, self._sdpa_backends
            elif same is not None:
                runner, backends = replicas_.runner_copy(same.runner), same.sdpa_backends
            else:
                net, how = process.prepare_model(self.model, dev, self.dtype, callers=True, copy_model=True)
                runner = make_runner(net, dev, how == "copied")
                backends, _ = process.sdpa_backends_for(dev, cudnn_attention)
            out.append(replicas_.Replica(k, dev, runner, threads, backends, self._tokens_per_thread))
        return out

    def _pausing(self, batch, replica: replicas_.Replica, futures: list) -> tuple[Callable, dict]:
        """The runner's hook between two layers of `batch`: the scheduler may
        hand back urgent requests, run at once through the same runner (never
        paused themselves) before `batch` resumes. Rows of `batch` the pause
        would make late (a lower class: Scheduler.preempt) fail now with
        OverloadedError and the hook returns the mask of rows to keep.
        state: "paused", the seconds urgent batches took; "live", the rows
        still computed."""
        sched, runner = self._scheduler, replica.runner
        state: dict[str, Any] = {"paused": 0.0, "live": np.ones(batch.size, bool)}

        def pause(done: int, layers: int) -> Optional[np.ndarray]:
            urgent = sched.preempt(batch, done / layers)
            if urgent is None:
                return None
            keep = None
            if urgent.shed:
                late = dict(zip((int(i) for i in urgent.shed), urgent.shed_retry_after_s))
                live = np.flatnonzero(state["live"])
                keep = np.array([int(batch.ids[i]) not in late for i in live])
                for i in live[~keep]:
                    state["live"][i] = False
                    if futures[i] is not None:
                        _settle(futures[i], error=overloaded(late[int(batch.ids[i])]))
            t = time.perf_counter()
            runner.pause_hook = None
            try:
                self._run(urgent, replica)
            finally:
                runner.pause_hook = pause
                state["paused"] += time.perf_counter() - t
            return keep

        return pause, state

    def _handle(self, batch, replica: replicas_.Replica) -> None:
        """One batch from the scheduler: its expired and shed requests
        failed, the rest run (_worker_loop)."""
        for rid in batch.expired:
            self._fail(int(rid), RequestTimeoutError("the request's deadline passed before it could run"))
        for rid, late in zip(batch.shed, batch.shed_retry_after_s):
            self._fail(int(rid), overloaded(late))
        if batch.size:
            self._run(batch, replica)

    def _worker_died(self, replica: replicas_.Replica, worker: int, e: BaseException) -> None:
        """A worker's loop raised (its thread then ends, raising it): with
        other replicas serving, it is retired; the last one closes the engine."""
        replica.error = e
        replica.warm.set()  # failed before its warm-up: the constructor waits no longer
        if any(r.alive for r in self._replicas):
            if self.parallel == "data":  # admission plans with the live workers only
                self._scheduler.retire(worker)
            return  # the other replicas keep serving (health() reports this one)
        self._worker_error = e
        with self._lock:
            self._closing = True
        for rid in self._scheduler.close():
            self._fail(rid, EngineClosedError(f"the engine's worker died: {e!r}"))
        with self._lock:
            left = list(self._pending)
        for rid in left:
            self._fail(rid, EngineClosedError(f"the engine's worker died: {e!r}"))

    def _warm_up(self, replica: replicas_.Replica) -> None:
        """One batch of two short texts through the replica's runner, as _run
        runs a batch (same contexts), from a scheduler of its own: nothing
        is counted, no controller learns from it. A failure is only recorded
        (stats()["warmup_s"] None): the same fault fails the first real batch
        with a typed error."""
        try:
            if self._warmup_cfg is None:
                return
            scratch = _core.Scheduler(*self._warmup_cfg, None, workers=1)
            texts = ["fastserve warms up", "a worker's first batch"]
            for ids in self._fit.fit(self._encode(texts), texts):
                scratch.submit(ids)
            batch = scratch.next_batch(1.0, 0)
            if batch is None or not batch.size:
                return
            counts = getattr(replica.runner, "attention_batches", None)
            before = dict(counts) if counts is not None else None
            t0 = time.perf_counter()
            try:
                # No caller: no prompt, one segment.
                self._compute(batch, [None] * batch.size, replica, replica.threads_for(self._batch_tokens(batch)))
            finally:
                if before is not None:  # stats()["attention_batches"] counts served batches only
                    counts.update(before)
            replica.warmup_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - recorded; the first real batch reports it
            # Without its frames: they hold this engine and the replica, a
            # cycle gc.freeze() would keep past close().
            replica.warmup_error = e.with_traceback(None)
        finally:
            replica.warm.set()

    def _run(self, batch, replica: replicas_.Replica) -> None:
        # The futures first: once taken (running) none can be cancelled, so a
        # cancel() that returned True is a request never computed. Those
        # cancelled since the batch was assembled, and those whose deadline
        # passed since, leave the batch at start.
        ids = [int(rid) for rid in batch.ids]
        taken = dict(zip(ids, self._take_all(ids)))
        expired = {int(rid) for rid in self._scheduler.start(batch, [rid for rid, f in taken.items() if f is None])}
        for rid in expired:
            _settle(taken[rid], error=RequestTimeoutError("the request's deadline passed before it could run"))
        if not batch.size:
            return
        # The rows left, in the batch's order (start keeps it).
        futures = [f for rid, f in taken.items() if f is not None and rid not in expired]
        runner = replica.runner
        threads = replica.threads_for(self._batch_tokens(batch))
        pausing = self.preempt and runner.pause_hook is None  # an urgent batch runs whole
        state: dict[str, Any] = {"paused": 0.0, "live": None}
        # A CUDA graph captured on this batch is set-up, not the batch's cost:
        # its seconds are left out of what the scheduler's fits learn from.
        graphs = getattr(runner, "graphs", None)
        captured = graphs.capture_s if graphs is not None else 0.0
        t0 = time.perf_counter()
        try:
            if pausing:
                runner.pause_hook, state = self._pausing(batch, replica, futures)
            rows = self._compute(batch, futures, replica, threads)
        except BatchAbandoned:  # a pause dropped every row (each failed then)
            rows = []
        except Exception as e:
            replica.record(batch.size, time.perf_counter() - t0, failed=True, threads=threads)
            self._scheduler.fail(batch)
            for fut in futures:
                if fut is not None:
                    err = InferenceError(f"the model raised on this request's batch: {e!r}")
                    err.__cause__ = e
                    _settle(fut, error=err)
            return
        except BaseException as e:  # the worker is dying: its batch must not hang
            replica.record(batch.size, time.perf_counter() - t0, failed=True, threads=threads)
            self._scheduler.fail(batch)
            others = any(r.alive for r in self._replicas if r is not replica)
            for fut in futures:
                if fut is not None:
                    # With other replicas serving, the engine is not closing:
                    # only this batch is lost (never re-queued: docs/design.md).
                    err = (ReplicaFailedError(f"replica {replica.index} ({replica.device}) died running this "
                                              f"request's batch: {e!r}") if others
                           else EngineClosedError(f"the engine's worker died: {e!r}"))
                    err.__cause__ = e
                    _settle(fut, error=err)
            raise
        finally:
            if pausing:
                runner.pause_hook = None
        compute = time.perf_counter() - t0 - state["paused"]
        if graphs is not None:
            compute = max(compute - (graphs.capture_s - captured), 1e-6)
        replica.record(batch.size, compute, threads=threads)
        self._scheduler.complete(batch, compute, self._ghost_tokens(batch))
        queued = batch.assembled_at - batch.arrivals
        live = state["live"]
        if live is not None and not live.all():  # rows dropped at a pause: already failed
            futures, queued = [f for f, keep in zip(futures, live) if keep], queued[live]
        for fut, row, q in zip(futures, rows, queued):
            if fut is not None:
                # Per-request timing for callers that report it (HTTP headers).
                fut.timing = {"queue_s": float(q), "inference_s": compute}
                try:
                    result = self._result(row)
                except Exception as e:  # this request's answer, not the worker: the batch's others are settled
                    err = InferenceError(f"the model's output for this request could not be read: {e}")
                    err.__cause__ = e
                    _settle(fut, error=err)
                else:
                    _settle(fut, result)

    def _compute(self, batch, futures: Sequence[Optional[cf.Future]], replica: replicas_.Replica,
                 threads: Optional[int]) -> Any:
        """The replica's rows for the batch, on `threads` torch threads
        (Replica.threads_for), in the contexts every batch runs in, with what
        the requests' futures carry: a prompt's length (pooled from there)
        and a pair's token types."""
        if any(map(_TRAINING, self._model_modules)):
            # A model shared with its caller, put back in training mode
            # (dropout on) after the engine was built over it.
            raise RuntimeError("the model (or a module of it) is in training mode (train() was called after the "
                               "engine was built over it): call model.eval() to serve again, or build the Engine "
                               "over a copy")
        with replica.batch_threads(threads), replica.sdpa_backends(), self._precision_context(), self._onednn():
            extra = {}
            if self._head.needs_prompt_lengths and self.task == "embed":
                extra["prompt_lengths"] = np.array(
                    [getattr(f, "pooled_from", 0) if f is not None else 0 for f in futures])
            if self._typed_pairs:  # the pairs' token types, carried on their futures
                extra["segments"] = tasks.segments_of(futures, batch.lengths)
            return self._rows(batch, extra, replica.runner)

    def _batch_tokens(self, batch) -> int:
        """The tokens the runner computes for the batch: its real tokens and
        ghosts where batches are packed, B x L where they are padded."""
        if self.runner.name == "packed":
            return int(batch.total_tokens) + self._ghost_tokens(batch)
        return int(batch.padded_tokens)

    def _ghost_tokens(self, batch) -> int:
        """The tokens of the ghost sequences _rows adds to the batch (none
        where batches are not padded)."""
        tokens = int(batch.total_tokens)
        if self._graphs is not None:  # a CUDA graph's ghosts (graphs.py)
            shape = self._graphs.shape(tokens, int(batch.size))
            return 0 if shape is None else shape[0] - tokens
        if self._ghost_pad is None:
            return 0
        return shapes.target(tokens, self._ghost_buckets) - tokens

    def _rows(self, batch, extra: dict, runner: Any) -> Any:
        """The (replica's) runner's rows for the batch; where batches are padded
        with ghost sequences (shapes.py), their rows dropped."""
        ghost = None if self._ghost_pad is None else \
            shapes.ghosted(batch, self.max_length, self._ghost_pad, self._ghost_buckets)
        if ghost is None:
            return runner.run(batch, **extra)
        lengths = ghost.lengths[-ghost.ghosts:]
        fills = {"prompt_lengths": np.zeros_like(lengths), "segments": lengths}  # no prompt; all token type 0
        rows = runner.run(ghost, **{k: shapes.extend(v, fills[k]) for k, v in extra.items()})
        return rows[: len(rows) - ghost.ghosts]

    def _result(self, row: np.ndarray):
        if self.task == "classify":
            if row.shape[-1] != len(self.labels):
                raise ValueError(f"the model gives {row.shape[-1]} scores per input but its config names "
                                 f"{len(self.labels)} labels (config.id2label / num_labels)")
            best = int(row.argmax())
            return Classification(
                label=self.labels[best],
                score=float(row[best]),
                scores={label: float(p) for label, p in zip(self.labels, row)},
            )
        return row.copy()
