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
