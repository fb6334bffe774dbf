"""Data-parallel replicas in one engine (Engine(replicas=N), devices=[...]):
one queue, a worker, runner and controller per replica, per-replica faults,
health, stats and metrics. Concurrency is made deterministic with gates that
hold each replica's worker inside its batch."""

from __future__ import annotations

import contextlib
import threading
import types

import numpy as np
import pytest
import torch

import fastserve
import tiny_models as tm
from fastserve import Engine, _core, process, replicas


@pytest.fixture(scope="module")
def bert():
    return tm.model("bert")


def gate(replica) -> tm.Gate:
    """A Gate on one replica's runner (holds that worker's first batch)."""
    return tm.Gate(types.SimpleNamespace(runner=replica.runner))


def entered(gates, exclude=()) -> tm.Gate:
    """The gate (not in exclude) whose worker took a batch."""
    found: list = []
    tm.until(lambda: found.extend(g for g in gates if g.entered.is_set() and g not in exclude) or found,
             "a replica to take the batch")
    return found[0]


class WorkerKiller(BaseException):
    """Escapes `except Exception`: kills the worker thread."""


def kill(batch):
    raise WorkerKiller("replica lost")


def both_held(gates) -> None:
    tm.until(lambda: all(g.entered.is_set() for g in gates), "both replicas held")


@contextlib.contextmanager
def expected_thread_deaths():
    """A worker's death is expected here: not printed by threading's hook."""
    hook = threading.excepthook
    threading.excepthook = lambda args: None
    try:
        yield
    finally:
        threading.excepthook = hook


# -------------------------------------------------------------- construction


@pytest.mark.parametrize("kwargs, match", [
    (dict(replicas=0), "replicas must be a positive int"),
    (dict(replicas=True), "replicas must be a positive int"),
    (dict(replicas="2"), "replicas must be a positive int"),
    (dict(devices="every"), "devices must be 'all'"),
    (dict(devices=[]), "non-empty list"),
    (dict(devices=["cpu", 3]), "name each device"),
    (dict(device="cpu", devices=["cpu"]), "either device= or devices="),
    (dict(parallel="tensor"), "parallel must be one of"),
    (dict(parallel="pipeline"), "at least two devices"),
    (dict(devices=["cpu", "cpu"], parallel="pipeline", replicas=2), "replicas must be 1"),
])
def test_bad_scale_out_arguments_are_refused_before_anything_changes(bert, kwargs, match):
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=match):
        Engine(bert, tm.tokenizer(), **kwargs)
    assert torch.get_num_threads() == threads


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_devices_all_without_a_gpu_says_so(bert):
    with pytest.raises(ValueError, match="found no visible GPU"):
        Engine(bert, tm.tokenizer(), devices="all")


