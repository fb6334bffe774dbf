"""The CPU layer kernels' products (python/fastserve/gemm.py) alone, at
MiniLM's four weight shapes, one thread:

1. oneDNN's shape cache, each mode in a fresh process: the process's
   resident memory while products of random row counts (1 to 2,048) run,
   and the time they took;
2. GFLOP/s per product at fixed row counts, the modes alternating in one
   process (best of --rounds timings of 10 calls).

Modes:

- "mm": torch.mm (MKL's sgemm in float32);
- "onednn": gemm.Gemm(..., "onednn"), rows in pieces of six fixed sizes;
- "onednn-whole": one oneDNN call per product (a new shape per row count),
  what the pieces avoid.

Also checks products against torch.mm. Figures: benchmarks/README.md,
"oneDNN GEMMs".

    python benchmarks/python/gemm_micro.py --batches 300 --out micro.json
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

import common

MODES = ("mm", "onednn", "onednn-whole")
SHAPES = ((1152, 384), (384, 384), (1536, 384), (384, 1536))  # MiniLM's Q/K/V, output, up, down: [N, K]
ROWS = (16, 64, 256, 512, 1000, 2048)


def one(mode: str, batches: int, seed: int) -> dict:
    import torch

    from fastserve.gemm import Gemm, onednn_linear

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    weights = [torch.randn(n, k) for n, k in SHAPES]
    gemms = [Gemm(w, "mm" if mode == "mm" else "onednn") for w in weights]
    inputs = {k: torch.randn(2048, k) for k in {k for _, k in SHAPES}}  # rows sliced off stay contiguous
    rng = random.Random(seed)
    start, t0, trace, worst = common.rss_mib(), time.perf_counter(), [], 0.0
    for i in range(batches):
        rows = rng.randint(1, 2048)
        for w, g in zip(weights, gemms):
            x = inputs[w.shape[1]][:rows]
            if mode == "onednn-whole":
                y = onednn_linear(x, g.packed)
            else:
                y = g(x)
            if i % 25 == 0:
                worst = max(worst, float((y - torch.mm(x, w.t())).abs().max()))
        if (i + 1) % max(1, batches // 6) == 0 or i + 1 == batches:
            trace.append({"batches": i + 1, "rss_growth_mib": round(common.rss_mib() - start, 1),
                          "seconds": round(time.perf_counter() - t0, 2)})
    return {"mode": mode, "trace": trace, "max_abs_diff_vs_mm": worst}


def products(seed: int, rounds: int) -> dict[str, dict[str, float]]:
    """GFLOP/s per product and mode, one thread, in one process: for each
    shape and row count the modes alternate, `rounds` timings of 10 calls
    each, the best kept (modes timed minutes apart in separate processes
    drifted by 15% on the project's VMs)."""
    import torch

    from fastserve.gemm import Gemm, onednn_linear

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    out: dict[str, dict[str, float]] = {m: {} for m in MODES}
    for n, k in SHAPES:
        w = torch.randn(n, k)
        mm, onednn = Gemm(w, "mm"), Gemm(w, "onednn")
        for rows in ROWS:
            x = torch.randn(rows, k)
            calls = {"mm": lambda: mm(x), "onednn": lambda: onednn(x),
                     "onednn-whole": lambda: onednn_linear(x, onednn.packed)}
            best = {m: float("inf") for m in MODES}
            for c in calls.values():
                c()
            for _ in range(rounds):
                for m, c in calls.items():
                    best[m] = min(best[m], timed(c, 10))
            for m in MODES:
                out[m][f"{n}x{k}@{rows}"] = round(2 * rows * n * k / best[m] / 1e9, 1)
    return out


def timed(call, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=7, help="alternating timings per product")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in this process
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(one(args.mode, args.batches, args.seed)))
        return 0
    from fastserve import gemm

    if not gemm.onednn_available():
        print("needs a torch built with oneDNN", file=sys.stderr)
        return 2
    res = []
    for mode in MODES:
        run = subprocess.run([sys.executable, __file__, "--mode", mode, "--batches", str(args.batches),
                              "--seed", str(args.seed)], capture_output=True, text=True, check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        res.append(r)
        steps = ", ".join(f"{t['batches']}: +{t['rss_growth_mib']:.0f} MiB" for t in r["trace"])
        print(f"{mode}: {steps}; {r['trace'][-1]['seconds']:.1f} s; max |diff| against torch.mm "
              f"{r['max_abs_diff_vs_mm']:.1e}", flush=True)
    gflops = products(args.seed, args.rounds)
    print("\nGFLOP/s per product, one thread, modes alternating, best of "
          f"{args.rounds} (N x K @ rows): " + " / ".join(MODES))
    for key in gflops["mm"]:
        print(f"  {key}: " + " / ".join(f"{gflops[m][key]:.0f}" for m in MODES))
    common.write_json(args.out, {"batches": args.batches, "seed": args.seed, "runs": res, "gflops": gflops})
    return 0


if __name__ == "__main__":
    sys.exit(main())
