"""An engine's lifetime seen from its callers: cancelled futures count as
done for concurrent.futures' waits (close(drain=True) included), blocking
calls from the engine's own worker thread (done callbacks, model hooks) are
refused instead of waiting for themselves, an interrupted single-text call
leaves the queue, a forked child gets a typed error from its parent's engine,
and an engine dropped without close() is freed with its threads. The worker
is held by a Gate wherever requests must stay queued; no sleeps decide an
outcome."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import multiprocessing
import signal
import threading
import weakref

import pytest

import fastserve
import tiny_models as tm
from fastserve import Engine, EngineClosedError, _core, process


@pytest.fixture(scope="module")
def bert():
    return tm.model("bert")


def test_a_cancelled_queued_request_counts_as_done_for_wait_and_as_completed(bert):
    with Engine(bert, tm.tokenizer(), replicas=1) as engine:
        with tm.held(engine):
            f = engine.submit("queued, then cancelled")
            assert f.cancel()
            done, not_done = cf.wait([f], timeout=30)
            assert done == {f} and not not_done
            assert list(cf.as_completed([f], timeout=30)) == [f]
            g = engine.submit("a chunk of a list, cancelled with it")
            h = engine.submit_many(["a", "b"])
            for x in (g, *h):
                x.cancel()
            assert not cf.wait([g, *h], timeout=30).not_done
        assert engine.stats()["queue_depth"] == 0


def test_close_with_drain_returns_when_a_request_it_waits_for_is_cancelled(bert):
    engine = Engine(bert, tm.tokenizer(), replicas=1)
    with tm.held(engine) as gate:
        f = engine.submit("queued")
        closing = threading.Thread(target=engine.close, kwargs={"drain": True}, daemon=True)
        closing.start()
        tm.until(lambda: engine.health()["closed"], "close(drain=True) to start waiting")
        assert f.cancel()
        gate.release.set()
        closing.join(30)
        assert not closing.is_alive(), "close(drain=True) kept waiting for a cancelled request"


def test_blocking_calls_from_a_done_callback_are_refused_and_the_engine_serves_on(bert):
    """A done callback runs on the worker that finished the future: a call
    that waits for the engine there would wait for itself (one worker: every
    caller hung, deadlines included). Non-blocking submit() works."""
    with Engine(bert, tm.tokenizer(), replicas=1) as engine:
        seen: dict[str, object] = {}
        ran = threading.Event()

        def callback(_):
            seen.update(tm.outcomes((("embed", lambda: engine.embed("inner")),
                                     ("embed list", lambda: engine.embed(["a", "b"])),
                                     ("submit_many", lambda: engine.submit_many(["a"])),
                                     ("close drain", lambda: engine.close(drain=True)))))
            seen["submit"] = engine.submit("queued from the callback")
            seen["thread"] = threading.current_thread().name
            ran.set()

        engine.submit("outer").add_done_callback(callback)
        assert ran.wait(30)
        assert seen["thread"] == "fastserve-worker"
        for name in ("embed", "embed list", "close drain"):
            assert isinstance(seen[name], fastserve.WorkerThreadError), (name, seen[name])
            assert "worker thread" in str(seen[name])
        # a list with room is queued without waiting: allowed
        assert [f.result(timeout=30).shape for f in seen["submit_many"]] == [(32,)]
        assert seen["submit"].result(timeout=30).shape == (32,)
        assert engine.embed("after", timeout=30).shape == (32,)
        assert not engine.health()["closed"]


class CallbackEscape(BaseException):
    """Not an Exception: concurrent.futures logs a callback's Exception but lets this through."""


