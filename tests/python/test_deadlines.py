"""Deadlines, admission from a prediction and shedding through the Engine
and the HTTP error mapping. The engine runs on a ManualClock (deadlines are
on it) and its worker is held by tm.Gate, so no outcome depends on how fast
the machine runs the model. The dynamics under load (Poisson and bursty
arrivals, steps in cost and load, priority classes) are tested on simulated
time in tests/cpp/test_overload.cpp."""

from __future__ import annotations

import pytest

import fastserve
import tiny_models as tm
from fastserve import Engine, _core
from fastserve.engine import overloaded


@pytest.fixture(scope="module")
def bert():
    return tm.model("bert")


def make(bert, **kwargs) -> tuple[Engine, _core.ManualClock]:
    clock = _core.ManualClock(0.0)
    return Engine(bert, tm.tokenizer(), clock=clock, **kwargs), clock


def measured(engine: Engine) -> None:
    """Run a few batches of different sizes so the scheduler's compute fit
    is ready (admission predicts only then)."""
    for n in (1, 4, 2, 8):
        engine.embed(["some words to embed"] * n)


def test_request_timeout_is_every_requests_default_deadline(bert):
    with pytest.raises(ValueError, match="request_timeout_s"):
        Engine(bert, tm.tokenizer(), request_timeout_s=0)
    engine, clock = make(bert, request_timeout_s=0.5)
    with engine:
        assert engine.request_timeout_s == 0.5
        with tm.held(engine) as gate:
            late = engine.submit("waits past the engine's deadline")
            kept = engine.submit("has its own, longer timeout", timeout=5.0)
            clock.advance(1.0)
            gate.release.set()
            with pytest.raises(fastserve.RequestTimeoutError):
                late.result(timeout=30)
            assert kept.result(timeout=30).shape == (engine.dim,)
        s = engine.stats()
        assert s["expired"] == 1


def test_timeouts_past_the_float_range_are_no_limit_and_a_latency_target_there_is_refused(bert):
    # An int too large for a float (it passed the >= 0 check) reached the
    # scheduler as a pybind TypeError on every call.
    with pytest.raises(ValueError, match="target_latency_ms must be a positive finite number"):
        Engine(bert, tm.tokenizer(), target_latency_ms=10**400)
    engine, clock = make(bert, request_timeout_s=10**400)
    with engine:
        assert engine.request_timeout_s == float("inf")
        with tm.held(engine) as gate:
            waiting = [engine.submit("no limit"), *engine.submit_many(["nor here"], timeout=10**400),
                       engine.submit("nor here", timeout=10**400)]
            clock.advance(1e9)
            gate.release.set()
        assert [f.result(timeout=30).shape for f in waiting] == [(engine.dim,)] * 3
        assert engine.embed(["a", "b"], timeout=10**400).shape == (2, engine.dim)
        assert engine.stats()["expired"] == 0


def test_a_list_call_is_one_job_its_items_get_no_default_deadline(bert):
    """An offline list is served whole however long it takes; its own timeout still applies."""
    engine, clock = make(bert, request_timeout_s=0.5)
    with engine:
        with tm.held(engine) as gate:
            single = engine.submit("a single request: the engine's deadline")
            job = engine.submit_many([f"text {i}" for i in range(40)])
            bounded = engine.submit_many(["with its own timeout"], timeout=0.5)
            clock.advance(1.0)
            gate.release.set()
            with pytest.raises(fastserve.RequestTimeoutError):
                single.result(timeout=30)
            assert all(f.result(timeout=30).shape == (engine.dim,) for f in job)
            with pytest.raises(fastserve.RequestTimeoutError):
                bounded[0].result(timeout=30)
        assert engine.stats()["expired"] == 2


def test_a_deadline_that_passes_after_assembly_is_checked_when_the_batch_starts(bert):
    engine, clock = make(bert)
    with engine:
        gate = tm.Gate(engine, hold_first=False)
        run = engine._run

        def run_late(batch, *replica):  # the clock passes every deadline between assembly and start
            clock.advance(10.0)
            run(batch, *replica)

        engine._run = run_late
        fut = engine.submit("assembled in time, started too late", timeout=1.0)
        with pytest.raises(fastserve.RequestTimeoutError):
            fut.result(timeout=30)
        no_deadline = engine.submit("no deadline", timeout=1e9)
        assert no_deadline.result(timeout=30).shape == (engine.dim,)
        assert gate.seen == [1 + 1]  # the late request never reached the model; the second did
        assert engine.stats()["expired"] == 1


