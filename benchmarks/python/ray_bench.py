"""The Ray Serve path against in-process and against `fastserve serve`, side
by side in one run on this machine, and Ray Serve with 1 and 2 replicas.

The same model (all-MiniLM-L6-v2, fp32, policy "model") is driven four ways:
- in-process: `await engine.aembed(text)` from an asyncio client loop;
- `fastserve serve` in a subprocess on 127.0.0.1 (one engine, 2 torch threads);
- Ray Serve, 1 replica (`fastserve.ray.app(num_replicas=1, num_cpus=2)`: one
  engine, 2 torch threads), through Serve's HTTP proxy on 127.0.0.1;
- Ray Serve, 2 replicas (num_cpus=1 each: two engines of 1 torch thread).
HTTP paths use the lean keep-alive HTTP/1.1 client of http_bench.py
(RawClient; BlockingClient for single requests). Ray runs one local node with
2 CPUs; its controller, proxy, GCS and raylet share the machine's 2 cores
with the replicas and the client, as they would on any node.

Two measurements per path:
- idle: one request at a time from a blocking caller (`engine.embed(text)`
  in-process), p50/p99 over --idle-calls after a warm-up; "added" is the p50
  against in-process;
- closed loop: --concurrency clients, each sending its next request when the
  last answers, for --duration seconds after a warm-up: requests/s and p50/p99.

    python benchmarks/python/ray_bench.py            # about 3 minutes
Writes benchmarks/results/ray.md and ray.json. Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

# Keep every Ray address on loopback (see tests/python/test_ray.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import orjson  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from http_bench import BlockingClient, HttpBackend, RawClient, _free_port  # noqa: E402

LOOPBACK = "127.0.0.1"


def _pcts(lat: list[float]) -> dict[str, float]:
    a = np.array(lat) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(a)}


def idle(call: Callable[[str], Any], texts: list[str], n: int) -> dict[str, float]:
    for t in texts[:20]:
        call(t)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        call(texts[i % len(texts)])
        lat.append(time.perf_counter() - t0)
    return _pcts(lat)


def closed_loop(request: Callable[[str], Awaitable[Any]], texts: list[str], concurrency: int,
                warmup: float, duration: float) -> dict[str, float]:
    async def run() -> dict[str, float]:
        lat: list[float] = []
        start = time.perf_counter()
        measure_from, end = start + warmup, start + warmup + duration

        async def client(k: int) -> None:
            i = k
            while (now := time.perf_counter()) < end:
                await request(texts[i % len(texts)])
                if now >= measure_from:
                    lat.append(time.perf_counter() - now)
                i += concurrency

        await asyncio.gather(*(client(k) for k in range(concurrency)))
        out = _pcts(lat)
        out["rps"] = len(lat) / (time.perf_counter() - measure_from)
        return out

    return asyncio.run(run())


def http_request(port: int) -> tuple[Callable[[str], Any], Callable[[str], Awaitable[Any]]]:
    """A blocking call and a coroutine posting one text to /v1/embeddings."""
    blocking = BlockingClient(LOOPBACK, port)
    state: dict[str, Any] = {}

    def call(text: str) -> Any:
        return orjson.loads(blocking.post("/v1/embeddings", orjson.dumps({"input": text})))

    async def request(text: str) -> Any:
        # One pool per event loop: closed_loop runs each measurement in a fresh loop.
        loop = asyncio.get_running_loop()
        if state.get("loop") is not loop:
            state["loop"], state["client"] = loop, RawClient(LOOPBACK, port)
        return orjson.loads(await state["client"].post("/v1/embeddings", orjson.dumps({"input": text})))

    return call, request


def measure(name: str, call, request, texts, args) -> dict[str, Any]:
    row = {"path": name, "idle": idle(call, texts, args.idle_calls),
           "closed_loop": closed_loop(request, texts, args.concurrency, args.warmup, args.duration)}
    print(f"{name:>22}: idle p50 {row['idle']['p50_ms']:.2f} ms, closed loop {row['closed_loop']['rps']:.1f} req/s "
          f"(p50 {row['closed_loop']['p50_ms']:.1f} ms, p99 {row['closed_loop']['p99_ms']:.1f} ms)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--idle-calls", type=int, default=200)
    args = p.parse_args(argv)
    common.quiet()
    import fastserve

    model = str(common.model_path())
    texts = common.sample_texts(2000, seed=11)
    rows = []

    engine = fastserve.Engine(model, torch_threads=2)
    try:
        rows.append(measure("in-process", lambda t: engine.embed(t), engine.aembed, texts, args))
    finally:
        engine.close()

    http = HttpBackend(server_args=(model, "--torch-threads", "2"))
    try:
        call, request = http_request(http.port)
        rows.append(measure("fastserve serve (HTTP)", call, request, texts, args))
    finally:
        http.close()

    import ray
    from ray import serve

    import fastserve.ray as fray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": LOOPBACK, "port": port})
        for replicas in (1, 2):
            # A fresh deployment each time: an in-place update to other
            # resources would start the new replicas before the old ones free
            # the node's 2 CPUs, and wait forever.
            serve.delete("bench")
            serve.run(fray.app(model, num_replicas=replicas, num_cpus=2 / replicas), name="bench", route_prefix="/")
            call, request = http_request(port)
            rows.append(measure(f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}", call, request,
                                texts, args))
        serve.shutdown()
    finally:
        ray.shutdown()

    base = rows[0]
    for r in rows:
        r["idle"]["added_p50_ms"] = r["idle"]["p50_ms"] - base["idle"]["p50_ms"]
        r["closed_loop"]["vs_in_process"] = r["closed_loop"]["rps"] / base["closed_loop"]["rps"]
    result = {"machine": common.machine(), "ray": ray.__version__, "args": vars(args), "rows": rows,
              "uptime": common.uptime()}
    out = common.RESULTS
    (out / "ray.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Ray Serve against in-process and `fastserve serve`",
        "",
        f"`python benchmarks/python/ray_bench.py` (concurrency {args.concurrency}, {args.duration:g} s measured "
        f"after {args.warmup:g} s warm-up, {args.idle_calls} idle calls); all-MiniLM-L6-v2 fp32; Ray {ray.__version__}, "
        f"one local node of 2 CPUs. CPU: {result['machine'].get('Model name')} "
        f"({result['machine'].get('simd')}), {result['machine'].get('usable_cores')} usable cores.",
        "",
        "| path | idle p50 ms | idle added ms | closed-loop req/s | vs in-process | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        i, c = r["idle"], r["closed_loop"]
        lines.append(f"| {r['path']} | {i['p50_ms']:.2f} | {i['added_p50_ms']:+.2f} | {c['rps']:.1f} | "
                     f"{c['vs_in_process']:.2f}x | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} |")
    (out / "ray.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