@pytest.mark.parametrize("escape", [SystemExit, asyncio.CancelledError, CallbackEscape])
def test_a_done_callback_raising_a_base_exception_fails_no_other_request(bert, escape, caplog):
    # One caller's callback raises past `except Exception` on the worker: the
    # batch's other requests are still settled, an expired request's too, and
    # the worker serves on (it died, leaving them RUNNING for good).
    def bad_callback(_):
        raise escape("a caller's callback")

    clock = _core.ManualClock(0.0)
    with Engine(bert, tm.tokenizer(), replicas=1, clock=clock) as engine, caplog.at_level("ERROR", "fastserve"):
        with tm.held(engine):
            batch = engine.submit_many(["a", "b", "c"])
            batch[0].add_done_callback(bad_callback)
            late = engine.submit("expires", timeout=0.5)
            late.add_done_callback(bad_callback)
            after = engine.submit("queued behind it")
            clock.advance(1.0)
        assert [f.result(timeout=30).shape for f in (*batch, after)] == [(32,)] * 4
        with pytest.raises(fastserve.RequestTimeoutError):
            late.result(timeout=30)
        assert engine.health()["healthy"] and engine.health()["replicas_alive"] == 1
        assert engine.embed("still serving").shape == (32,)
    assert sum("a done callback raised" in r.getMessage() for r in caplog.records) == 2


def test_a_list_from_a_done_callback_that_would_wait_for_room_is_refused(bert):
    with Engine(bert, tm.tokenizer(), replicas=1, max_queue=2) as engine:
        got: list = []
        ran = threading.Event()

        def callback(_):
            try:
                got.append(engine.submit_many([f"text {i}" for i in range(5)]))
            except Exception as e:  # noqa: BLE001
                got.append(e)
            ran.set()

        engine.submit("outer").add_done_callback(callback)
        assert ran.wait(30)
        assert isinstance(got[0], fastserve.WorkerThreadError) and "waiting for room" in str(got[0])
        tm.until(lambda: engine.stats()["queue_depth"] == 0, "what the refused list queued to leave")
        assert engine.embed(["still", "serving"]).shape == (2, 32)


def test_a_model_hook_that_calls_the_engine_fails_its_batch_not_the_engine(bert):
    with Engine(bert, tm.tokenizer(), replicas=1, execution="padded") as engine:
        inner: list = []

        def hook(module, args, output):
            if not inner:
                try:
                    engine.embed("from inside the model")
                except fastserve.WorkerThreadError as e:
                    inner.append(e)
            return output

        handle = engine.model.encoder.layer[0].register_forward_hook(hook)
        try:
            assert engine.embed("outer").shape == (32,)
        finally:
            handle.remove()
        assert len(inner) == 1
        assert engine.embed("after").shape == (32,)


def test_an_interrupted_single_text_call_leaves_the_queue(bert):
    """Ctrl-C while embed(text) waits: its request is cancelled, as a list's
    are, not computed later for nobody."""
    with Engine(bert, tm.tokenizer(), replicas=1) as engine:
        with tm.held(engine):
            main = threading.main_thread().ident

            def interrupt():
                tm.until(lambda: engine.stats()["queue_depth"] == 1, "the call's request to be queued")
                signal.pthread_kill(main, signal.SIGINT)

            t = threading.Thread(target=interrupt, daemon=True)
            t.start()
            with pytest.raises(KeyboardInterrupt):
                engine.embed("interrupted")
            t.join(30)
            assert engine.stats()["queue_depth"] == 0
        assert engine.embed("after").shape == (32,)


def _child_uses_parents_engine(engine, out) -> None:
    try:
        engine.submit("from the child")
        out.put("accepted")
    except fastserve.EngineClosedError as e:
        out.put(f"refused: {e}")
    engine.close()  # a no-op there, and no hang at exit either


def test_a_forked_child_gets_a_typed_error_from_its_parents_engine(bert):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    ctx = multiprocessing.get_context("fork")
    with Engine(bert, tm.tokenizer()) as engine:
        out = ctx.Queue()
        child = ctx.Process(target=_child_uses_parents_engine, args=(engine, out))
        child.start()
        answer = out.get(timeout=60)
        child.join(60)
        assert child.exitcode == 0
        assert answer.startswith("refused: this engine was made before the process forked"), answer
        assert engine.embed("the parent serves on").shape == (32,)


