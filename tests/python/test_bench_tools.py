"""The benchmark harness's own logic (benchmarks/python): the open-loop
driver with a backend that schedules its own arrivals, pooling of repeated
runs, and the paired added-latency estimate. No model, no timing asserted."""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "python"))
common = pytest.importorskip("common")
load = pytest.importorskip("load")
http_bench = pytest.importorskip("http_bench")


class _OwnDispatch(common.Backend):
    """Records when each text was due and answers it at once from a thread."""

    name = kind = "fake"
    own_dispatch = True

    def __init__(self) -> None:
        self.due: list[tuple[float, str]] = []

    def submit_at(self, when: float, text: str) -> cf.Future:
        self.due.append((when, text))
        fut: cf.Future = cf.Future()
        threading.Timer(0.0, fut.set_result, args=(text,)).start()
        return fut


def test_open_loop_hands_every_arrival_to_an_own_dispatch_backend():
    b = _OwnDispatch()
    offsets = np.linspace(0.0, 0.2, 21)
    r = load.run_open_loop(b, offsets, ["a", "b", "c"], warmup_s=0.05, slo_s=1.0, drain_s=1.0)
    assert [t for _, t in b.due] == [["a", "b", "c"][i % 3] for i in range(21)]
    whens = np.array([w for w, _ in b.due])
    assert np.allclose(np.diff(whens), np.diff(offsets))  # due at the offsets, not when handed over
    measured = int((offsets >= 0.05).sum())
    assert r["requests"] == measured and r["completed"] == measured and r["failed"] == 0


def test_pool_runs_sums_windows_and_counts_unfinished_as_misses():
    runs = [
        {"_latency": np.array([0.01, 0.2, np.inf]), "window_s": 1.0, "requests": 3, "completed": 2,
         "throughput_rps": 2.0, "goodput_rps": 1.0},
        {"_latency": np.array([0.02, 0.03]), "window_s": 1.0, "requests": 2, "completed": 2,
         "throughput_rps": 4.0, "goodput_rps": 2.0},
    ]
    r = http_bench.pool_runs(runs, slo_s=0.1)
    assert r["goodput_rps"] == pytest.approx(3 / 2.0)
    assert r["requests"] == 5 and r["completed"] == 4 and r["runs"] == 2
    assert r["throughput_rps"] == pytest.approx(3.0)
    assert r["latency_s"]["p99"] == np.inf
    assert r["latency_s"]["p50"] == pytest.approx(0.03)
    assert list(r["_latency"][:3]) == [0.01, 0.2, np.inf]  # run order kept, for pairing


def test_paired_added_latency_recovers_a_constant_shift():
    rng = np.random.default_rng(0)
    inproc = rng.uniform(0.015, 0.080, 500)  # long and short texts
    http = inproc + 0.0012 + rng.normal(0, 0.0003, 500)  # seeded: the same draw every run
    http[::50] = np.inf  # unfinished on one path: left out of the pairs
    p = http_bench.paired_added_ms(inproc, http, seed=1)
    assert p["n"] == 490
    assert p["median_ms"] == pytest.approx(1.2, abs=0.05)
    assert p["ci_ms"][0] <= 1.2 <= p["ci_ms"][1] and p["ci_ms"][1] - p["ci_ms"][0] < 0.2
