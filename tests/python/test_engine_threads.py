"""Engines and the threads around them: a forked child refuses its parent's
engine at once even where a lock was held at the fork; a worker thread of
any engine (where done callbacks and model hooks run) refuses the calls
that wait for an engine, the async forms run to completion there included,
and closes another engine without joining; an engine dropped with
fire-and-forget requests queued serves every one; every exception
round-trips through pickle. Workers are held by events (tiny_models.Gate,
or a loop that waits to start), never by sleeps; a call that could hang is
bounded (a child process, a subprocess, or asyncio.wait_for)."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import pickle
import queue
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from fastserve import Engine, EngineClosedError, WorkerThreadError, errors, tasks
from fastserve import engine as engine_mod

DIM = 32  # tiny BERT's hidden width


@pytest.fixture(scope="module")
def bert():
    return tm.model("bert")


# ------------------------------------------------------------------ fork


def _locks_of(engine) -> list:
    """The engine's own locks a caller's thread takes on the way to
    queueing a request (tokenizing included)."""
    locks = [engine._lock, engine._tokenize._lock]
    if isinstance(engine._private_tokenizer, tasks.PrivateTokenizer):
        locks.append(engine._private_tokenizer._lock)
    return locks


def _calls_in_child(engine, out) -> None:
    """Each call's outcome, put as it is known (a hang shows which call)."""
    calls = {
        "submit": lambda: engine.submit("from the child"),
        "submit_tokens": lambda: engine.submit_tokens([101, 2023, 102]),
        "submit_many": lambda: engine.submit_many(["a", "b"]),
        "submit_many ids": lambda: engine.submit_many([[101, 2023, 102]]),
        "embed": lambda: engine.embed("x"),
        "embed list": lambda: engine.embed(["x", "y"]),
        "aembed": lambda: asyncio.run(engine.aembed("x")),
        "aembed list": lambda: asyncio.run(engine.aembed(["x", "y"])),
        "asubmit_many": lambda: asyncio.run(engine.asubmit_many(["x"])),
        "stats": engine.stats,
    }
    for name, call in calls.items():
        try:
            call()
            out.put((name, "returned"))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out.put((name, f"{type(e).__name__}: {e}"))
    # Allowed there, without hanging: close (a no-op), health, tokenize.
    engine.close()
    engine.close(drain=True)
    asyncio.run(engine.aclose())
    out.put(("health", engine.health()))
    out.put(("tokenize", engine.tokenize(["tokenized in the child"])[0][:1]))
    out.put(("done", None))


def test_a_forked_child_refuses_at_once_though_the_engines_locks_were_held_at_the_fork(bert):
    """A thread of the parent held the engine's lock (a caller queueing, the
    worker taking a batch) when the process forked: the child's copy of the
    lock stays held for good, and its submit() waited on it forever instead
    of raising EngineClosedError; stats() went into the scheduler, whose
    mutex may be held the same way."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    ctx = multiprocessing.get_context("fork")
    with Engine(bert, tm.tokenizer(), replicas=1) as engine:
        engine.embed("the private tokenizer made")  # (every lock exists before the fork)
        held, let_go = threading.Event(), threading.Event()

        def hold():
            locks = _locks_of(engine)
            for lock in locks:
                lock.acquire()
            held.set()
            let_go.wait(120)
            for lock in reversed(locks):
                lock.release()

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert held.wait(30)
        out = ctx.Queue()
        child = ctx.Process(target=_calls_in_child, args=(engine, out), daemon=True)
        try:
            child.start()
            seen: dict = {}
            while "done" not in seen:
                try:
                    name, what = out.get(timeout=60)
                except queue.Empty:
                    pytest.fail(f"the child hung after {list(seen)}")
                seen[name] = what
            child.join(60)
            assert child.exitcode == 0
        finally:
            let_go.set()
            if child.is_alive():
                child.kill()
            holder.join(30)
        for name in ("submit", "submit_tokens", "submit_many", "submit_many ids", "embed", "embed list", "aembed",
                     "aembed list", "asubmit_many", "stats"):
            assert seen[name].startswith("EngineClosedError: this engine was made before the process forked"), \
                (name, seen[name])
        assert seen["health"]["closed"] and not seen["health"]["healthy"]
        assert seen["tokenize"] == [101]
        assert engine.embed("the parent serves on").shape == (DIM,)


# ------------------------------------------------- any engine's workers


def _closes_each_other() -> str:
    """A script: two engines whose done callbacks close each other, then a
    normal exit (the exit hook closes what is open)."""
    return (
        "import threading, fastserve, tiny_models as tm\n"
        "a, b = (fastserve.Engine(tm.model('bert'), tm.tokenizer(), replicas=1, warmup=False) for _ in range(2))\n"
        "gates = [tm.Gate(a), tm.Gate(b)]\n"
        "fa, fb = a.submit('held in a'), b.submit('held in b')\n"
        "assert all(g.entered.wait(30) for g in gates)\n"
        "closed = {'a': threading.Event(), 'b': threading.Event()}\n"
        "fa.add_done_callback(lambda f: (b.close(), closed['b'].set()))\n"
        "fb.add_done_callback(lambda f: (a.close(), closed['a'].set()))\n"
        "for g in gates: g.release.set()\n"
        "print('closes returned:', all(e.wait(30) for e in closed.values()), flush=True)\n"
        "workers = [r.thread for e in (a, b) for r in e._replicas]\n"
        "for t in workers: t.join(30)\n"
        "print('workers alive:', any(t.is_alive() for t in workers), flush=True)\n"
        "print('results:', fa.result(30).shape, fb.result(30).shape, flush=True)\n"
        "for e in (a, b):\n"
        "    try:\n"
        "        e.submit('after')\n"
        "    except fastserve.EngineClosedError:\n"
        "        print('refused after close', flush=True)\n"
    )


def test_two_engines_whose_done_callbacks_close_each_other_end_and_the_process_exits():
    """close() took the non-joining path only on its own engine's worker:
    each worker joined the other engine's, forever, and the exit hook with
    them (a subprocess, so that the old hang is a bounded failure)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, "-c", _closes_each_other()], capture_output=True, text=True,
                              timeout=180, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the process hung: {(e.stdout or b'')[-2000:]!r}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "closes returned: True" in proc.stdout, proc.stdout
    assert "workers alive: False" in proc.stdout, proc.stdout
    assert f"results: ({DIM},) ({DIM},)" in proc.stdout, proc.stdout
    assert proc.stdout.count("refused after close") == 2, proc.stdout