def test_an_engine_dropped_without_close_is_freed_with_its_threads(bert):
    def use_and_drop():
        engine = Engine(bert, tm.tokenizer())
        assert engine.embed("once").shape == (32,)
        return weakref.ref(engine), [r.thread for r in engine._replicas]

    ref, threads = use_and_drop()
    # The worker lets go of the engine once it has finished with the batch
    # (just after the caller got its result).
    tm.until(lambda: gc.collect() is not None and ref() is None, "the dropped engine to be freed")
    for t in threads:
        t.join(30)
        assert not t.is_alive()


def test_an_empty_list_on_a_closed_engine_is_refused_as_any_call(bert):
    """embed([]) and submit_many([]) returned empty results after close()."""
    e = Engine(bert, tm.tokenizer())
    e.close()
    for call in (lambda: e.embed([]), lambda: e.submit_many([]), lambda: asyncio.run(e.aembed([])),
                 lambda: asyncio.run(e.asubmit_many([]))):
        with pytest.raises(EngineClosedError):
            call()


def test_async_with_and_aclose_drain_without_blocking_the_loop(bert):
    """No async close: close(drain=True) could only block the event loop."""
    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        async with Engine(bert, tm.tokenizer()) as e:
            with tm.held(e) as gate:
                queued = e.submit_many(["a", "b", "c"])
                ticker = asyncio.ensure_future(tick())
                closing = asyncio.ensure_future(e.aclose(drain=True))
                await asyncio.sleep(0.05)
                assert not closing.done() and ticks > 0  # the loop runs while the drain waits
                gate.release.set()
                await closing
                ticker.cancel()
            assert all(f.result().shape == (e.dim,) for f in queued)  # drained, not failed
        with pytest.raises(EngineClosedError):
            e.submit("after")

    asyncio.run(main())


def test_close_from_done_callbacks_on_two_workers_returns_and_the_workers_end():
    """Each callback's close() joined the other worker: both waited forever,
    and so did the exit hook."""
    import types

    engine = Engine(tm.model("bert"), tm.tokenizer(), replicas=2)
    gates = [tm.Gate(types.SimpleNamespace(runner=r.runner)) for r in engine._replicas]
    futures = []
    for i in range(2):
        f = engine.submit(f"request {i}")
        f.add_done_callback(lambda f: engine.close())
        futures.append(f)
        tm.until(lambda: sum(g.entered.is_set() for g in gates) == i + 1, "each worker to hold a request")
    for g in gates:
        g.release.set()
    tm.until(lambda: not any(r.thread.is_alive() for r in engine._replicas), "both workers to end")
    assert all(f.result(timeout=30).shape == (engine.dim,) for f in futures)
    closing = threading.Thread(target=engine.close, daemon=True)
    closing.start()
    closing.join(30)
    assert not closing.is_alive()
    with pytest.raises(EngineClosedError):
        engine.submit("after")


def test_a_request_cancelled_after_its_batch_was_assembled_is_not_computed(bert):
    """cancel() in the instant between the scheduler assembling a batch and
    the worker taking its futures returned True, and the row was computed
    anyway, counted completed. Made deterministic: the cancel happens as the
    worker starts to take the futures."""
    with Engine(bert, tm.tokenizer(), replicas=1) as engine:
        gate = tm.Gate(engine, hold_first=False)
        take = engine._take_all
        said = {}

        def cancel_then_take(rids):
            if "doomed" in said:
                said["cancel"] = said.pop("doomed").cancel()  # the caller's cancel(), in the window
            return take(rids)

        engine._take_all = cancel_then_take
        before = engine.stats()
        with tm.held(engine):
            kept, doomed = engine.submit_many(["kept", "doomed"])
            said["doomed"] = doomed
        assert kept.result(timeout=30).shape == (engine.dim,)
        assert said["cancel"] is True and doomed.cancelled()
        after = engine.stats()
    assert len(gate.seen) == 2  # the holder and "kept": "doomed" never reached the model
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["completed"] - before["completed"] == 2


