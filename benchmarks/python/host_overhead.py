"""The engine's own host work per request, with the model taken out: the
default engine of a 2-layer BERT whose runner returns zeros at once (so the
figures are the engine's Python and C++ around a batch, what a fast GPU
leaves as the bound), one replica.

1. Offline: `embed(lists)` of N token lists (the corpus, tokenized
   beforehand), best and median of --rounds calls: us per request.
2. A caller beside a bulk job: while another thread embeds the N lists
   again and again, one caller submits a one-text list every 2 ms: its
   submit_many's latency (p50, p99, max): how long the bulk job's submits
   hold the engine's lock and the GIL.

Run it at two commits to compare them (the machine's noise: several runs,
alternating). Figures: benchmarks/README.md, "The engine's host work".

    python benchmarks/python/host_overhead.py [--n 4096] [--rounds 8] [--probes 400] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Any

import common


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--probes", type=int, default=400)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    common.quiet()
    import numpy as np

    import fastserve
    import tokenize_overlap

    model, tok = tokenize_overlap.fast_model(common.model_path())
    engine = fastserve.Engine(model, tokenizer=tok, max_length=common.max_seq_length(common.model_path()),
                              replicas=1)
    runner = engine._replicas[0].runner
    dim = engine.dim
    runner.run = lambda batch, **kw: np.zeros((int(batch.size), dim), np.float32)  # the model taken out
    lists = engine.tokenize(common.sample_texts(args.n, seed=1))
    one = engine.tokenize(["a short text"])
    for _ in range(2):
        engine.embed(lists)
    calls = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        engine.embed(lists)
        calls.append(time.perf_counter() - t0)
    stop = threading.Event()

    def bulk() -> None:
        while not stop.is_set():
            engine.embed(lists)

    worker = threading.Thread(target=bulk)
    worker.start()
    probes, futures = [], []
    try:
        for _ in range(args.probes):
            t0 = time.perf_counter()
            futures += engine.submit_many(one)  # the call alone: its future waits its turn in the queue
            probes.append(time.perf_counter() - t0)
            time.sleep(0.002)
    finally:
        stop.set()
        worker.join()
    for f in futures:
        f.result()
    engine.close()
    out: dict[str, Any] = {
        "n": args.n, "rounds": args.rounds, "probes": args.probes,
        "offline_ms": [c * 1e3 for c in calls],
        "offline_us_per_request": {"best": min(calls) / args.n * 1e6, "median": statistics.median(calls) / args.n * 1e6},
        "beside_bulk_ms": {"p50": float(np.percentile(probes, 50) * 1e3), "p99": float(np.percentile(probes, 99) * 1e3),
                           "max": max(probes) * 1e3},
    }
    result = common.save_result("host_overhead.py", argv, out, None, "")
    common.write_json(args.out, result)
    m = result["machine"]
    print(f"{m.get('Model name')} ({m.get('simd')}), main at {m.get('git_commit')}")
    print(f"offline: {out['offline_us_per_request']['best']:.1f} us per request (best), "
          f"{out['offline_us_per_request']['median']:.1f} (median)")
    b = out["beside_bulk_ms"]
    print(f"a one-text call beside a bulk job: p50 {b['p50']:.2f} ms, p99 {b['p99']:.2f} ms, max {b['max']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
