"""How long one large request stalls the HTTP server's event loop.

`fastserve.server.create_app(Engine(...))` served by uvicorn in a thread of
this process, a 1 ms ticker on its event loop recording the longest gap
between ticks, and a client in another process (no GIL shared with the
server) posting one large /v1/embeddings request at a time: 2,048
one-character texts, then 2,048 token-id lists. Each request is timed
`--runs` times; the figure is each run's longest gap, which is what every
other request on the server waited at most meanwhile.

    python benchmarks/python/loop_stall.py [--wide] [--no-freeze-gc] [--runs 3] [--out DIR]

--wide serves a random BERT of hidden size 1,024 and one layer (a wide
answer, little compute) instead of all-MiniLM-L6-v2 (384). --no-freeze-gc
builds the engine with freeze_gc=False (the garbage collector's full passes
then walk every object torch and transformers keep alive).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import common

CLIENT = ("import httpx, json, sys\n"
          "r = httpx.post(sys.argv[1] + '/v1/embeddings', json=json.loads(sys.argv[2]), timeout=300)\n"
          "print(r.status_code, len(r.content))")

REQUESTS = {"2048 one-character texts": {"input": ["a"] * 2048},
            "2048 token-id lists": {"input": [[101, 102]] * 2048}}


class Ticked:
    """An ASGI app that starts a 1 ms ticker on the event loop at its first call."""

    def __init__(self, app) -> None:
        self.app = app
        self.worst = 0.0
        self._task = None

    async def __call__(self, scope, receive, send):
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._tick())
        await self.app(scope, receive, send)

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last)
            last = now


def wide_model():
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(common.model_path()))
    cfg = AutoConfig.for_model("bert", vocab_size=tok.vocab_size, hidden_size=1024, num_hidden_layers=1,
                               num_attention_heads=16, intermediate_size=1024, max_position_embeddings=512)
    return AutoModel.from_config(cfg).eval(), tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wide", action="store_true")
    p.add_argument("--no-freeze-gc", action="store_true")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None, help="folder for loop_stall.json")
    args = p.parse_args(argv)
    common.quiet()
    import uvicorn

    import fastserve
    from fastserve.server import create_app

    model, tok = wide_model() if args.wide else (None, None)
    engine = fastserve.Engine(model, tok, replicas=1, freeze_gc=not args.no_freeze_gc)
    ticked = Ticked(create_app(engine))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(ticked, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    try:
        while not server.started:
            time.sleep(0.05)
        subprocess.run([sys.executable, "-c", "import httpx, sys; httpx.get(sys.argv[1] + '/health')", url],
                       check=True)
        for name, body in REQUESTS.items():
            gaps = []
            for _ in range(args.runs):
                time.sleep(0.3)
                ticked.worst = 0.0
                out = subprocess.run([sys.executable, "-c", CLIENT, url, json.dumps(body)], capture_output=True,
                                     text=True, check=True)
                time.sleep(0.2)
                gaps.append(ticked.worst * 1e3)
            rows.append({"request": name, "answer": out.stdout.strip(), "worst_gap_ms": gaps})
            print(f"dim {engine.dim}, freeze_gc={not args.no_freeze_gc}, {name} ({out.stdout.strip()}): "
                  f"longest loop gap per run " + " ".join(f"{g:.0f}" for g in gaps) + " ms", flush=True)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.close()
    common.save_result("loop_stall.py", argv, {"dim": engine.dim, "freeze_gc": not args.no_freeze_gc,
                                               "rows": rows}, args.out, "loop_stall.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
