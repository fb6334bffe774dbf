"""Replicas on one CPU: one replica with all the cores against one replica
per core, with the embedded MiniLM (Engine(replicas=N), issue 14).

1. threads: is torch's intra-op thread count per thread? A worker thread
   calls torch.set_num_threads(k) and runs a [2048 x 384] x [384 x 1536]
   GEMM for a second; process CPU time over wall time says how many cores
   it kept busy (the other threads idle), and what the main thread and a
   fresh thread see afterwards.
2. memory: resident memory of a fresh process holding Engine(replicas=1)
   and Engine(replicas=2) (replicas on one device share the weights), after
   the same warm-up, beside the model's parameter bytes; the same with one
   malloc arena for all threads (glibc gives each thread its own, which
   keeps its peak activations), and with a deep copy of the weights held
   (what a copy per replica would add).
3. load: the open-loop load of load.py (Poisson arrivals, corpus texts,
   latency from the scheduled arrival, SLO 100 ms) at several rates against
   each configuration, in one process, the order alternating per rate.

    python benchmarks/python/replicas.py --rounds 2 --rates 20,40,60,80,100,120,140,160,200,240
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

import common
import load

CONFIGS = {
    "1 replica x 2 threads": {"replicas": 1, "torch_threads": 2},
    "2 replicas x 1 thread": {"replicas": 2, "torch_threads": 1},
}


def thread_counts(seconds: float = 1.0) -> dict[str, dict[str, float]]:
    import torch

    torch.set_num_threads(2)
    x, w = torch.randn(2048, 384), torch.randn(1536, 384)

    def busy() -> dict[str, float]:
        t0, c0, n = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - t0 < seconds:
            torch.nn.functional.linear(x, w)
            n += 1
        wall = time.perf_counter() - t0
        return {"torch_threads": torch.get_num_threads(), "cores_busy": (time.process_time() - c0) / wall,
                "gemms_per_s": n / wall}

    out: dict[str, dict[str, float]] = {}

    def in_thread(k: int, key: str) -> None:
        if k:
            torch.set_num_threads(k)
        out[key] = busy()

    out["main thread, set 2"] = busy()
    for k in (1, 2, 1):
        t = threading.Thread(target=in_thread, args=(k, f"worker thread, set {k} (then main)"))
        t.start()
        t.join()
    out["main thread after a worker set 1"] = busy()
    t = threading.Thread(target=in_thread, args=(0, "new thread, sets nothing"))
    t.start()
    t.join()
    pair = [threading.Thread(target=in_thread, args=(1, f"two workers at once, set 1: worker {i}")) for i in (0, 1)]
    c0, w0 = time.process_time(), time.perf_counter()
    for t in pair:
        t.start()
    for t in pair:
        t.join()
    out["two workers at once: whole process"] = {"cores_busy": (time.process_time() - c0) / (time.perf_counter() - w0)}
    torch.set_num_threads(2)
    return out


MEMORY_CHILD = r"""
import copy, ctypes, json, sys
sys.path.insert(0, {bench!r})
kw = json.loads(sys.argv[1])
if kw.pop("one_arena", False):  # before any thread starts: every thread allocates from the main arena
    assert ctypes.CDLL("libc.so.6").mallopt(-8, 1) == 1  # M_ARENA_MAX
