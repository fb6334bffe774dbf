"""A bulk job and interactive requests on one HTTP server: what the
`X-Fastserve-Priority` header buys the interactive ones.

One `fastserve serve` (the default engine: all-MiniLM-L6-v2, request timeout
30 s) in its own process on 127.0.0.1. In each arm, for --seconds:
- bulk: --bulk-clients clients, each posting lists of --bulk-size corpus
  texts back to back (an indexing job), with or without the header
  (`X-Fastserve-Priority: -100`);
- interactive: one client posting a single short text, then pausing
  --gap-ms, over and over (a user's queries), at the default priority, in
  the third arm with its latency need as its deadline
  (`X-Fastserve-Timeout: --interactive-timeout`).
Arms: "plain" (no header), "lowered" (the bulk job's header), "lowered +
deadline" (both headers). They alternate, --rounds each, on the same server,
so drift in the shared machine hits all of them. Reported per arm:
the interactive requests' latency at the client (p50, p95, max) and the
server's share of it (its x-total-time and x-queue-time headers, p95), their
count and failures, and the bulk inputs the engine completed per second
(its completed count over the arm, less the interactive ones: what lowering
costs the bulk job).

    python benchmarks/python/http_priority.py --out benchmarks/results/http_priority
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from http_bench import HttpBackend  # noqa: E402

LOWERED = "-100"  # one level is 0.5 s of waiting (aging): -100 stays behind fresh default requests for 50 s
QUERY = "how do I reset my password"


def completed(base: str) -> float:
    """The engine's completed requests, from /metrics."""
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line.startswith('fastserve_engine_requests_total{outcome="completed"}'):
            return float(line.split()[-1])
    raise RuntimeError("no completed count in /metrics")


def pct(values: list[float], p: float) -> float | None:
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))] if v else None


def arm(base: str, header: str | None, timeout: str | None, seconds: float, bulk_clients: int,
        bulk_texts: list[str], gap_s: float) -> dict[str, Any]:
    stop = threading.Event()
    bulk_errors: list[str] = []

    def bulk(k: int) -> None:
        headers = {"X-Fastserve-Priority": header} if header else {}
        with httpx.Client(base_url=base, timeout=120) as c:
            while not stop.is_set():
                r = c.post("/v1/embeddings", json={"input": bulk_texts}, headers=headers)
                if r.status_code != 200:
                    bulk_errors.append(f"{r.status_code} {r.text[:120]}")

    threads = [threading.Thread(target=bulk, args=(k,), daemon=True) for k in range(bulk_clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the bulk job is under way before the first query
    latencies: list[float] = []
    server_ms: list[float] = []
    queue_ms: list[float] = []
    failures: list[str] = []
    done0 = completed(base)
    t0 = time.perf_counter()
    asked = {"X-Fastserve-Timeout": timeout} if timeout else {}
    with httpx.Client(base_url=base, timeout=120) as c:
        while time.perf_counter() - t0 < seconds:
            s = time.perf_counter()
            r = c.post("/v1/embeddings", json={"input": QUERY}, headers=asked)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - s)
                server_ms.append(float(r.headers["x-total-time"]))
                queue_ms.append(float(r.headers["x-queue-time"]))
            else:
                failures.append(f"{r.status_code} {r.text[:120]}")
            time.sleep(gap_s)
    elapsed = time.perf_counter() - t0
    bulk_done = completed(base) - done0 - len(latencies) - len(failures)
    stop.set()
    for t in threads:
        t.join()
    ms = [x * 1e3 for x in latencies]
    return {"bulk_priority": header, "interactive_timeout": timeout, "interactive_n": len(ms), "interactive_failures": failures[:5],
            "interactive_failed": len(failures), "p50_ms": statistics.median(ms) if ms else None,
            "p95_ms": pct(ms, 0.95), "max_ms": max(ms, default=None),
            "server_p95_ms": pct(server_ms, 0.95), "queue_p95_ms": pct(queue_ms, 0.95),
            "bulk_texts_per_s": bulk_done / elapsed, "bulk_errors": bulk_errors[:5],
            "bulk_failed": len(bulk_errors)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="interactive queries per arm and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bulk-clients", type=int, default=1)
    p.add_argument("--bulk-size", type=int, default=600)
    p.add_argument("--gap-ms", type=float, default=200.0)
    p.add_argument("--interactive-timeout", default="0.1", help="the third arm's X-Fastserve-Timeout (seconds)")
    p.add_argument("--out", default=None, help="folder for http_priority.json")
    args = p.parse_args(argv)
    common.quiet()
    texts = common.sample_texts(args.bulk_size, 7)
    server = HttpBackend("fastserve/http")
    base = f"http://127.0.0.1:{server.port}"
    try:
        httpx.post(base + "/v1/embeddings", json={"input": texts[:64]}, timeout=120)  # warm
        runs = []
        for r in range(args.rounds):
            for name, header, timeout in (("plain", None, None), ("lowered", LOWERED, None),
                                          ("lowered + deadline", LOWERED, args.interactive_timeout)):
                res = arm(base, header, timeout, args.seconds, args.bulk_clients, texts, args.gap_ms / 1e3)
                res["round"], res["arm"] = r, name
                runs.append(res)
                print(f"round {r} {name:>18}: interactive n={res['interactive_n']} "
                      f"p50 {res['p50_ms']:.0f} ms p95 {res['p95_ms']:.0f} ms max {res['max_ms']:.0f} ms "
                      f"(server p95 {res['server_p95_ms']:.0f}, queue p95 {res['queue_p95_ms']:.0f}) "
                      f"failed {res['interactive_failed']}; bulk {res['bulk_texts_per_s']:.1f} texts/s "
                      f"failed {res['bulk_failed']}", *res["interactive_failures"][:2], flush=True)
    finally:
        server.close()
    common.save_result("http_priority.py", argv, {"runs": runs, "args": vars(args)}, args.out, "http_priority.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