def test_a_request_predicted_to_miss_its_deadline_is_refused_with_a_retry_hint(bert):
    engine, clock = make(bert)
    with engine:
        # Before any batch is measured nothing is predicted: even timeout=0 is queued (and expires).
        assert engine._scheduler.predict_completion(8) == float("inf")
        measured(engine)
        with tm.held(engine):
            engine.submit_many(["queued ahead, no deadline"] * 200, timeout=1e9)
            with pytest.raises(fastserve.OverloadedError) as info:
                engine.submit("cannot make it", timeout=1e-9)
            assert isinstance(info.value, fastserve.QueueFullError)
            assert info.value.retry_after_s > 0
            # Higher priority does not wait behind priority 0 (the running
            # batch is held, so the prediction has still to be in the future).
            assert engine._scheduler.predict_completion(8, priority=1) < engine._scheduler.predict_completion(8)
        s = engine.stats()
        assert s["refused"] == 1
        assert s["admitted"] == s["submitted"]


def test_a_list_its_own_work_makes_late_is_refused_at_once_as_the_callers_to_split(bert):
    """A list whose own work, run alone, ends past its deadline: no wait makes
    it fit, so it is InvalidInputError at once, nothing queued (over HTTP a
    400, not a 429 the client retries in vain). It was queued in part, its
    prefix computed, and the call failed as OverloadedError: a 2,048-text
    request on an idle server got 429 after 10.8 s, and again on each retry.
    The clock stands still: the deadline is 1 us away while each measured
    batch took real time."""
    pytest.importorskip("fastapi")
    from fastserve.server.errors import api_error

    engine, clock = make(bert)
    with engine:
        measured(engine)
        before = engine.stats()
        texts = ["too much work for its deadline"] * 64
        with pytest.raises(fastserve.InvalidInputError, match="64 requests of .* alone") as info:
            engine.embed(texts, timeout=1e-6)
        assert not isinstance(info.value, fastserve.QueueFullError)
        assert api_error(info.value).status == 400
        s = engine.stats()
        assert (s["submitted"], s["refused"], s["queue_depth"]) == (before["submitted"], before["refused"], 0)
        assert engine.embed(texts, timeout=1e9).shape == (64, engine.dim)  # in time: served
        assert engine.submit(texts[0], timeout=1e-6).result(timeout=30).shape == (engine.dim,)  # one: runs (idle)


def test_a_queued_request_predicted_to_finish_late_is_shed_not_computed(bert):
    engine, clock = make(bert)
    with engine:
        measured(engine)
        with tm.held(engine) as gate:
            fut = engine.submit("admitted, then its deadline comes too close", timeout=100.0)
            # (Were it the only request queued it would run: the least late
            # request always does, so the prediction is measured again.)
            other = engine.submit("no deadline", timeout=1e9)
            # At batch formation its deadline is 1 us away: no batch finishes in time.
            clock.advance(100.0 - 1e-6)
            seen = len(gate.seen)
        with pytest.raises(fastserve.OverloadedError) as info:
            fut.result(timeout=30)
        assert info.value.retry_after_s > 0
        other.result(timeout=30)
        assert len(gate.seen) == seen + 1  # only `other` reached the model
        s = engine.stats()
        assert s["shed"] == 1 and s["expired"] == 0


def test_overload_is_answered_429_with_retry_after_in_whole_seconds():
    pytest.importorskip("fastapi")
    from fastserve.server.errors import api_error

    err = api_error(overloaded(2.3))
    assert err.status == 429 and err.code == "overloaded"
    assert err.headers["Retry-After"] == "3"
    assert api_error(overloaded(0.01)).headers["Retry-After"] == "1"
    full = api_error(fastserve.QueueFullError("queue full"))
    assert full.status == 429 and full.code == "queue_full"


def test_metrics_count_every_admission_decision(bert):
    pytest.importorskip("prometheus_client")
    from fastserve.server.metrics import Metrics

    engine, _ = make(bert)
    with engine:
        text = Metrics(engine).exposition().decode()
    for outcome in ("admitted", "refused", "shed", "expired", "rejected"):
        assert f'fastserve_engine_requests_total{{outcome="{outcome}"}}' in text
    assert "fastserve_engine_pauses_total 0.0" in text
    assert "fastserve_engine_balanced_batches_total 0.0" in text
