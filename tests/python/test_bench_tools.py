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


class _Failing(_OwnDispatch):
    """Answers every third text with an error, so a run records failures by type."""

    def submit_at(self, when: float, text: str) -> cf.Future:
        self.due.append((when, text))
        fut: cf.Future = cf.Future()
        if len(self.due) % 3 == 0:
            threading.Timer(0.0, fut.set_exception, args=(ValueError("no"),)).start()
        else:
            threading.Timer(0.0, fut.set_result, args=(text,)).start()
        return fut


def test_a_run_with_failures_saves_as_json_the_way_report_and_replicas_save_it():
    """run_open_loop's per-request error types (strings) crashed report.py's and
    replicas.py's JSON at the end of a full run."""
    import json

    report = pytest.importorskip("report")
    r = load.run_open_loop(_Failing(), np.linspace(0.0, 0.1, 12), ["a"], warmup_s=0.0, slo_s=1.0, drain_s=1.0)
    assert r["failed"] == 4 and set(r["_errors"]) == {"", "ValueError"}
    saved = load.public(r)
    assert not any(k.startswith("_") for k in saved) and saved["failed"] == 4
    json.dumps(saved, default=float)  # replicas.py's and load.py's way
    cleaned = report._clean({**saved, "latencies_s": r["_latency"], "errors": r["_errors"]})  # report.py's way
    assert json.loads(json.dumps(cleaned))["errors"].count("ValueError") == 4


def test_a_baseline_computes_on_its_own_thread_count_whatever_another_thread_set_last():
    """A new thread takes torch's thread count last set in any thread: the
    FIFO baselines, started after an engine's one-thread replicas, ran on one."""
    import torch

    before = torch.get_num_threads()
    other = threading.Thread(target=torch.set_num_threads, args=(1,))
    other.start(), other.join()
    try:
        b = common.SerialBackend("threads", lambda texts: [torch.get_num_threads()], threads=2)
        assert b.submit("x").result(timeout=30) == 2 == b.threads
        b.close()
        assert common.SerialBackend("default", lambda texts: [0]).threads == common.usable_cores()
    finally:
        other = threading.Thread(target=torch.set_num_threads, args=(before,))
        other.start(), other.join()
        torch.set_num_threads(before)


def test_the_bf16_isa_ab_refuses_a_cpu_without_avx512_bf16(monkeypatch, capsys):
    ab = pytest.importorskip("bf16_isa_ab")
    from fastserve import kernels

    monkeypatch.setattr(kernels, "cpu_isa", lambda: "avx2")
    assert ab.main(["--rounds", "1"]) == 2
    assert "needs a CPU with AVX-512F and AVX512-BF16; the kernels here run avx2" in capsys.readouterr().err


def test_alternate_runs_each_arm_once_per_round_in_alternating_order():
    order: list[str] = []
    out = common.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, n=10, rounds=4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    for arm in ("a", "b"):
        rates = out[arm]["texts_per_s"]
        assert len(rates) == 4 and all(r > 0 for r in rates)
        assert out[arm]["best"] == max(rates) and min(rates) <= out[arm]["median"] <= max(rates)


def test_the_gemm_ab_refuses_a_torch_without_onednn(monkeypatch, capsys):
    ab = pytest.importorskip("gemm_ab")
    from fastserve import gemm

    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    assert ab.main(["--rounds", "1"]) == 2
    assert "this torch has no oneDNN" in capsys.readouterr().err


def test_the_gemm_ab_says_it_does_not_apply_where_onednn_has_no_bfloat16(monkeypatch, capsys):
    # A CPU without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: "does not apply"
    # (exit 2, which cpu_dtypes.sh reports as skipped), not a traceback.
    ab = pytest.importorskip("gemm_ab")
    import torch
    from fastserve import gemm

    real = gemm.onednn_cannot
    monkeypatch.setattr(gemm, "onednn_cannot", lambda dtype: "no bf16 here" if dtype == torch.bfloat16 else real(dtype))
    assert ab.main(["--rounds", "1", "--dtype", "bfloat16"]) == 2
    assert "oneDNN cannot run bfloat16 products here: no bf16 here" in capsys.readouterr().err