def test_blocking_calls_on_another_engines_worker_are_refused(bert):
    """A done callback of engine a (on a's worker) waiting for engine b: were
    b's callbacks to wait for a the same way, both would wait for good. The
    calls that wait are refused on any engine's worker; submit() is not."""
    with Engine(bert, tm.tokenizer(), replicas=1) as a, Engine(bert, tm.tokenizer(), replicas=1) as b:
        seen: dict = {}
        ran = threading.Event()

        def callback(_):
            seen.update(tm.outcomes((("embed", lambda: b.embed("inner")),
                                     ("embed list", lambda: b.embed(["x", "y"])),
                                     ("close drain", lambda: b.close(drain=True)))))
            seen["submit"] = b.submit("queued on b from a's worker")
            seen["submit_many"] = b.submit_many(["room for it"])
            ran.set()

        a.submit("outer").add_done_callback(callback)
        assert ran.wait(30)
        for name in ("embed", "embed list", "close drain"):
            assert isinstance(seen[name], WorkerThreadError), (name, seen[name])
            assert "fastserve worker thread 'fastserve-worker'" in str(seen[name]), str(seen[name])
        assert seen["submit"].result(timeout=30).shape == (DIM,)
        assert seen["submit_many"][0].result(timeout=30).shape == (DIM,)
        assert not b.health()["closed"] and b.embed("b serves on").shape == (DIM,)


# --------------------------------------------------- async on a worker


def _run_bounded(coro, seconds: float = 10.0):
    """What asyncio.run(coro) gives, bounded, so that a coroutine waiting for
    the worker it runs on fails (TimeoutError) instead of hanging the test:
    a loop of its own, closed without waiting for its executor's threads
    (asyncio.run waits for them, and aclose's thread would join this worker)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, seconds))
    except BaseException as e:  # noqa: BLE001 - recorded for the assertions
        return e
    finally:
        loop.close()


def test_an_async_form_run_to_completion_on_a_worker_is_refused(bert):
    """asyncio.run(engine.aembed(x)) in a done callback waited for the worker
    it ran on (with one worker, every caller with it): each async form now
    raises WorkerThreadError when it runs on any engine's worker."""
    with Engine(bert, tm.tokenizer(), replicas=1) as engine, Engine(bert, tm.tokenizer(), replicas=1) as other:
        seen: dict = {}
        ran = threading.Event()
        forms = {
            "aembed": lambda: engine.aembed("inner"),
            "aembed list": lambda: engine.aembed(["x", "y"]),
            "asubmit_many": lambda: engine.asubmit_many(["x"]),
            "asubmit_pairs": lambda: engine.asubmit_pairs([("q", "d")]),
            "ascore": lambda: engine.ascore([("q", "d")]),
            "arerank": lambda: engine.arerank("q", ["d"]),
            "aextract": lambda: engine.aextract("x"),
            "another engine's aembed": lambda: other.aembed("inner"),
            "aclose": lambda: engine.aclose(),
        }

        def callback(_):
            for name, make in forms.items():
                seen[name] = _run_bounded(make())
            ran.set()

        engine.submit("outer").add_done_callback(callback)
        assert ran.wait(120)
        for name in forms:
            assert isinstance(seen[name], WorkerThreadError), (name, seen[name])
            what = name.split()[-1] if name.startswith("another") else name.split()[0]
            assert f"{what} was run on the fastserve worker thread" in str(seen[name]), str(seen[name])
        assert not engine.health()["closed"]
        assert engine.embed("serves on").shape == (DIM,) and other.embed("too").shape == (DIM,)


