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
3. One request at a time (the 1.0 ms single-request target's host part):
   `embed(text)` of a text of --tokens tokens end to end, p50 and p99 over
   --singles calls; of it, the text's tokenization alone (`tokenize`) and
   the round trip of its token ids (`submit_tokens(ids).result()`: the
   submit, the hand-offs to the worker and back, the worker's Python
   around the runner).
4. Tokenizing the N texts alone (`tokenize(texts)`, best of --rounds):
   texts per second, what an offline call on a fast GPU is bound by.

Run it at two commits to compare them (the machine's noise: several runs,
alternating). Figures: benchmarks/README.md, "The engine's host work".

    python benchmarks/python/host_overhead.py [--n 4096] [--rounds 8] [--probes 400] [--singles 2000]
        [--tokens 128] [--out FILE]
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
    p.add_argument("--singles", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=128)
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
    texts = common.sample_texts(args.n, seed=1)
    lists = engine.tokenize(texts)
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
    single = one_at_a_time(engine, common.text_of(tok, args.tokens), args.singles)
    tokenizing = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        engine.tokenize(texts)
        tokenizing.append(time.perf_counter() - t0)
    engine.close()
    out: dict[str, Any] = {
        "n": args.n, "rounds": args.rounds, "probes": args.probes,
        "offline_ms": [c * 1e3 for c in calls],
        "offline_us_per_request": {"best": min(calls) / args.n * 1e6, "median": statistics.median(calls) / args.n * 1e6},
        "beside_bulk_ms": {"p50": float(np.percentile(probes, 50) * 1e3), "p99": float(np.percentile(probes, 99) * 1e3),
                           "max": max(probes) * 1e3},
        "one_request_us": single,
        "tokenize_texts_per_s": args.n / min(tokenizing),
    }
    result = common.save_result("host_overhead.py", argv, out, None, "")
    common.write_json(args.out, result)
    m = result["machine"]
    print(f"{m.get('Model name')} ({m.get('simd')}), main at {m.get('git_commit')}")
    print(f"offline: {out['offline_us_per_request']['best']:.1f} us per request (best), "
          f"{out['offline_us_per_request']['median']:.1f} (median)")
    b = out["beside_bulk_ms"]
    print(f"a one-text call beside a bulk job: p50 {b['p50']:.2f} ms, p99 {b['p99']:.2f} ms, max {b['max']:.2f} ms")
    s = out["one_request_us"]
    print(f"one request of {args.tokens} tokens at a time, us (p50 / p99): embed(text) {s['embed_p50']:.1f} / "
          f"{s['embed_p99']:.1f}; tokenize alone {s['tokenize_p50']:.1f}; submit_tokens round trip "
          f"{s['round_trip_p50']:.1f} / {s['round_trip_p99']:.1f}")
    print(f"tokenizing {args.n} texts alone: {out['tokenize_texts_per_s']:.0f} texts/s (best of {args.rounds})")
    return 0


def one_at_a_time(engine: Any, text: str, calls: int) -> dict[str, float]:
    """Section 3: embed(text), tokenize([text]) and submit_tokens(ids).result(),
    interleaved in rounds, us."""
    import numpy as np

    ids = engine.tokenize([text])[0]
    fns = {"embed": lambda: engine.embed(text), "tokenize": lambda: engine.tokenize([text]),
           "round_trip": lambda: engine.submit_tokens(ids).result()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(50):
            fn()
    rounds = 5
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls // rounds):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, t in times.items():
        a = np.array(t) * 1e6
        out[f"{name}_p50"], out[f"{name}_p99"] = float(np.percentile(a, 50)), float(np.percentile(a, 99))
    return out


if __name__ == "__main__":
    sys.exit(main())