# The engine freezes the collector's objects once built (gc.freeze()): a
# reference cycle alive then is never collected, so a closed engine must be
# freed by reference counting (or through cycles made after it was built).
def _closed_engine_is_freed(make, use=lambda e: e.embed(["one", "two"])) -> None:
    engine = make()
    assert engine.stats()["process"]["gc"]["frozen"]
    use(engine)
    gone = [weakref.ref(engine), weakref.ref(engine.runner), weakref.ref(engine.model)]
    threads = [r.thread for r in engine._replicas]
    engine.close()
    for t in threads:
        t.join(30)
    del engine
    # (The model stays where the caller holds it.)
    tm.until(lambda: gc.collect() is not None and all(g() is None for g in gone[:2]),
             "the closed engine and its runner to be freed", 10)
    return gone[2]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_a_closed_pipeline_engine_is_freed_and_leaves_the_model_without_hooks(execution):
    # copy_model=False: the stages' hooks go on the caller's model itself.
    m = tm.model("bert")
    _closed_engine_is_freed(lambda: Engine(m, tm.tokenizer(), devices=["cpu", "cpu"], parallel="pipeline",
                                           execution=execution, copy_model=False))
    assert _hooks(m) == 0
    m(**{k: v for k, v in tm.tokenizer()(["still a model"], return_tensors="pt").items()
         if k in ("input_ids", "attention_mask")})


def test_a_refused_pipeline_leaves_the_callers_model_without_hooks():
    m = tm.model("bert")
    with pytest.raises(ValueError, match="preempt=True"):
        Engine(m, tm.tokenizer(), devices=["cpu", "cpu"], parallel="pipeline", execution="padded",
               copy_model=False, preempt=True)
    assert _hooks(m) == 0
    m(**{k: v for k, v in tm.tokenizer()(["still a model"], return_tensors="pt").items()
         if k in ("input_ids", "attention_mask")})


def _failing_first_forward(fault: type) -> tuple:
    """A tiny BERT whose first forward (the warm-up batch's) raises `fault`,
    and the count of its forwards."""
    m = tm.model("bert")
    calls = [0]

    def once(module, args):
        calls[0] += 1
        if calls[0] == 1:
            raise fault("injected into the warm-up batch")

    m.register_forward_pre_hook(once)
    return m, calls


@pytest.mark.parametrize("fault", [RuntimeError, SystemExit])
def test_an_engine_whose_warm_up_raised_is_freed_once_closed(fault):
    # A fault in the warm-up batch is recorded (RuntimeError), or ends the
    # worker (SystemExit); either way its frames must not keep the engine.
    m, calls = _failing_first_forward(fault)
    _closed_engine_is_freed(lambda: Engine(m, tm.tokenizer(), execution="padded", replicas=1),
                            use=lambda e: e.health())
    assert calls[0] >= 1


@pytest.mark.parametrize("task", ["embed", "rerank"])
def test_an_engine_served_over_http_is_freed_once_the_app_is_gone(task, tmp_path):
    # FastAPI keeps endpoints in module-level caches: none may hold the engine.
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from fastserve.server.app import create_app

    if task == "embed":
        make = lambda: Engine(tm.model("bert"), tm.tokenizer())  # noqa: E731
        post = ("/v1/embeddings", {"input": ["hello", "world"]})
    else:
        tm.model("bert", classify=True, num_labels=1).save_pretrained(tmp_path / "ce")
        tm.tokenizer().save_pretrained(tmp_path / "ce")
        make = lambda: Engine(str(tmp_path / "ce"), task="rerank")  # noqa: E731
        post = ("/rerank", {"query": "q", "texts": ["a", "b"]})

    async def serve(e):
        app = create_app(e)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.edge), base_url="http://app") as c:
            r = await c.post(post[0], json=post[1])
            assert r.status_code == 200, r.text
            for path in ("/health", "/ready", "/metrics", "/v1/models", f"/v1/models/{e.model_name}"):
                assert (await c.get(path)).status_code == 200, path

    model = _closed_engine_is_freed(make, use=lambda e: asyncio.run(serve(e)))
    tm.until(lambda: gc.collect() is not None and model() is None, "its model to be freed", 10)