def test_worker_devices_and_thread_shares():
    cpu = torch.device("cpu")
    assert replicas.worker_devices("cpu", None, 3, "data") == [cpu] * 3
    assert replicas.worker_devices("auto", ["cpu", "cpu"], 2, "data") == [cpu] * 4
    assert replicas.worker_devices("auto", ["cpu", "cpu"], None, "pipeline") == [cpu, cpu]
    cores = process.usable_cores()
    assert replicas.threads_per_worker(None, [cpu] * 2) == max(1, cores // 2)
    assert replicas.threads_per_worker(None, [cpu] * (4 * cores)) == 1
    assert replicas.threads_per_worker(3, [cpu] * 2) == 3
    assert replicas.threads_per_worker(0, [cpu] * 2) is None


def test_the_default_is_two_replicas_on_a_multi_core_cpu_when_the_engine_sizes_the_threads(bert, real_default_replicas):
    cores = process.usable_cores()
    assert replicas.default_replicas("cpu", None, "data", None) == (2 if cores >= 2 else None)
    assert replicas.default_replicas("cpu", None, "data", 1) is None  # torch_threads given: one replica
    assert replicas.default_replicas("auto", ["cpu", "cpu"], "data", None) is None  # devices given: one each
    assert replicas.default_replicas("cpu", None, "pipeline", None) is None
    texts = tm.mixed_texts(24, seed=5)
    with Engine(bert, tm.tokenizer(), replicas=1) as one:
        expected = one.embed(texts)
    with Engine(bert, tm.tokenizer()) as engine:
        got = engine.embed(texts)
        s = engine.stats()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    share = max(1, cores // 2)
    assert [r["torch_threads"] for r in s["replicas"]] == ([share, share] if cores >= 2 else [cores])
    # The workers' counts, not the asking thread's (it said 2 where each worker ran 1).
    assert s["torch_threads"] == [r["torch_threads"] for r in s["replicas"]]
    with Engine(bert, tm.tokenizer(), torch_threads=1) as pinned:
        assert len(pinned.stats()["replicas"]) == 1


# ---------------------------------------------------------------- scheduler


def test_each_worker_has_its_own_controller():
    clock = _core.ManualClock(0.0)
    sched = _core.Scheduler(_core.SchedulerConfig(), _core.ControllerConfig(policy="aimd", initial_tokens=40),
                            clock, workers=2)
    assert sched.workers == 2
    for i in range(8):
        sched.submit([1] * 10)
    b1 = sched.next_batch(0.0, 1)
    assert b1.worker == 1 and b1.budget == 40 and b1.total_tokens == 40
    clock.advance(0.001)
    sched.complete(b1, 0.001)  # a full batch well under target: aimd grows worker 1's budget only
    assert sched.budget_of(1) > 40 and sched.budget_of(0) == 40 == sched.budget
    s = sched.stats()
    assert [c["budget_tokens"] for c in s["controllers"]] == [40, sched.budget_of(1)]
    assert s["controller"]["budget_tokens"] == 40
    b0 = sched.next_batch(0.0, 0)
    assert b0.worker == 0 and b0.budget == 40
    with pytest.raises(ValueError, match="out of range"):
        sched.next_batch(0.0, 2)
    with pytest.raises(ValueError, match="workers must be"):
        _core.Scheduler(_core.SchedulerConfig(), _core.ControllerConfig(), None, workers=0)


# ------------------------------------------------------------------ serving


def test_replicas_give_the_single_worker_results_and_share_the_weights(bert):
    texts = tm.mixed_texts(48, seed=3)
    with Engine(bert, tm.tokenizer()) as one:
        expected = one.embed(texts)
    with Engine(bert, tm.tokenizer(), replicas=2) as two:
        got = two.embed(texts)
        r0, r1 = two._replicas
        assert r1.runner is not r0.runner and r1.runner.model is r0.runner.model  # one copy of the weights
        s = two.stats()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert len(s["replicas"]) == 2 and s["health"]["replicas_alive"] == 2
    assert sum(r["requests"] for r in s["replicas"]) == s["completed"] == len(texts)
    assert all("budget_tokens" in r["controller"] for r in s["replicas"])


@pytest.mark.parametrize("devices", [["cpu", "cpu:0"], ["cpu:0", "cpu"]])
def test_two_names_of_the_cpu_are_one_device_and_share_the_weights(bert, devices):
    with Engine(bert, tm.tokenizer(), devices=devices) as engine:
        r0, r1 = engine._replicas
        assert r0.device == r1.device == torch.device("cpu")
        assert r1.runner.model is r0.runner.model


def test_a_batch_goes_to_the_free_replica_and_each_worker_sets_its_thread_share(bert, monkeypatch):
    monkeypatch.setenv("FASTSERVE_TOKENS_PER_THREAD", "0")  # every batch on the worker's whole share
    with Engine(bert, tm.tokenizer(), replicas=2) as engine:
        seen_threads: list[int] = []
        gates = [gate(r) for r in engine._replicas]
        for g in gates:
            inner = g.inner
            g.inner = lambda batch, inner=inner: seen_threads.append(torch.get_num_threads()) or inner(batch)
        first = engine.submit("taken by one replica")
        busy = entered(gates)
        second = engine.submit("taken by the other while the first is held")
        other = entered(gates, exclude=[busy])
        assert busy is not other  # two batches in flight at once
        for g in gates:
            g.release.set()
        assert first.result(timeout=30).shape == second.result(timeout=30).shape == (32,)
        s = engine.stats()
    share = max(1, process.usable_cores() // 2)
    assert seen_threads == [share, share]
    assert [r["torch_threads"] for r in s["replicas"]] == [share, share]
    assert [r["batches"] for r in s["replicas"]] == [1, 1]


def test_tokens_per_thread_scales_with_the_model_width_and_can_be_set(monkeypatch):
    monkeypatch.delenv("FASTSERVE_TOKENS_PER_THREAD", raising=False)
    assert replicas.tokens_per_thread(384, emulated=False) == replicas.TOKENS_PER_THREAD
    assert replicas.tokens_per_thread(768, emulated=False) == round(replicas.TOKENS_PER_THREAD / 4)
    assert replicas.tokens_per_thread(32, emulated=False) == replicas.TOKENS_PER_THREAD * 144
    # Emulated half precision, or a width the config does not give: every
    # batch on the worker's whole count.
    assert replicas.tokens_per_thread(384, emulated=True) == 0
    assert replicas.tokens_per_thread(None, emulated=False) == 0
    monkeypatch.setenv("FASTSERVE_TOKENS_PER_THREAD", "96")
    assert replicas.tokens_per_thread(384, emulated=True) == 96
    monkeypatch.setenv("FASTSERVE_TOKENS_PER_THREAD", "many")
    with pytest.raises(ValueError, match="FASTSERVE_TOKENS_PER_THREAD must be a non-negative int, got 'many'"):
        replicas.tokens_per_thread(384, emulated=False)


def test_a_bad_tokens_per_thread_override_is_refused_when_the_engine_is_built(bert, monkeypatch):
    monkeypatch.setenv("FASTSERVE_TOKENS_PER_THREAD", "-3")
    with pytest.raises(ValueError, match="FASTSERVE_TOKENS_PER_THREAD must be a non-negative int, got '-3'"):
        Engine(bert, tm.tokenizer())


def test_a_batch_gets_one_thread_per_tokens_per_thread_tokens_up_to_the_workers_count():
    r = replicas.Replica(0, torch.device("cpu"), None, 4, contextlib.nullcontext, tokens_per_thread=100)
    # Rounded to the nearest: a second thread from 150 tokens.
    assert [r.threads_for(t) for t in (1, 100, 149, 150, 249, 250, 399, 10_000)] == [1, 1, 1, 2, 2, 3, 4, 4]
    whole = replicas.Replica(0, torch.device("cpu"), None, 4, contextlib.nullcontext, tokens_per_thread=0)
    assert whole.threads_for(1) == whole.threads_for(10_000) == 4
    unset = replicas.Replica(0, torch.device("cpu"), None, None, contextlib.nullcontext, tokens_per_thread=100)
    assert unset.threads_for(1) is None  # torch_threads=0: the engine leaves torch's count alone


def test_batch_threads_sets_the_count_in_the_workers_thread_and_restores_it_after():
    # A paused batch's urgent batch runs inside it: the paused one resumes on its own count.
    r = replicas.Replica(0, torch.device("cpu"), None, 2, contextlib.nullcontext, tokens_per_thread=10)
    seen: dict[str, int] = {}
    caller = torch.get_num_threads()

    def worker() -> None:
        r.enter()
        with r.batch_threads(r.threads_for(100)):
            seen["large"] = torch.get_num_threads()
            with r.batch_threads(r.threads_for(3)):
                seen["urgent inside it"] = torch.get_num_threads()
            seen["large, resumed"] = torch.get_num_threads()
        with r.batch_threads(r.threads_for(3)):
            seen["small"] = torch.get_num_threads()
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"large": 2, "urgent inside it": 1, "large, resumed": 2, "small": 1, "after": 2}
    assert torch.get_num_threads() == caller  # per thread: the caller's count is its own


def test_an_engine_built_in_a_workers_thread_leaves_that_workers_batches_on_their_share(restore_torch_threads):
    # Built from a model hook (in engine A's worker), engine B sets torch's
    # count in that thread: A's later batches still run on A's one thread
    # (they ran on B's two, while stats() said one).
    m = tm.model("bert")
    seen, built = [], []

    def hook(module, args) -> None:
        seen.append(torch.get_num_threads())
        if not built:
            built.append(Engine(tm.model("bert"), tm.tokenizer(), replicas=1, torch_threads=2, warmup=False))

    m.register_forward_pre_hook(hook)
    try:
        with Engine(m, tm.tokenizer(), execution="padded", copy_model=False, replicas=1, torch_threads=1,
                    warmup=False) as a:
            for i in range(3):
                a.embed([f"batch {i}"])
            assert a.stats()["torch_threads"] == [1]
    finally:
        for b in built:
            b.close()
    assert seen == [1, 1, 1]


def test_small_batches_run_on_one_thread_and_large_ones_on_the_workers_count(bert, monkeypatch):
    monkeypatch.setenv("FASTSERVE_TOKENS_PER_THREAD", "8")  # the tiny model's own share is far larger
    caller = torch.get_num_threads()
    with Engine(bert, tm.tokenizer(), torch_threads=2, replicas=1, policy="static", max_batch_tokens=4096) as e:
        seen: list[int] = []
        run = e.runner.run
        monkeypatch.setattr(e.runner, "run", lambda batch, **kw: seen.append(torch.get_num_threads()) or run(batch, **kw))
        small = e.embed(["hi"])  # [CLS] hi [SEP]: 3 tokens
        large = e.embed([" ".join(["word"] * 40)])  # 42 tokens
        s = e.stats()
    assert seen == [1, 2]
    assert s["replicas"][0]["batches_by_threads"] == {1: 1, 2: 1}
    assert s["replicas"][0]["torch_threads"] == 2
    assert torch.get_num_threads() == caller
    # The thread count changes no result beyond the BLAS's own order of sums.
    with Engine(bert, tm.tokenizer(), torch_threads=1, replicas=1) as one:
        np.testing.assert_allclose(small, one.embed(["hi"]), atol=1e-6)
        np.testing.assert_allclose(large, one.embed([" ".join(["word"] * 40)]), atol=1e-6)


def test_priorities_deadlines_and_cancellation_hold_with_replicas(bert):
    clock = _core.ManualClock(0.0)
    with Engine(bert, tm.tokenizer(), replicas=2, clock=clock) as engine:
        gates = [gate(r) for r in engine._replicas]
        a = engine.submit("one")
        entered(gates)
        b = engine.submit("two")
        both_held(gates)
        late = engine.submit("has a deadline", timeout=0.5)
        doomed = engine.submit("cancelled")
        urgent = engine.submit("urgent", priority=5)
        assert engine.stats()["queue_depth"] == 3
        assert doomed.cancel()
        clock.advance(1.0)
        for g in gates:
            g.release.set()
        with pytest.raises(fastserve.RequestTimeoutError):
            late.result(timeout=30)
        for f in (a, b, urgent):
            assert f.result(timeout=30).shape == (32,)
        s = engine.stats()
    seen = [i for g in gates for i in g.seen]
    assert len(seen) == 3  # neither the expired nor the cancelled request reached a model
    assert s["expired"] == 1 and s["cancelled"] == 1 and s["completed"] == 3


# ------------------------------------------------------------------- faults


def test_a_replica_whose_model_raises_fails_only_its_batch(bert):
    with Engine(bert, tm.tokenizer(), replicas=2) as engine:
        gates = [gate(r) for r in engine._replicas]
        bad = engine.submit("this batch meets a failing device")
        failing = entered(gates)
        good = engine.submit("the other replica serves this")
        other = entered(gates, exclude=[failing])

        def raises(batch):
            raise RuntimeError("device error")

        failing.inner = raises
        for g in gates:
            g.release.set()
        with pytest.raises(fastserve.InferenceError, match="device error"):
            bad.result(timeout=30)
        assert good.result(timeout=30).shape == (32,)
        assert other.seen and failing.seen
        h = engine.health()
        s = engine.stats()
    assert h["healthy"] and h["replicas_alive"] == 2
    assert sorted(r["failed_batches"] for r in s["replicas"]) == [0, 1]
    assert s["failed_batches"] == 1


def test_a_list_call_fails_at_its_first_failure_while_an_earlier_input_still_runs(bert):
    # The list's first input is held on one replica while the second fails on
    # the other: the call raises then, not once the first is done, and what
    # of the list is still queued is cancelled rather than run for nobody.
    with Engine(bert, tm.tokenizer(), replicas=2, max_batch_size=1) as engine:
        gates = [gate(r) for r in engine._replicas]
        outcome: dict = {}

        def call():
            try:
                engine.embed(["the first input, held", "the second, which fails", *[f"later {i}" for i in range(20)]])
            except Exception as e:  # noqa: BLE001 (what the test checks)
                outcome["error"] = e

        caller, after = threading.Thread(target=call), threading.Event()
        caller.start()
        try:
            first = entered(gates)
            second = entered(gates, exclude=[first])
            run, calls = second.inner, []

            def fails_once(batch, **kw):  # then holds its next batch until the call has raised
                calls.append(1)
                if len(calls) == 1:
                    raise RuntimeError("device error")
                assert after.wait(60)
                return run(batch, **kw)

            second.inner = fails_once
            second.release.set()
            caller.join(30)
            assert not caller.is_alive() and not first.release.is_set()
            assert isinstance(outcome.get("error"), fastserve.InferenceError), outcome
        finally:
            first.release.set()
            after.set()
            caller.join(30)
        settled = lambda s: s["cancelled"] + s["completed"] + s["failed"]  # noqa: E731
        tm.until(lambda: settled(engine.stats()) == 22, "the list to settle")
        s = engine.stats()
        assert s["failed"] == 1 and s["cancelled"] >= 18 and s["queue_depth"] == 0, s  # (one later input was taken)
        assert engine.embed("still serving").shape == (32,)


def test_a_dead_replica_fails_its_batch_with_a_typed_error_and_the_others_keep_serving(bert):
    engine = Engine(bert, tm.tokenizer(), replicas=2)
    gates = [gate(r) for r in engine._replicas]
    doomed = engine.submit("the batch whose worker dies")
    dying = entered(gates)
    held = engine.submit("held by the other replica")
    survivor = entered(gates, exclude=[dying])
    dying.inner = kill
    with expected_thread_deaths():
        dying.release.set()
        with pytest.raises(fastserve.ReplicaFailedError, match="replica lost") as info:
            doomed.result(timeout=30)
        assert isinstance(info.value, fastserve.InferenceError)
        dead = next(r for r, g in zip(engine._replicas, gates) if g is dying)
        dead.thread.join(30)
    survivor.release.set()
    assert held.result(timeout=30).shape == (32,)
    later = [engine.submit(f"after the death {i}") for i in range(5)]
    assert all(f.result(timeout=30).shape == (32,) for f in later)
    h = engine.health()
    assert h["healthy"] and h["degraded"] and h["replicas_alive"] == 1
    reports = {r["index"]: r for r in engine.stats()["replicas"]}
    assert not reports[dead.index]["alive"] and "replica lost" in reports[dead.index]["error"]
    engine.close()
    with pytest.raises(fastserve.EngineClosedError):
        engine.submit("after close")


def test_after_a_replica_dies_admission_counts_the_live_workers_only(bert):
    """With one of two replicas dead and the other busy, a request that
    cannot make its deadline is refused at submit (429), as on a one-replica
    engine, not admitted as if the dead worker were idle and then timed out."""
    clock = _core.ManualClock(0.0)
    engine = Engine(bert, tm.tokenizer(), clock=clock, replicas=2, torch_threads=1, preempt=False)
    for n in (1, 4, 2, 8, 3, 6):
        engine.embed(["some words to embed"] * n)  # the compute fit
    gates = [gate(r) for r in engine._replicas]
    doomed = engine.submit("its worker dies")
    dying = entered(gates)
    dying.inner = kill
    with expected_thread_deaths():
        dying.release.set()
        with pytest.raises(fastserve.ReplicaFailedError):
            doomed.result(timeout=30)
        next(r for r, g in zip(engine._replicas, gates) if g is dying).thread.join(30)
    assert engine._scheduler.live_workers == 1 and engine._scheduler.workers == 2
    survivor = next(g for g in gates if g is not dying)
    held = engine.submit("holds the live worker")
    tm.until(survivor.entered.is_set, "the live worker held")
    engine.submit_many(["queued ahead"] * 50, timeout=1e9)
    with pytest.raises(fastserve.OverloadedError):
        # 1 us: below any batch's compute on any machine (1 ms was within a
        # fast machine's prediction for the tiny model: admitted now and then).
        engine.submit("its deadline is 1 us away", priority=1, timeout=1e-6)
    survivor.release.set()
    assert held.result(timeout=30).shape == (32,)
    engine.close()


def test_when_the_last_replica_dies_the_engine_fails_pending_requests(bert):
    engine = Engine(bert, tm.tokenizer(), replicas=2)
    gates = [gate(r) for r in engine._replicas]
    first = engine.submit("one")
    entered(gates)
    second = engine.submit("two")
    both_held(gates)
    queued = [engine.submit(f"queued {i}") for i in range(3)]
    for g in gates:
        g.inner = kill
    with expected_thread_deaths():
        gates[0].release.set()
        gates[1].release.set()
        errors = []
        for f in (first, second, *queued):
            with pytest.raises((fastserve.EngineClosedError, fastserve.ReplicaFailedError)) as info:
                f.result(timeout=30)
            errors.append(type(info.value))
        for r in engine._replicas:
            r.thread.join(30)
    assert errors[2:] == [fastserve.EngineClosedError] * 3
    h = engine.health()
    assert not h["healthy"] and h["replicas_alive"] == 0
    with pytest.raises(fastserve.EngineClosedError):
        engine.submit("after death")
    engine.close()


@pytest.mark.parametrize("drain", [False, True])
def test_close_drains_or_fails_the_queue_and_joins_every_worker(bert, drain):
    before = {t.ident for t in threading.enumerate()}
    engine = Engine(bert, tm.tokenizer(), replicas=2)
    gates = [gate(r) for r in engine._replicas]
    running = [engine.submit("one")]
    entered(gates)
    running.append(engine.submit("two"))
    both_held(gates)
    queued = [engine.submit(f"queued {i}") for i in range(4)]
    closer = threading.Thread(target=engine.close, kwargs={"drain": drain})
    closer.start()
    if not drain:  # the queue is closed before a worker is free to take from it
        tm.until(lambda: engine._scheduler.closed, "close() to close the queue")
    for g in gates:
        g.release.set()
    closer.join(60)
    assert not closer.is_alive()
    for f in running:
        assert f.result(timeout=1).shape == (32,)
    for f in queued:
        if drain:
            assert f.result(timeout=1).shape == (32,)
        else:
            with pytest.raises(fastserve.EngineClosedError):
                f.result(timeout=1)
    assert {t.ident for t in threading.enumerate()} <= before


def test_metrics_report_each_replica(bert):
    pytest.importorskip("prometheus_client")
    from fastserve.server.metrics import Metrics

    with Engine(bert, tm.tokenizer(), replicas=2) as engine:
        engine.embed(["a", "b", "c"])
        text = Metrics(engine).exposition().decode()
    for k in (0, 1):
        assert f'fastserve_engine_replica_up{{device="cpu",replica="{k}"}} 1.0' in text
        assert f'fastserve_engine_replica_budget_tokens{{device="cpu",replica="{k}"}}' in text
    assert "fastserve_engine_replica_batches_total" in text
