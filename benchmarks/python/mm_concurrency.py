"""What k one-thread replicas can get from the CPU's matrix units: a
one-thread float32 `torch.mm` at MiniLM's shapes (2,048 tokens by 384 -> 1152,
384 -> 384, 384 -> 1536, 1536 -> 384, outputs preallocated), sustained for a
few seconds, alone and on k threads at once; and the square two-thread
product cpu_dtype.py takes its peak from (its matmul_peak). On a VM whose vCPUs share a
physical core's FMA units, two threads at once get about what one gets
alone, and the engine's two one-thread replicas are bounded by that, not
by twice the one-thread rate.

    python benchmarks/python/mm_concurrency.py --seconds 3 --rounds 3 --out DIR
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import torch

import common
import cpu_dtype

SHAPES = ((2048, 384, 1152), (2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384))


def one_thread_rate(seconds: float) -> float:
    """GFLOP/s of MiniLM's four GEMMs in turn on this thread (torch at 1 thread)."""
    ops = []
    for m, k, n in SHAPES:
        a, w, o = torch.randn(m, k), torch.randn(n, k), torch.empty(m, n)
        ops.append((a, w, o, 2.0 * m * k * n))
    for a, w, o, _ in ops:
        torch.mm(a, w.t(), out=o)
    flop, t0 = 0.0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for a, w, o, f in ops:
            torch.mm(a, w.t(), out=o)
            flop += f
    return flop / (time.perf_counter() - t0) / 1e9


def concurrent(k: int, seconds: float) -> list[float]:
    rates = [0.0] * k

    def work(i: int) -> None:
        rates[i] = one_thread_rate(seconds)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="k: threads at once")
    p.add_argument("--out", default=None, help="folder for mm_concurrency.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # each Python thread's mm on its own thread, as a one-thread replica runs
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        alone = one_thread_rate(args.seconds)
        together = concurrent(args.threads, args.seconds)
        torch.set_num_threads(args.threads)
        square = cpu_dtype.matmul_peak(torch.float32)
        torch.set_num_threads(1)
        rounds.append({"alone": alone, "together": together, "together_total": sum(together),
                       "square_mm_peak": square})
        print(f"round {r + 1}: one thread alone {alone:.1f} GFLOP/s; {args.threads} at once "
              f"{' + '.join(f'{x:.1f}' for x in together)} = {sum(together):.1f}; "
              f"square mm on {args.threads} threads {square:.1f}", flush=True)
    common.save_result("mm_concurrency.py", argv, {"rounds": rounds}, args.out, "mm_concurrency.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