def test_the_op_profile_times_every_product_and_kernel_and_restores_them(tmp_path):
    prof = pytest.importorskip("op_profile")
    from fastserve import gemm, kernels, runners

    if not kernels.cpu_vector_paths():
        pytest.skip("the CPU layer kernels run only where their AVX2 path does")
    before = (gemm.Gemm.__call__, kernels.attention, kernels.bias_gelu_, kernels.add_layer_norm_,
              runners.PackedRunner.run)
    out = tmp_path / "prof.json"
    assert prof.main(["--n", "10", "--out", str(out)]) == 0
    assert (gemm.Gemm.__call__, kernels.attention, kernels.bias_gelu_, kernels.add_layer_norm_,
            runners.PackedRunner.run) == before
    import json

    res = json.loads(out.read_text())
    assert [m["mix"] for m in res["mixes"]] == ["corpus", "long-tail"] and res["gemm"] in gemm.GEMMS
    for mix in res["mixes"]:
        ops = mix["thread_seconds"]
        # MiniLM's four products, the three kernels, inside the runner's time.
        assert {"product 1152x384", "product 384x384", "product 1536x384", "product 384x1536", "attention",
                "bias_gelu_", "add_layer_norm_", "runner"} == set(ops)
        assert sum(v for k, v in ops.items() if k != "runner") <= ops["runner"] + 5e-3  # each figure rounded to 1 ms
        assert mix["products_gflops_per_thread"] > 0


def test_the_autocast_ab_compares_the_fused_layers_with_the_modules(tmp_path):
    ab = pytest.importorskip("autocast_ab")
    from fastserve import kernels

    if not kernels.cpu_vector_paths() or kernels.for_device("cpu").name != "cpu":
        pytest.skip("the CPU layer kernels run only where their AVX2 path does, and not under FASTSERVE_KERNELS=torch")
    out = tmp_path / "ab.json"
    assert ab.main(["--n", "6", "--rounds", "1", "--emulated", "--out", str(out)]) == 0
    import json

    res = json.loads(out.read_text())
    assert res["copies_bytes"] > 0
    for mix in ("corpus", "long-tail"):
        assert set(res[mix]) == {"fused", "modules", "bfloat16"}
        for arm in res[mix].values():
            assert len(arm["texts_per_s"]) == 1 and arm["min_cosine_vs_float32"] > 0.999


def test_the_batch_threads_ab_times_each_batch_on_the_counts_it_names(tmp_path):
    bt = pytest.importorskip("batch_threads")
    out = tmp_path / "bt.json"
    assert bt.main(["--rounds", "1", "--n", "40", "--out", str(out)]) == 0
    import json

    res = json.loads(out.read_text())
    (minilm,) = res["models"]
    rows = {r["batch"]: r for r in minilm["rows"]}
    assert list(rows) == ["1 text", "2 texts", "4 texts", "8 texts", "16 texts", "offline"]
    # One text is far below tokens_per_thread: one thread, seen in the engine's own count.
    assert rows["1 text"]["threads_per_batch"] == 1 and rows["1 text"]["texts"] == 1
    for r in rows.values():
        assert set(r["ms"]) == {"all threads", "per batch", "1 thread"}
        assert all(v["median"] >= v["best"] > 0 for v in r["ms"].values())


def test_the_autocast_ab_does_not_apply_without_native_bfloat16(monkeypatch, capsys):
    ab = pytest.importorskip("autocast_ab")
    from fastserve import precision

    real = precision.cpu_features
    monkeypatch.setattr(precision, "cpu_features", lambda: dict(real(), native_bf16=False))
    assert ab.main(["--n", "6", "--rounds", "1"]) == 2
    assert "needs a CPU with native bfloat16" in capsys.readouterr().err


def test_the_weight_checks_time_the_check_and_see_every_layer_rebuilt(tmp_path):
    wc = pytest.importorskip("weight_checks")
    from fastserve import kernels

    if not kernels.cpu_vector_paths() or kernels.for_device("cpu").name != "cpu":
        pytest.skip("the CPU layer kernels run only where their AVX2 path does, and not under FASTSERVE_KERNELS=torch")
    out = tmp_path / "checks.json"
    assert wc.main(["--rounds", "2", "--no-shared", "--out", str(out)]) == 0
    import json

    (row,) = json.loads(out.read_text())["rows"]
    assert (row["model"], row["layers"], row["hidden"]) == ("loaded", 6, 384)
    assert row["every_layer_rebuilt"] is True
    assert 0 < row["check_us"]["min"] <= row["check_us"]["median"] <= row["check_us"]["max"]
    assert row["one_text_p50_ms"] > 0 and row["every_layer_changed"]["first_batch_ms"] > 0