weight_copy = kw.pop("weight_copy", False)
import common, fastserve
from fastserve import process
texts = common.sample_texts(256, seed=0)
with fastserve.Engine(**kw) as engine:
    held = copy.deepcopy(engine.model) if weight_copy else None  # what a copy per replica would hold
    for _ in range(3):
        engine.embed(texts)
    rss, peak = process.rss_bytes()
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    print(json.dumps({{"rss_bytes": rss, "peak_rss_bytes": peak, "param_bytes": params}}))
"""

MEMORY_CONFIGS = {
    **CONFIGS,
    "2 replicas x 1 thread, one malloc arena": {**CONFIGS["2 replicas x 1 thread"], "one_arena": True},
    "1 replica x 2 threads, one malloc arena": {**CONFIGS["1 replica x 2 threads"], "one_arena": True},
    "2 replicas x 1 thread + a copy of the weights": {**CONFIGS["2 replicas x 1 thread"], "weight_copy": True},
}


def memory(rounds: int = 2) -> dict[str, list[dict]]:
    """Each configuration in a fresh process, `rounds` times, alternating."""
    code = MEMORY_CHILD.format(bench=str(Path(__file__).parent))
    out: dict[str, list[dict]] = {name: [] for name in MEMORY_CONFIGS}
    for _ in range(rounds):
        for name, kw in MEMORY_CONFIGS.items():
            out[name].append(common.run_python_json(code, json.dumps(kw)))
    return out


def load_sweep(rates: list[float], rounds: int, duration: float, warmup: float, drain: float, slo_ms: float,
               seed: int) -> list[dict]:
    import fastserve

    texts = common.sample_texts(20000, seed)
    backends = {}
    for name, kw in CONFIGS.items():
        b = common.FastServeBackend(common.FastServeVariant(name, kw))
        b.engine.embed(texts[:256])  # warm-up
        backends[name] = b
    out = []
    try:
        for rnd in range(rounds):
            for i, rate in enumerate(rates):
                offsets = load.poisson_arrivals(rate, warmup + duration, seed + rnd * 7919 + int(rate * 1000))
                order = list(backends.items())
                if (i + rnd) % 2:
                    order.reverse()
                for name, b in order:
                    r = load.public(load.run_open_loop(b, offsets, texts, warmup_s=warmup, slo_s=slo_ms / 1000,
                                                       drain_s=drain))
                    r["round"], r["config"], r["rate"] = rnd, name, rate
                    print(f"round {rnd} rate {rate:6.1f} {name:<24} thru {r['throughput_rps']:6.1f} "
                          f"goodput {r['goodput_rps']:6.1f} p50 {common.fmt_ms(r['latency_s']['p50']):>8} "
                          f"p99 {common.fmt_ms(r['latency_s']['p99']):>8}", flush=True)
                    out.append(r)
    finally:
        for b in backends.values():
            b.close()
    del fastserve
    return out


def table(rows: list[dict]) -> str:
    """Medians over rounds per (nominal rate, config)."""
    lines = ["| rate req/s | configuration | offered req/s | throughput req/s | goodput within SLO req/s | p50 ms | "
             "p99 ms |", "|---:|---|---:|---:|---:|---:|---:|"]
    for rate in sorted({r["rate"] for r in rows}):
        for cfg in CONFIGS:
            rs = [r for r in rows if r["rate"] == rate and r["config"] == cfg]
            if not rs:
                continue

            def med(f):
                return float(np.median([f(r) for r in rs]))

            lines.append(
                f"| {rate:.0f} | {cfg} | {med(lambda r: r['offered_rps']):.1f} | {med(lambda r: r['throughput_rps']):.1f} "
                f"| {med(lambda r: r['goodput_rps']):.1f} | {common.fmt_ms(med(lambda r: r['latency_s']['p50']))} | "
                f"{common.fmt_ms(med(lambda r: r['latency_s']['p99']))} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="20,40,60,80,100,120,140,160,180,200,240")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--drain", type=float, default=2.0)
    ap.add_argument("--slo-ms", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: threads, memory, load")
    ap.add_argument("--out", default=str(common.RESULTS / "replicas.json"))
    args = ap.parse_args()
    common.quiet()
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"machine": common.machine(), "command": " ".join(sys.argv), "configs": CONFIGS}
    if "threads" not in skip:
        result["threads"] = thread_counts()
        for k, v in result["threads"].items():
            print(f"{k:<48} {v}")
    if "memory" not in skip:
        result["memory"] = memory(args.rounds)
        print(json.dumps(result["memory"], indent=1))
    if "load" not in skip:
        rates = [float(x) for x in args.rates.split(",")]
        result["load"] = load_sweep(rates, args.rounds, args.duration, args.warmup, args.drain, args.slo_ms, args.seed)
        result["table"] = table(result["load"])
        print(result["table"])
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
