"""Pipeline stages (Engine(devices=[...], parallel="pipeline")) on CPU
stages: outputs equal one device's, batches pass the stages in order with
one batch per stage at a time and several in flight, and a stage that raises
fails only its batch. Stage entries are observed and held through the
pipeline runner's trace hook, so nothing depends on timing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastserve
import tiny_models as tm
from fastserve import Engine
from fastserve.pipeline import PipelineRunner, StageError, stage_bounds

CPU2 = ["cpu", "cpu"]


def test_stage_bounds_split_the_layers_evenly():
    assert stage_bounds(6, 2) == [0, 3, 6]
    assert stage_bounds(6, 4) == [0, 1, 3, 4, 6]
    assert stage_bounds(2, 2) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 3 layers"):
        stage_bounds(2, 3)


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ValueError, match="at least 3 layers"):
        Engine(tm.model("bert"), tm.tokenizer(), devices=["cpu"] * 3, parallel="pipeline")


@pytest.mark.parametrize("arch", tm.ARCHS)
@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_pipeline_outputs_equal_one_device(arch, execution):
    m = tm.model(arch)
    texts = tm.mixed_texts(40, seed=1)
    with Engine(m, tm.tokenizer(), device="cpu", execution=execution) as one:
        expected = one.embed(texts)
    with Engine(m, tm.tokenizer(), devices=CPU2, parallel="pipeline", execution=execution) as two:
        got = two.embed(texts)
        s = two.stats()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert s["parallel"] == "pipeline" and s["execution"] == execution
    stages = s["pipeline"]["stages"]
    assert [st["layers"] for st in stages] == [[0, 1], [1, 2]]
    assert stages[0]["batches"] == stages[1]["batches"] == s["batches"]


def test_classification_through_a_pipeline_equals_one_device():
    m = tm.model("bert", classify=True)
    texts = tm.mixed_texts(12, seed=2)
    with Engine(m, tm.tokenizer(), task="classify") as one:
        expected = [c.scores for c in one.classify(texts)]
    with Engine(m, tm.tokenizer(), task="classify", devices=CPU2, parallel="pipeline") as two:
        got = [c.scores for c in two.classify(texts)]
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-6)


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_the_callers_model_gets_no_hooks(execution):
    m = tm.model("bert")
    params = {k: v.clone() for k, v in m.state_dict().items()}
    with Engine(m, tm.tokenizer(), devices=CPU2, parallel="pipeline", execution=execution) as engine:
        engine.embed(["one", "two"])
        assert engine.stats()["process"]["model"] == "copied"
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in m.encoder.layer)
    for k, v in m.state_dict().items():
        assert v.data_ptr() != 0 and bool((v == params[k]).all()), k


def test_the_stages_count_each_batch_once_in_the_attention_stats():
    # The stages' workers share one runner: its count is the engine's.
    with Engine(tm.model("bert"), tm.tokenizer(), devices=CPU2, parallel="pipeline", execution="packed",
                warmup=False) as engine:
        for i in range(4):
            engine.embed([f"batch {i}"])
        s = engine.stats()
    assert s["batches"] == 4 and sum(s["attention_batches"].values()) == 4


class StageGates:
    """Records (stage, batch seq) as each batch enters each stage; holds a
    batch at a stage while that (stage, seq) is in `hold`."""

    def __init__(self, runner: PipelineRunner) -> None:
        self.log: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.hold: dict[tuple[int, int], threading.Event] = {}
        self.hold_next: dict[int, int] = {}  # stage -> how many of the next entries to hold
        runner.trace = self

    def __call__(self, stage: int, seq: int) -> None:
        with self.lock:
            self.log.append((stage, seq))
            if self.hold_next.get(stage, 0) > 0:
                self.hold_next[stage] -= 1
                self.hold[(stage, seq)] = threading.Event()
            ev = self.hold.get((stage, seq))
        if ev is not None:
            assert ev.wait(60), "the test never released the stage"

    def entered(self, stage: int) -> list[int]:
        with self.lock:
            return [s for k, s in self.log if k == stage]

    def release(self, stage: int, seq: int) -> None:
        self.hold[(stage, seq)].set()

    def release_all(self) -> None:
        for ev in list(self.hold.values()):
            ev.set()


def test_batches_overlap_on_successive_stages_and_keep_their_order():
    with Engine(tm.model("bert"), tm.tokenizer(), devices=CPU2, parallel="pipeline") as engine:
        gates = StageGates(engine.runner)
        gates.hold_next = {1: 1}
        try:
            first = engine.submit("the first batch")
            tm.until(lambda: gates.entered(1), "batch 1 to reach stage 1")
            (i,) = gates.entered(1)
            # Batch i is held in stage 1; stage 0 is free for the next batch,
            # which is held there: two batches in flight on successive stages.
            with gates.lock:
                gates.hold_next[0] = 1
            second = engine.submit("the second batch")
            tm.until(lambda: len(gates.entered(0)) == 2, "batch 2 to reach stage 0")
            j = gates.entered(0)[1]
            assert j != i and not first.done() and not second.done()
            # One worker per stage, both busy: a third request stays queued.
            third = engine.submit("the third batch")
            assert engine.stats()["queue_depth"] == 1
            gates.release(0, j)  # batch j cannot pass batch i into stage 1
            assert gates.entered(1) == [i] and not second.done()
            gates.release(1, i)
            for f in (first, second, third):
                assert f.result(timeout=30).shape == (32,)
        finally:
            gates.release_all()
        order0, order1 = gates.entered(0), gates.entered(1)
    assert order0 == order1 and order0[:2] == [i, j] and len(order0) == 3  # one order on every stage
    for seq in order0:
        stages = [k for k, s in gates.log if s == seq]
        assert stages == [0, 1]


def test_many_concurrent_callers_through_a_pipeline_each_get_their_own_result():
    m = tm.model("bert")
    texts = tm.mixed_texts(64, seed=4)
    with Engine(m, tm.tokenizer()) as one:
        expected = one.embed(texts)
    with Engine(m, tm.tokenizer(), devices=["cpu"] * 2, parallel="pipeline", max_batch_size=4) as engine:
        futures = [engine.submit(t) for t in texts]
        got = np.stack([f.result(timeout=60) for f in futures])
        s = engine.stats()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert s["batches"] >= len(texts) // 4


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_a_stage_that_raises_fails_only_its_batch_and_the_pipeline_keeps_serving(execution):
    engine = Engine(tm.model("bert"), tm.tokenizer(), devices=CPU2, parallel="pipeline", execution=execution)
    with engine:
        layer = engine.model.encoder.layer[1].output  # in stage 1
        calls = {"n": 0}
        inner = layer.forward

        def broken(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("stage 1 device fault")
            return inner(*args, **kwargs)

        layer.forward = broken
        bad = engine.submit("meets the fault")
        with pytest.raises(fastserve.InferenceError, match="stage 1") as info:
            bad.result(timeout=30)
        cause = info.value.__cause__
        assert isinstance(cause, StageError) and cause.stage == 1
        assert isinstance(cause, fastserve.FastServeError)  # as every error of the package
        assert isinstance(cause.__cause__, RuntimeError)
        # The stage locks were released: later batches pass both stages.
        later = engine.embed(["served after the fault", "and this"])
        assert later.shape == (2, 32)
        h = engine.health()
        s = engine.stats()
    assert h["healthy"] and h["replicas_alive"] == 2
    assert s["failed_batches"] == 1 and s["completed"] == 2


def test_a_packed_family_without_a_stage_hook_is_refused_and_runs_padded():
    import st_models

    m = st_models.encoder("mpnet")
    with pytest.raises(ValueError, match="execution='padded'"):
        Engine(m, tm.tokenizer(), devices=CPU2, parallel="pipeline", execution="packed")
    texts = tm.mixed_texts(12, seed=5)
    with Engine(m, tm.tokenizer(), execution="padded") as one:
        expected = one.embed(texts)
    with Engine(m, tm.tokenizer(), devices=CPU2, parallel="pipeline", execution="padded") as two:
        np.testing.assert_allclose(two.embed(texts), expected, atol=1e-6)
