"""The scheduler's submit alone, with the GIL held as the engine calls it:
`Scheduler.submit` of one list of 128 token ids (us per call, 20,000 calls)
and `Scheduler.submit_many` of 4,096 lists of 38 ids (the corpus' mean; ms
per call), on a fresh static scheduler with a manual clock, 7 rounds: the
least and the median. What reading the ids costs (tokens_from in
csrc/bindings/module.cpp). Run it against two builds to compare them.
Figures: benchmarks/README.md, "One request's host work, and the tokenizer".

    python benchmarks/python/submit_micro.py [--rounds 7] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import common


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from fastserve import _core

    ids = list(range(1000, 1128))
    lists = [list(range(1000, 1038)) for _ in range(4096)]

    def scheduler() -> "_core.Scheduler":
        return _core.Scheduler(
            _core.SchedulerConfig(max_queue_requests=1 << 20, max_queue_tokens=1 << 30),
            _core.ControllerConfig(policy="static", min_tokens=1, max_tokens=1 << 20, initial_tokens=1 << 20),
            _core.ManualClock(0.0))

    one, many = [], []
    for _ in range(args.rounds):
        s = scheduler()
        t0 = time.perf_counter()
        for _ in range(20000):
            s.submit(ids)
        one.append((time.perf_counter() - t0) / 20000 * 1e6)
        s = scheduler()
        t0 = time.perf_counter()
        s.submit_many(lists)
        many.append((time.perf_counter() - t0) * 1e3)
    out = {"rounds": args.rounds, "core": _core.__file__,
           "submit_128_ids_us": {"min": min(one), "median": statistics.median(one)},
           "submit_many_4096_lists_ms": {"min": min(many), "median": statistics.median(many)}}
    result = common.save_result("submit_micro.py", argv, out, None, "")
    common.write_json(args.out, result)
    print(f"submit of 128 ids: {min(one):.2f} us (median {statistics.median(one):.2f}); submit_many of 4,096 "
          f"lists: {min(many):.2f} ms (median {statistics.median(many):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
