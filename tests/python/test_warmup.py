"""Engine(warmup=True): each data-parallel worker runs one small batch on its
own thread before the constructor returns, outside the scheduler and the
statistics; a fault in it is recorded, never raised, and the same fault
reaches the first real batch as a typed error."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastserve
import tiny_models as tm
from fastserve import Engine
from fastserve.runners import PackedRunner


@pytest.fixture
def runs(monkeypatch):
    """Every PackedRunner.run call: (thread name, batch size), in order."""
    seen: list[tuple[str, int]] = []
    inner = PackedRunner.run

    def run(self, batch, *args, **kwargs):
        seen.append((threading.current_thread().name, int(batch.size)))
        return inner(self, batch, *args, **kwargs)

    monkeypatch.setattr(PackedRunner, "run", run)
    return seen


def test_each_worker_warms_up_on_its_own_thread_before_the_constructor_returns(runs):
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed", replicas=2) as engine:
        warmed = list(runs)
        s = engine.stats()
        names = sorted(r.thread.name for r in engine._replicas)
        want = engine.embed(["after the warm-up", "a second text"])
    assert sorted(name for name, _ in warmed) == names  # one batch per worker, on that worker
    assert all(size == 2 for _, size in warmed)
    assert len(s["warmup_s"]) == 2 and all(t is not None and t > 0 for t in s["warmup_s"])
    # Outside the statistics and the controllers: nothing submitted, batched or timed.
    assert s["submitted"] == s["completed"] == s["batches"] == 0
    assert all(r["batches"] == 0 for r in s["replicas"])
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed", replicas=2, warmup=False) as cold:
        np.testing.assert_allclose(cold.embed(["after the warm-up", "a second text"]), want, atol=1e-6, rtol=0)


def test_without_warmup_no_batch_runs_before_the_first_request(runs):
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed", warmup=False) as engine:
        assert runs == []
        assert engine.stats()["warmup_s"] == [None]
        engine.embed("the first batch")
    assert [size for _, size in runs] == [1]


@pytest.mark.parametrize("task", ["classify", "rerank"])
def test_other_tasks_warm_up_too(task):
    with Engine(tm.model("bert", classify=True), tm.tokenizer(), task=task) as engine:
        assert all(t is not None for t in engine.stats()["warmup_s"])


@pytest.mark.parametrize("bounds", [{"max_queue": 1}, {"max_queue_tokens": 6}])
def test_the_warm_up_runs_whatever_the_queue_bounds(bounds):
    """The warm-up's two texts go through a queue of its own: an engine's
    small queue bounds never skip it."""
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=2, **bounds) as e:
        assert all(s is not None for s in e.stats()["warmup_s"])


def test_a_pipeline_does_not_warm_up():
    with Engine(tm.model("bert"), tm.tokenizer(), devices=["cpu", "cpu"], parallel="pipeline") as engine:
        assert engine.stats()["warmup_s"] == [None, None]
        assert engine.embed("served").shape == (32,)


def test_a_fault_in_the_warm_up_is_recorded_and_the_first_batch_reports_it(monkeypatch):
    inner = PackedRunner.run
    calls = {"n": 0}

    def faulty(self, batch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:  # the warm-up, then the first real batch
            raise RuntimeError("device fault")
        return inner(self, batch, *args, **kwargs)

    monkeypatch.setattr(PackedRunner, "run", faulty)
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed") as engine:
        assert engine.stats()["warmup_s"] == [None]
        assert isinstance(engine._replicas[0].warmup_error, RuntimeError)
        with pytest.raises(fastserve.InferenceError, match="device fault"):
            engine.embed("meets the fault")
        assert engine.embed("served after it").shape == (32,)
        assert engine.health()["healthy"]


def _enter_fails_for(monkeypatch, indices):
    """Replica.enter (the worker's thread set-up, before its warm-up) raises
    on the replicas listed."""
    from fastserve import replicas

    inner = replicas.Replica.enter

    def enter(self):
        if self.index in indices:
            raise RuntimeError(f"thread set-up failed on replica {self.index}")
        inner(self)

    monkeypatch.setattr(replicas.Replica, "enter", enter)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_worker_that_fails_before_its_warm_up_is_reported_and_the_others_serve(monkeypatch, failing):
    # The constructor waits for each worker's warm-up; a worker whose set-up
    # raised must release that wait at once and be reported, not hold the
    # constructor for WARMUP_WAIT_S, nor (replica 0, whose sibling may not have
    # started yet) be taken for the last worker and close the engine.
    import fastserve.engine as engine_mod

    monkeypatch.setattr(engine_mod, "WARMUP_WAIT_S", 3600.0)
    _enter_fails_for(monkeypatch, {failing})
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed", replicas=2) as engine:
        assert all(r.warm.is_set() for r in engine._replicas)
        engine._replicas[failing].thread.join()
        h = engine.health()
        assert h["healthy"] and h["replicas_alive"] == 1
        s = engine.stats()["replicas"][failing]
        assert not s["alive"] and "thread set-up failed" in s["error"]
        assert engine.embed(["served by the other worker", "and this"]).shape == (2, 32)


def test_when_every_worker_fails_before_its_warm_up_calls_fail_typed(monkeypatch):
    import fastserve.engine as engine_mod

    monkeypatch.setattr(engine_mod, "WARMUP_WAIT_S", 3600.0)
    _enter_fails_for(monkeypatch, {0, 1})
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed", replicas=2) as engine:
        for r in engine._replicas:
            r.thread.join()
        assert not engine.health()["healthy"]
        with pytest.raises(fastserve.EngineClosedError, match="thread set-up failed"):
            engine.embed("nobody to serve it")
