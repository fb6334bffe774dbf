"""Pausing a running batch between two layers of the packed runner to run
urgent requests first (Engine(preempt=...), docs/design.md, "Pausing a
batch"). When the scheduler pauses and what it takes are tested on simulated
time in tests/cpp/test_overload.cpp (Preempt); here the engine's side: the
urgent batch runs inside the paused one through the same runner, every row
stays exact, and the pause is counted."""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models as tm
from fastserve import Engine, OverloadedError, _core


@pytest.fixture(scope="module")
def bert():
    return tm.model("bert")


def measured(engine: Engine) -> None:
    """A few batches so the scheduler's compute fit is ready (it pauses only then)."""
    for n in (1, 4, 2, 8):
        engine.embed(["some words to embed"] * n)


def test_preempt_is_on_for_the_packed_runner_on_a_cpu_and_refused_where_nothing_can_pause(bert):
    with Engine(bert, tm.tokenizer()) as e:
        assert e.preempt is True
        assert e.stats()["preempted"] == 0
    with Engine(bert, tm.tokenizer(), preempt=False) as e:
        assert e.preempt is False
    with Engine(bert, tm.tokenizer(), execution="padded") as e:
        assert e.preempt is False  # the padded runner calls the model whole
    with pytest.raises(ValueError, match="padded runner .*cannot pause"):
        Engine(bert, tm.tokenizer(), execution="padded", preempt=True)
    with pytest.raises(ValueError, match="parallel='pipeline' .pausing needs parallel='data'"):
        Engine(bert, tm.tokenizer(), devices=["cpu", "cpu"], parallel="pipeline", preempt=True)
    with pytest.raises(ValueError, match="preempt must be"):
        Engine(bert, tm.tokenizer(), preempt="yes")


def test_a_higher_class_runs_between_two_layers_of_a_lower_batch_and_every_row_is_exact(bert):
    texts = tm.mixed_texts(12, seed=3)
    urgent_text = "an urgent request from a higher class"
    with Engine(bert, tm.tokenizer(), preempt=False) as plain:
        expected = plain.embed(texts)
        expected_urgent = plain.embed(urgent_text)
    engine = Engine(bert, tm.tokenizer(), preempt=True, replicas=1)
    with engine:
        measured(engine)
        # The first layer boundary of the next batch (the low list) submits a
        # higher-class request, as if it had just arrived.
        real, armed, injected = engine._pausing, [True], []

        def pausing(batch, replica, futures):
            pause, state = real(batch, replica, futures)

            def hook(done: int, layers: int):
                if armed[0]:
                    armed[0] = False
                    injected.append(engine.submit(urgent_text, priority=1))
                    injected[0].add_done_callback(lambda f: order.append("urgent"))
                return pause(done, layers)

            return hook, state

        engine._pausing = pausing
        order: list[str] = []
        low = engine.submit_many(texts, priority=0)
        for f in low:
            f.add_done_callback(lambda f: order.append("low"))
        rows = np.stack([f.result(timeout=60) for f in low])
        urgent = injected[0].result(timeout=60)
        # It was run inside the paused batch: done before that batch's rows.
        assert order.index("urgent") < order.index("low")
        assert engine.stats()["preempted"] == 1
    np.testing.assert_allclose(rows, expected, atol=1e-6)
    np.testing.assert_allclose(urgent, expected_urgent, atol=1e-6)


def test_a_lower_row_the_pause_would_make_late_is_dropped_and_shed_the_rest_stay_exact(bert):
    """On a ManualClock: the batch holds a low row due 5 s after its submit
    and one due in 1000 s; at the first layer boundary the clock stands just
    past the first one's deadline (so the outcome does not depend on how long
    the machine predicts the pause to take) and a higher-class request
    arrives. The paused batch would end past that row's deadline: it fails
    with OverloadedError and its row leaves the layers left; the other row
    and the urgent one are exact."""
    late_text, kept_text, urgent_text = "a low request due soon", "a low request with time", "urgent"
    with Engine(bert, tm.tokenizer(), preempt=False) as plain:
        expected_kept, expected_urgent = plain.embed(kept_text), plain.embed(urgent_text)
    clock = _core.ManualClock(0.0)
    engine = Engine(bert, tm.tokenizer(), preempt=True, replicas=1, clock=clock)
    with engine:
        measured(engine)
        real, injected = engine._pausing, []

        def pausing(batch, replica, futures):
            pause, state = real(batch, replica, futures)

            def hook(done: int, layers: int):
                if batch.size == 2 and not injected:
                    clock.set(float(min(batch.deadlines)) + 1e-3)
                    injected.append(engine.submit(urgent_text, priority=1, timeout=1000))
                return pause(done, layers)

            return hook, state

        engine._pausing = pausing
        with tm.held(engine):  # both low rows are queued before the worker takes either
            late = engine.submit(late_text, timeout=5)
            kept = engine.submit(kept_text, timeout=1000)
        with pytest.raises(OverloadedError) as err:
            late.result(timeout=60)
        assert err.value.retry_after_s > 0
        np.testing.assert_allclose(kept.result(timeout=60), expected_kept, atol=1e-6)
        np.testing.assert_allclose(injected[0].result(timeout=60), expected_urgent, atol=1e-6)
        s = engine.stats()
        assert (s["preempted"], s["shed"]) == (1, 1)
