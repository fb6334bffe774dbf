"""HTTP against in-process, side by side in one run (issue "HTTP serving").

The same default engine (all-MiniLM-L6-v2, policy "model") is driven two
ways with the same seeded open-loop arrivals and texts:
- in-process: `engine.submit(text)`;
- HTTP: `POST /v1/embeddings {"input": text}` to `fastserve serve` in its own
  process on 127.0.0.1, from a lean asyncio HTTP/1.1 client with keep-alive
  connections (no thread per request; `--client httpx` uses httpx instead,
  which costs about 0.8 ms of CPU per request on this 2-core machine, CPU
  taken from the server and the model); latency includes JSON encoding and
  decoding (orjson) of the 384 floats.
Only one of the two is driven at a time; the idle one waits in the C++
scheduler and uses no CPU.

Targets: added p50 latency at low load <= 1 ms; best goodput within the
100 ms SLO over HTTP >= 90% of in-process.

    python benchmarks/python/http_bench.py            # about 2 minutes
Writes benchmarks/results/http.md and http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import load  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RawClient:
    """A minimal HTTP/1.1 client for the load generator: a pool of keep-alive
    connections (asyncio streams), one request in flight per connection, a
    request written as one buffer, the response read by its Content-Length.
    Enough for this server's JSON answers, and cheap enough not to compete
    with the server and the model for the machine's two cores."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> bytes:
        while self.idle:  # a kept-alive connection the server may have closed meanwhile
            reader, writer = self.idle.pop()
            try:
                return await self._exchange(reader, writer, path, body)
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await self._exchange(reader, writer, path, body)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                        body: bytes) -> bytes:
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        payload = await reader.readexactly(length)
        self.idle.append((reader, writer))
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        return payload

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class HttpBackend(common.Backend):
    """`fastserve serve` in a subprocess, driven from an asyncio loop thread by
    RawClient (or httpx)."""

    kind = "http"

    def __init__(self, name: str = "fastserve/http", client: str = "raw", server_args: tuple[str, ...] = ()) -> None:
        import httpx

        self.name = name
        self.port = _free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastserve.cli", "serve", "--port", str(self.port), "--log-level", "warning",
             *server_args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(base + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.2)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client_kind = client
        if client == "httpx":
            async def make() -> Any:
                limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
                return httpx.AsyncClient(base_url=base, limits=limits, timeout=60)

            self.client = asyncio.run_coroutine_threadsafe(make(), self.loop).result()
        else:
            self.client = RawClient("127.0.0.1", self.port)

    async def _post(self, text: str) -> list[float]:
        if self.client_kind == "httpx":
            r = await self.client.post("/v1/embeddings", json={"input": text})
            r.raise_for_status()
            return r.json()["data"][0]["embedding"]
        return orjson.loads(await self.client.post("/v1/embeddings", orjson.dumps({"input": text})))["data"][0][
            "embedding"]

    def submit(self, text: str) -> cf.Future:
        return asyncio.run_coroutine_threadsafe(self._post(text), self.loop)

    def stats(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9,1.1")
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--drain", type=float, default=1.5)
    p.add_argument("--idle-calls", type=int, default=60)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--client", choices=["raw", "httpx"], default="raw", help="the load generator's HTTP client")
    p.add_argument("--server-args", default="", help="extra `fastserve serve` options, e.g. '--torch-threads 1'")
    p.add_argument("--out", default=str(common.RESULTS))
    args = p.parse_args(argv)
    common.quiet()
    other = common.OtherCpu()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    up0 = common.uptime()

    inproc = common.FastServeBackend(common.fastserve_variants([], "auto", 50.0)[0])
    http = HttpBackend(client=args.client, server_args=tuple(args.server_args.split()))
    backends: dict[str, common.Backend] = {"in-process": inproc, "http": http}
    try:
        idle = common.idle_latency(backends, common.sample_texts(args.idle_calls, args.seed + 1))
        cap_texts = common.sample_texts(300, args.seed + 2)
        inproc.engine.embed(cap_texts[:32])
        t0 = time.perf_counter()
        inproc.engine.embed(cap_texts)
        capacity = len(cap_texts) / (time.perf_counter() - t0)
        texts = common.sample_texts(20000, args.seed)
        rows: list[dict[str, Any]] = []
        for k, frac in enumerate(float(f) for f in args.fractions.split(",")):
            rate = frac * capacity
            offsets = load.poisson_arrivals(rate, args.warmup + args.duration, args.seed * 100 + k)
            for name, b in backends.items():
                r = load.run_open_loop(b, offsets, texts, warmup_s=args.warmup, slo_s=args.slo_ms / 1000,
                                       drain_s=args.drain)
                r.pop("_arrivals", None)
                r.pop("_latency", None)
                rows.append({**r, "backend": name, "fraction": frac, "offered_rps": rate})
                lat = r["latency_s"]
                print(f"{frac:.1f}x {rate:6.1f}/s {name:10s} goodput {r['goodput_rps']:6.1f} "
                      f"p50 {lat['p50'] * 1000:7.1f} ms p99 {lat['p99'] * 1000:8.1f} ms", file=sys.stderr)
    finally:
        for b in backends.values():
            b.close()

    def best_goodput(name: str) -> float:
        ok = [r["goodput_rps"] for r in rows if r["backend"] == name and r["latency_s"]["p99"] <= args.slo_ms / 1000]
        return max(ok) if ok else 0.0

    low = min(float(f) for f in args.fractions.split(","))
    p50 = {r["backend"]: r["latency_s"]["p50"] for r in rows if r["fraction"] == low}
    added_ms = (p50["http"] - p50["in-process"]) * 1000
    idle_added_ms = (idle["http"]["median_s"] - idle["in-process"]["median_s"]) * 1000
    ratio = best_goodput("http") / best_goodput("in-process") if best_goodput("in-process") else float("nan")

    def max_goodput(name: str) -> float:  # requests within the SLO per second, at any load level
        return max(r["goodput_rps"] for r in rows if r["backend"] == name)

    any_ratio = max_goodput("http") / max_goodput("in-process")
    targets = [
        f"{'PASS' if added_ms <= 1.0 else 'FAIL'} added p50 at {low:.1f}x load: {added_ms:+.2f} ms "
        f"(HTTP {p50['http'] * 1000:.1f} ms, in-process {p50['in-process'] * 1000:.1f} ms; target <= 1 ms); "
        f"idle single request: {idle_added_ms:+.2f} ms",
        f"{'PASS' if ratio >= 0.9 else 'FAIL'} best goodput within {args.slo_ms:.0f} ms p99: HTTP "
        f"{best_goodput('http'):.1f} req/s = {ratio:.2f}x in-process ({best_goodput('in-process'):.1f}; target >= 0.90x)",
        f"{'PASS' if any_ratio >= 0.9 else 'FAIL'} highest goodput (requests done within {args.slo_ms:.0f} ms per "
        f"second, any load level, whatever the p99): HTTP {max_goodput('http'):.1f} req/s = {any_ratio:.2f}x "
        f"in-process ({max_goodput('in-process'):.1f})",
    ]
    for t in targets:
        print(t)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "http.json").write_text(json.dumps({"idle": idle, "capacity_rps": capacity, "rows": rows,
                                               "targets": targets}, indent=1, default=float))
    lines = [
        "# HTTP against in-process",
        "",
        f"Generated by `python benchmarks/python/http_bench.py` on {started}; machine: "
        f"{common.machine().get('Model name', '?')}, {os.cpu_count()} cores; `uptime` at start `{up0}`, "
        f"at end `{common.uptime()}`; other processes used {other.fraction():.0%} of the CPU.",
        "",
        "Same default engine (all-MiniLM-L6-v2, policy `model`, 50 ms target), same seeded Poisson arrivals "
        "and corpus texts; HTTP is `fastserve serve` in its own process on 127.0.0.1, driven by an asyncio "
        f"{'lean HTTP/1.1' if args.client == 'raw' else 'httpx'} client (keep-alive), latency from scheduled arrival "
        "to the decoded JSON response. Capacity "
        f"(in-process, standing backlog): {capacity:.1f} req/s.",
        "",
        "```", *targets, "```",
        "",
        f"Idle single request (median of {args.idle_calls}, alternating): in-process "
        f"{idle['in-process']['median_s'] * 1000:.2f} ms, HTTP {idle['http']['median_s'] * 1000:.2f} ms.",
        "",
        "| load | offered req/s | path | throughput req/s | goodput req/s | p50 ms | p99 ms |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lat = r["latency_s"]
        lines.append(f"| {r['fraction']:.1f} | {r['offered_rps']:.1f} | {r['backend']} | {r['throughput_rps']:.1f} | "
                     f"{r['goodput_rps']:.1f} | {lat['p50'] * 1000:.1f} | {lat['p99'] * 1000:.1f} |")
    (out / "http.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
