"""A bulk list and single texts in one process: what `priority=` buys the
single texts.

The default engine (all-MiniLM-L6-v2). One thread embeds --bulk corpus texts
as one list at --priority; another, 0.3 s later, embeds a single short text
(timeout 30 s, the engine's default deadline) each 100 ms after the last
answer, until the list is done. Prints each single text's latency (ms), then
a summary line: how long the list took, and the texts' count, p50 and max.

    python benchmarks/python/priority_inproc.py --priority -100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--priority", type=int, default=-100, help="the bulk list's priority (the texts' is 0)")
    p.add_argument("--bulk", type=int, default=600)
    args = p.parse_args(argv)
    common.quiet()
    import fastserve

    texts = common.sample_texts(args.bulk, 1)
    with fastserve.Engine() as engine:
        engine.embed(texts[:64])  # warm
        took: list[float] = []

        def bulk() -> None:
            t0 = time.perf_counter()
            engine.embed(texts, priority=args.priority)
            took.append(time.perf_counter() - t0)

        thread = threading.Thread(target=bulk)
        thread.start()
        time.sleep(0.3)
        latencies = []
        while thread.is_alive():
            t0 = time.perf_counter()
            engine.embed("a short interactive query about the weather", timeout=30)
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.1)
        thread.join()
    ms = [round(x * 1000) for x in latencies]
    print(ms)
    print(f"bulk priority {args.priority}: bulk {took[0]:.2f} s; texts n={len(ms)} "
          f"p50 {statistics.median(ms):.0f} ms max {max(ms)} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
