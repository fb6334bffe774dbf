"""Token buckets for bfloat16 CPU batches, with the layers' products through
oneDNN's pieces (python/fastserve/gemm.py) or through torch.mm.

A bfloat16 engine rounded every packed batch up to a token bucket
(shapes.py), so that oneDNN's cache of primitives, one per product shape,
stayed bounded. The pieces bound the products' shapes themselves, so an
engine whose products run through them no longer rounds
(process.onednn_buckets). Two parts:

1. oneDNN's cache: for each arm (products "mm" or "onednn", batches rounded
   to buckets or not) a fresh process embeds --batches lists of 1 to 39
   random corpus texts with one default bfloat16 engine, one replica: the
   growth of its resident memory every 50 batches, MiB, and the time.
2. What the buckets cost: two default bfloat16 engines whose products run
   through the pieces, one rounding to buckets and one not, alternating
   (common.alternate), `embed` of --n texts per mix (cpu_dtype.py's), with
   the largest difference between their embeddings.

An arm's buckets are the engine's own, decided as it is built: for the arms
that differ from the default, process.onednn_buckets is replaced while the
engine is built (so its scheduler forms batches within a bucket, its budget
knows them, and its stats say "on, token buckets" or "on"). Exits 2 where
oneDNN cannot run bfloat16 products. Figures: benchmarks/README.md, "bfloat16 products through oneDNN".

    python benchmarks/python/bf16_buckets.py [--batches 300] [--rounds 6] [--n 400] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import common

ARMS = (("mm", True), ("mm", False), ("onednn", True), ("onednn", False))


def engine(products: str, buckets: bool, **kw: Any) -> Any:
    """A default bfloat16 engine with its products through `products` and
    its batches rounded to token buckets or not, as built."""
    from unittest import mock

    import fastserve
    from fastserve import process

    with common.env("FASTSERVE_CPU_GEMM", products), \
            mock.patch.object(process, "onednn_buckets", lambda *a, **k: buckets):
        e = fastserve.Engine(str(common.model_path()), dtype="bfloat16", **kw)
    want = "on, token buckets" if buckets else "on"
    if e.stats()["gemm"] != products or e.stats()["process"]["onednn"] != want:
        raise RuntimeError(f"the engine runs {e.stats()['gemm']!r}, oneDNN {e.stats()['process']['onednn']!r}; "
                           f"wanted {products!r}, {want!r}")
    return e


def cache_arm(products: str, buckets: bool, batches: int) -> dict[str, Any]:
    """Part 1 in this process (a fresh one per arm: oneDNN's cache is the process's)."""
    import numpy as np

    e = engine(products, buckets, replicas=1)
    texts = common.sample_texts(2000, seed=3)
    rng = np.random.default_rng(0)
    e.embed(texts[:50])
    start, marks = common.rss_mib(), []
    t0 = time.perf_counter()
    for i in range(batches):
        k, s = int(rng.integers(1, 40)), int(rng.integers(0, len(texts) - 40))
        e.embed(texts[s : s + k])
        if i % 50 == 49:
            marks.append(round(common.rss_mib() - start, 1))
    out = {"products": e.stats()["gemm"], "buckets": buckets, "rss_growth_mib": marks,
           "seconds": time.perf_counter() - t0}
    e.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.ab_parser(__doc__)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # "products:buckets", a child of part 1
    args = p.parse_args(argv)
    common.quiet()
    if args.arm:  # a child of part 1
        products, buckets = args.arm.split(":")
        print(json.dumps(cache_arm(products, buckets == "1", args.batches)))
        return 0
    import numpy as np
    import torch

    import cpu_dtype
    from fastserve import gemm

    why = gemm.onednn_cannot(torch.bfloat16)
    if why:
        print(f"oneDNN cannot run bfloat16 products here: {why}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"batches": args.batches, "rounds": args.rounds, "n": args.n, "cache": []}
    for products, buckets in ARMS:
        run = subprocess.run([sys.executable, __file__, "--arm", f"{products}:{int(buckets)}",
                              "--batches", str(args.batches)], capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr, file=sys.stderr)
            return 1
        arm = json.loads(run.stdout.strip().splitlines()[-1])
        out["cache"].append(arm)
        print(f"products {products}, buckets {'on' if buckets else 'off'}: resident memory +"
              f"{' / '.join(map(str, arm['rss_growth_mib']))} MiB every 50 batches, {arm['seconds']:.1f} s", flush=True)
    engines = {"buckets": engine("onednn", True), "none": engine("onednn", False)}
    try:
        for name, texts in cpu_dtype.mixes(args.n, 0).items():
            vecs = {k: e.embed(texts) for k, e in engines.items()}
            res = common.alternate({k: (lambda e=e, t=texts: e.embed(t)) for k, e in engines.items()},
                                   len(texts), args.rounds)
            res["max_abs_diff"] = float(np.abs(vecs["buckets"] - vecs["none"]).max())
            out[name] = res
            a, b = res["none"], res["buckets"]
            print(f"{name}: texts/s without buckets median {a['median']:.1f}, with {b['median']:.1f}; "
                  f"{common.versus(a, b, 'without / with')}; max |diff| {res['max_abs_diff']:.2e}", flush=True)
    finally:
        for e in engines.values():
            e.close()
    common.write_json(args.out, common.save_result("bf16_buckets.py", argv, out, None, ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