def test_a_pipeline_closed_from_a_callback_or_dropped_leaves_the_callers_model_working():
    # close() from a worker's done callback cannot join the workers: a thread
    # of its own does, then takes the stages' hooks off the caller's model.
    # Dropped without close(), the hooks stay for good: outside a pipeline
    # batch they do nothing but place the inputs.
    enc = {k: v for k, v in tm.tokenizer()(["still a model"], return_tensors="pt").items()
           if k in ("input_ids", "attention_mask")}
    m = tm.model("bert")
    engine = Engine(m, tm.tokenizer(), devices=["cpu", "cpu"], parallel="pipeline", execution="padded",
                    copy_model=False, warmup=False)
    closed, go = threading.Event(), threading.Event()
    gate = m.encoder.layer[0].register_forward_pre_hook(lambda *a: go.wait(30) and None)  # the batch waits
    f = engine.submit("close me")
    f.add_done_callback(lambda f: (engine.close(), closed.set()))  # attached before the batch ends
    go.set()
    assert closed.wait(30)
    gate.remove()
    tm.until(lambda: _hooks(m) == 0, "the stages' hooks to come off once the workers end")
    m(**enc)
    gone = weakref.ref(engine)
    del engine, f  # (the future's own callbacks refer to the engine)
    tm.until(lambda: gc.collect() is not None and gone() is None, "the closed engine to be freed", 10)
    dropped = Engine(m, tm.tokenizer(), devices=["cpu", "cpu"], parallel="pipeline", execution="padded",
                     copy_model=False, warmup=False)
    dropped.embed("once")
    gone = weakref.ref(dropped)
    del dropped
    tm.until(lambda: gc.collect() is not None and gone() is None, "the dropped engine to be freed", 10)
    assert _hooks(m) > 0
    m(**enc)


def test_close_from_a_done_callback_lets_go_of_what_the_engine_holds_outside_itself():
    # The workers cannot be joined from one of them: a thread of its own
    # joins them, then releases the engine's oneDNN registration (a bfloat16
    # engine keeps oneDNN on for every float32 engine while it lives) and its
    # place among the engines the exit hook closes.
    from fastserve import engine as engine_mod

    users = process._onednn_users
    engine = Engine(tm.model("bert"), tm.tokenizer(), dtype="bfloat16", replicas=1, warmup=False)
    assert process._onednn_users == users + 1 and engine in engine_mod._open_engines
    f = engine.submit("close me")
    f.add_done_callback(lambda f: engine.close())
    f.result(timeout=60)
    tm.until(lambda: process._onednn_users == users and engine not in engine_mod._open_engines,
             "the closing thread to let go")
    assert not engine._replicas[0].thread.is_alive()
    engine.close()  # again, from outside: nothing twice
    assert process._onednn_users == users


def test_an_engine_whose_worker_died_while_it_was_built_is_freed_when_dropped():
    # The worker's exception (kept for health()) holds its frames: neither
    # they nor the engine's finalizer may leave the model alive for good.
    m, _ = _failing_first_forward(SystemExit)
    engine = Engine(m, tm.tokenizer(), execution="padded", replicas=1)
    assert not engine.health()["healthy"] and "injected" in engine.health()["error"]
    threads = [r.thread for r in engine._replicas]
    gone = [weakref.ref(engine), weakref.ref(engine.runner)]
    for t in threads:
        t.join(30)
    del engine
    tm.until(lambda: gc.collect() is not None and all(g() is None for g in gone), "the dropped engine to be freed", 10)
