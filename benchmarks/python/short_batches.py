"""Short batches on the CPU: one request at a time of exactly t tokens, end to
end in-process (`engine.embed(text)`, tokenization included), with the last
piece of each oneDNN product (python/fastserve/gemm.py) padded up to 4, 8 or
16 rows ("tail 4/8/16", the default) against padded up to 16 rows always
("tail 16", as before), A/B in one process: one default engine of the
embedded model, gemm.TAIL_MIN_ROWS switched between rounds, arms alternating
(the first arm first in even rounds, last in odd ones). Plain transformers
called directly on one torch thread (a replica's) is the reference. Also the
products alone: MiniLM's four weight shapes through oneDNN at 1 to 16 rows,
best of 5 timings, one thread.

Where the default engine runs its float32 products through torch.mm (an
Intel CPU, or one without AVX-512: gemm.default_method) the arms are the
same code and the script says so. Figures: benchmarks/README.md, "Short
batches through oneDNN".

    python benchmarks/python/short_batches.py [--tokens 3 6 10 14 20 33 60] [--requests 200] [--rounds 6] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import common

ARMS = {"tail 4/8/16": None, "tail 16": 16}  # gemm.TAIL_MIN_ROWS per arm (None: the module's own)


def products(rows: tuple[int, ...] = (1, 2, 4, 5, 8, 12, 16)) -> dict[str, dict[int, float]]:
    """us per oneDNN call at MiniLM's weight shapes and each row count (one thread, best of 5 x 40 calls)."""
    import torch

    from fastserve import gemm

    out: dict[str, dict[int, float]] = {}
    with torch.inference_mode():
        for n, k in ((1152, 384), (384, 384), (1536, 384), (384, 1536)):
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k), None)
            line = {}
            for m in rows:
                x = torch.randn(m, k)
                for _ in range(20):
                    gemm.onednn_linear(x, packed)
                best = float("inf")
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(40):
                        gemm.onednn_linear(x, packed)
                    best = min(best, (time.perf_counter() - t0) / 40)
                line[m] = best * 1e6
            out[f"{n}x{k}"] = line
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[3, 6, 10, 14, 20, 33, 60])
    p.add_argument("--requests", type=int, default=200, help="requests per arm, token count and round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args(argv)
    common.quiet()
    import numpy as np
    import torch

    import fastserve
    from fastserve import gemm

    engine = fastserve.Engine()
    method = engine.stats()["gemm"]
    hf = common.HFModel(common.model_path(), engine.max_length, "cpu", torch.float32)
    texts = {t: common.text_of(hf.tokenizer, t) for t in args.tokens}
    old = gemm.TAIL_MIN_ROWS

    def arm(tail: int | None) -> Callable[[str], float]:
        def once(text: str) -> float:
            gemm.TAIL_MIN_ROWS = old if tail is None else tail
            try:
                t0 = time.perf_counter()
                engine.embed(text)
                return time.perf_counter() - t0
            finally:
                gemm.TAIL_MIN_ROWS = old
        return once

    def transformers(text: str) -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t0 = time.perf_counter()
            hf.encode([text])
            return time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)

    runs: dict[str, Callable[[str], float]] = {name: arm(tail) for name, tail in ARMS.items()}
    runs["transformers, 1 thread"] = transformers
    times: dict[str, dict[int, list[float]]] = {name: {t: [] for t in args.tokens} for name in runs}
    for text in texts.values():  # warm every shape in every arm
        for fn in runs.values():
            for _ in range(5):
                fn(text)
    names = list(runs)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for t, text in texts.items():
                times[name][t] += [runs[name](text) for _ in range(args.requests)]
    table: dict[str, dict[int, dict[str, float]]] = {
        name: {t: {"p50_ms": 1e3 * statistics.median(v), "p90_ms": 1e3 * float(np.percentile(v, 90))}
               for t, v in per.items()} for name, per in times.items()}
    result: dict[str, Any] = {"gemm": method, "tail_min_rows": old, "rounds": args.rounds,
                              "requests": args.requests, "latency": table,
                              "products_us": products() if gemm.onednn_available() else None}
    result = common.save_result("short_batches.py", argv, result, None, "")
    common.write_json(args.out, result)
    m = result["machine"]
    print(f"{m.get('Model name')} ({m.get('simd')}) | gemm {method} | p50 ms per request, {args.rounds} rounds x {args.requests}")
    if method != "onednn":
        print("(the float32 products run through torch.mm here: both tail arms run the same code)")
    print("tokens | " + " | ".join(names) + " | tail 4/8/16 / tail 16")
    for t in args.tokens:
        row = [table[n][t]["p50_ms"] for n in names]
        print(f"{t} | " + " | ".join(f"{x:.2f}" for x in row) + f" | {row[0] / row[1]:.2f}x")
    if result["products_us"]:
        print("oneDNN call, us (one thread, best of 5): rows " + " ".join(map(str, next(iter(
            result["products_us"].values())))))
        for shape, line in result["products_us"].items():
            print(f"{shape}: " + " ".join(f"{v:.0f}" for v in line.values()))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
