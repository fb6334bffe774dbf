"""The CPU layer kernels' matrix products by method (python/fastserve/gemm.py),
A/B in one process: two engines that differ only in FASTSERVE_CPU_GEMM ("mm":
torch.mm, MKL's sgemm in float32; "onednn": oneDNN with the weights reordered
once, rows in pieces of fixed sizes), alternating, `embed` of 400 texts per
mix (cpu_dtype.py's corpus and long-tail mixes), static 2,048-token batches.
Also: the largest difference between the two engines' embeddings, the
process's resident memory after the warm-up and after every round (oneDNN's
cache of shapes stays bounded: gemm.pieces), and the reordered weights' bytes.
Figures: benchmarks/README.md, "oneDNN GEMMs".

With --whole, a third engine whose products each go through oneDNN in one
call (a new oneDNN shape per row count: what the pieces avoid; its cache
grows the process's memory), to price the pieces.

With --single T..., first one request at a time of exactly T tokens
(`embed(text)`, end to end in-process, tokenization included) through two
default engines (adaptive batches) that differ only in the method, 50
requests per arm and round, arms alternating: p50 ms per arm. In bfloat16
"mm" pays oneDNN's reorder of each weight on every call, which a short
batch cannot amortise.

    python benchmarks/python/gemm_ab.py --rounds 6 --out ab.json
    python benchmarks/python/gemm_ab.py --dtype bfloat16 --rounds 6 --single 3 20 60 128
    python benchmarks/python/gemm_ab.py --whole --rounds 6
"""
from __future__ import annotations

import sys

import numpy as np

import common
import cpu_dtype

METHODS = ("mm", "onednn")


def main(argv: list[str] | None = None) -> int:
    p = common.ab_parser(__doc__)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--whole", action="store_true", help="add an engine with one oneDNN call per product")
    p.add_argument("--single", type=int, nargs="*", default=[], metavar="T",
                   help="first, one request at a time of T tokens per method")
    args = p.parse_args(argv)
    common.quiet()
    import torch

    import fastserve
    from fastserve import gemm

    why = gemm.onednn_cannot(getattr(torch, args.dtype))
    if why:
        print(f"oneDNN cannot run {args.dtype} products here: {why}", file=sys.stderr)
        return 2
    mixes = cpu_dtype.mixes(args.n, 0)
    out: dict = {"rounds": args.rounds, "n": args.n, "dtype": args.dtype, "machine": common.machine(),
                 "default": gemm.default_method(getattr(torch, args.dtype),
                                                fastserve.precision.cpu_features())}
    if args.single:
        out["single"] = single(args.dtype, args.single, args.rounds)
    engines = {}
    for m in METHODS:
        with common.env("FASTSERVE_CPU_GEMM", m):  # read when an engine is built
            engines[m] = cpu_dtype.static_engine(args.dtype)
    if args.whole:
        class Whole(gemm.Gemm):
            def __call__(self, x: torch.Tensor) -> torch.Tensor:
                return gemm.onednn_linear(x, self.packed)

        with common.env("FASTSERVE_CPU_GEMM", "onednn"):
            whole = cpu_dtype.static_engine(args.dtype)
        for layer in whole.runner.fused or ():  # the replicas' runners share these layers
            for g in (layer.qkv, layer.o, layer.up, layer.down):
                g.__class__ = Whole
    try:
        for m, e in engines.items():
            if e.stats()["gemm"] != m:
                print(f"the {m} engine's layers run {e.stats()['gemm']!r}: not through the CPU kernels",
                      file=sys.stderr)
                return 2
        out["gemm_weights_bytes"] = engines["onednn"].stats()["memory"]["gemm_weights_bytes"]
        for e in engines.values():
            e.embed(mixes["corpus"][:64])
        out["rss_mib_warm"] = common.rss_mib()
        for name, texts in mixes.items():
            vecs = {m: e.embed(texts) for m, e in engines.items()}
            diff = float(np.abs(vecs["mm"] - vecs["onednn"]).max())
            arms = {m: (lambda e=e, t=texts: e.embed(t)) for m, e in engines.items()}
            if args.whole:
                arms["onednn-whole"] = lambda t=texts: whole.embed(t)
            out[name] = common.alternate(arms, len(texts), args.rounds)
            out[name]["max_abs_diff"] = diff
            a, b = out[name]["onednn"], out[name]["mm"]
            print(f"{args.dtype} {name}: texts/s onednn median {a['median']:.1f} (best {a['best']:.1f}), "
                  f"mm {b['median']:.1f} ({b['best']:.1f}); {common.versus(a, b, 'onednn / mm')}; "
                  f"max |diff| {diff:.2e}", flush=True)
            if args.whole:
                w = out[name]["onednn-whole"]
                print(f"{args.dtype} {name}: one oneDNN call per product median {w['median']:.1f}; "
                      f"{common.versus(w, a, 'whole / pieces')}", flush=True)
        out["rss_mib_after"] = common.rss_mib()
        print(f"resident memory after the warm-up {out['rss_mib_warm']:.0f} MiB, after every round "
              f"{out['rss_mib_after']:.0f} MiB; reordered weights "
              f"{out['gemm_weights_bytes'] / 2**20:.1f} MiB; default here: {out['default']}", flush=True)
    finally:
        for e in engines.values():
            e.close()
        if args.whole:
            whole.close()
    common.write_json(args.out, out)
    return 0


def single(dtype: str, token_counts: list[int], rounds: int, requests: int = 50) -> dict[str, dict[str, float]]:
    """--single: p50 ms of embed(text) per method and token count."""
    import statistics
    import time

    import fastserve

    path = str(common.model_path())
    engines = {}
    for m in METHODS:
        with common.env("FASTSERVE_CPU_GEMM", m):
            engines[m] = fastserve.Engine(path, dtype=dtype)
    out: dict[str, dict[str, float]] = {}
    try:
        for m, e in engines.items():
            if e.stats()["gemm"] != m:
                raise RuntimeError(f"the {m} engine's layers run {e.stats()['gemm']!r}: not through the CPU kernels")
        for t in token_counts:
            text = common.text_of(engines["mm"].tokenizer, t)
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            for e in engines.values():
                for _ in range(10):
                    e.embed(text)
            for r in range(rounds):
                for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
                    for _ in range(requests):
                        t0 = time.perf_counter()
                        engines[m].embed(text)
                        times[m].append(time.perf_counter() - t0)
            out[str(t)] = {m: statistics.median(v) * 1e3 for m, v in times.items()}
            a, b = out[str(t)]["onednn"], out[str(t)]["mm"]
            print(f"{dtype}, one request of {t} tokens: p50 onednn {a:.2f} ms, mm {b:.2f} ms, onednn / mm "
                  f"{a / b:.3f}", flush=True)
    finally:
        for e in engines.values():
            e.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