def test_a_coroutine_made_on_a_worker_runs_on_another_threads_loop(bert):
    """Making the coroutine on a worker is fine (the check is made when it
    runs): handed to an event loop in another thread it serves as usual."""
    loop = asyncio.new_event_loop()
    looping = threading.Thread(target=loop.run_forever, daemon=True)
    looping.start()
    try:
        with Engine(bert, tm.tokenizer(), replicas=1) as engine:
            handed: dict = {}
            ran = threading.Event()

            def callback(_):
                handed["one"] = asyncio.run_coroutine_threadsafe(engine.aembed("handed over"), loop)
                handed["list"] = asyncio.run_coroutine_threadsafe(engine.aembed(["a", "b"]), loop)
                handed["many"] = asyncio.run_coroutine_threadsafe(engine.asubmit_many(["c"]), loop)
                ran.set()

            engine.submit("outer").add_done_callback(callback)
            assert ran.wait(30)
            assert handed["one"].result(timeout=30).shape == (DIM,)
            assert handed["list"].result(timeout=30).shape == (2, DIM)
            assert handed["many"].result(timeout=30)[0].result(timeout=30).shape == (DIM,)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        looping.join(30)
        loop.close()


# --------------------------------------------- dropped with work queued


def test_an_engine_dropped_with_fire_and_forget_requests_queued_serves_every_one(bert, monkeypatch):
    """Futures held only by their done callbacks, the engine dropped without
    close() while they are queued, the cyclic collector running: engine ->
    pending -> future -> callback -> engine was collected as garbage, the
    queued requests dropped with it and their callbacks never called. The
    worker waits to start its loop (holding no reference to the engine
    meanwhile), so the requests are still queued when the collector runs."""
    go = threading.Event()
    real = engine_mod._worker_loop

    def waits_to_start(ref, replica):
        go.wait(60)
        real(ref, replica)

    monkeypatch.setattr(engine_mod, "_worker_loop", waits_to_start)
    n = 200
    called: list = []  # each future, once per call of its callback

    def on_done(f):
        called.append(f)  # (list.append: atomic)

    engine = Engine(bert, tm.tokenizer(), replicas=1, warmup=False, freeze_gc=False, request_timeout_s=None)
    try:
        for i in range(n):
            engine.submit_tokens([101, 2000 + i % 100, 102]).add_done_callback(on_done)  # futures not kept
        gone = weakref.ref(engine)
        worker = engine._replicas[0].thread
        del engine
        gc.collect()
        assert gone() is not None, "the engine was collected with requests queued"
    finally:
        go.set()
    tm.until(lambda: len(called) >= n, "every callback to be called")
    assert len(called) == n and len({id(f) for f in called}) == n  # each exactly once (all kept: ids distinct)
    assert all(f.exception() is None and f.result().shape == (DIM,) for f in called)
    called.clear()  # (a done future keeps its callbacks, which refer to the engine)
    # Served, the engine is collected and its worker ends.
    tm.until(lambda: gc.collect() is not None and gone() is None, "the served engine to be collected")
    worker.join(30)
    assert not worker.is_alive()


# ---------------------------------------------------------------- pickle


def _examples() -> dict[str, BaseException]:
    overloaded = errors.OverloadedError("overloaded")
    overloaded.retry_after_s = 0.25
    return {
        "EngineClosedError": EngineClosedError("the engine is closed"),
        "FastServeError": errors.FastServeError("base"),
        "InferenceError": errors.InferenceError("the model raised"),
        "InvalidInputError": errors.InvalidInputError("bad input"),
        "ModelLoadError": errors.ModelLoadError("cannot load"),
        "OverloadedError": overloaded,
        "QueueFullError": errors.QueueFullError("full"),
        "ReplicaFailedError": errors.ReplicaFailedError("replica 1 died"),
        "RequestTimeoutError": errors.RequestTimeoutError("late"),
        "StageError": errors.StageError(1, torch.device("cpu"), ValueError("stage fault")),
        "UnsupportedModelError": errors.UnsupportedModelError("Pooling", "why"),
        "WorkerThreadError": WorkerThreadError("on a worker"),
    }


@pytest.mark.parametrize("name", errors.__all__)
def test_every_exception_round_trips_through_pickle_with_its_attributes(name):
    """StageError and UnsupportedModelError take other arguments than their
    message: unpickling called them with the message alone (TypeError), so a
    process pool or Ray could not hand them back."""
    e = _examples()[name]
    assert type(e) is getattr(errors, name)
    e.note = "an attribute set after"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is type(e) and back.args == e.args and str(back) == str(e)
    assert back.__dict__ == e.__dict__
    assert vars(back).get("note") == "an attribute set after"
    expected = {"OverloadedError": {"retry_after_s": 0.25}, "StageError": {"stage": 1, "device": torch.device("cpu")},
                "UnsupportedModelError": {"module": "Pooling"}}.get(name, {})
    for attr, value in expected.items():
        assert getattr(back, attr) == value


def test_an_oserror_kind_keeps_its_errno_and_filename_through_pickle():
    e = errors.ModelLoadError(2, "No such file or directory", "/no/model")
    back = pickle.loads(pickle.dumps(e))
    assert (back.errno, back.strerror, back.filename, str(back)) == (e.errno, e.strerror, e.filename, str(e))
