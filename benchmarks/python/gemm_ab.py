"""The CPU layer kernels' matrix products by method (python/fastserve/gemm.py),
A/B in one process: engines that differ only in FASTSERVE_CPU_GEMM ("mm":
torch.mm, MKL's sgemm in float32; "onednn": oneDNN with the weights reordered
once, rows in pieces of fixed sizes; "kernel": fastserve's own float32
product on weights laid out once), alternating, `embed` of 400 texts per
mix (cpu_dtype.py's corpus and long-tail mixes), static 2,048-token batches.
--methods picks them (default: every one that runs this dtype here; "mm"
first, the others' ratios are to it). Also: the largest difference between
each engine's embeddings and "mm"'s, the process's resident memory after the
warm-up and after every round (oneDNN's cache of shapes stays bounded:
gemm.pieces), and the laid-out weights' bytes per method.
Figures: benchmarks/README.md, "oneDNN GEMMs" and "Own float32 GEMM".

With --whole, a third engine whose products each go through oneDNN in one
call (a new oneDNN shape per row count: what the pieces avoid; its cache
grows the process's memory), to price the pieces.

    python benchmarks/python/gemm_ab.py --rounds 6 --out ab.json
    python benchmarks/python/gemm_ab.py --methods mm,kernel --rounds 6
    python benchmarks/python/gemm_ab.py --dtype bfloat16 --rounds 6
    python benchmarks/python/gemm_ab.py --whole --rounds 6
"""
from __future__ import annotations

import sys

import numpy as np

import common
import cpu_dtype



def main(argv: list[str] | None = None) -> int:
    p = common.ab_parser(__doc__)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--methods", default="", help="comma-separated, mm first (default: all that run here)")
    p.add_argument("--whole", action="store_true", help="add an engine with one oneDNN call per product")
    args = p.parse_args(argv)
    common.quiet()
    import torch

    import fastserve
    from fastserve import gemm

    dtype = getattr(torch, args.dtype)
    cannot = {"mm": lambda _: None, "onednn": gemm.onednn_cannot, "kernel": gemm.kernel_cannot}
    methods = [m for m in (args.methods.split(",") if args.methods else gemm.GEMMS) if m]
    if methods[0] != "mm" or any(m not in cannot for m in methods):
        p.error(f"--methods must start with mm and name methods of {gemm.GEMMS}")
    if args.whole and "onednn" not in methods:
        p.error("--whole needs the onednn engine")
    for m in methods[1:]:
        why = cannot[m](dtype)
        if why:
            print(f"{m} cannot run {args.dtype} products here: {why}", file=sys.stderr)
            if args.methods:
                return 2
            methods.remove(m)
    if len(methods) < 2:
        return 2
    mixes = cpu_dtype.mixes(args.n, 0)
    out: dict = {"rounds": args.rounds, "n": args.n, "dtype": args.dtype, "machine": common.machine(),
                 "default": gemm.default_method(getattr(torch, args.dtype),
                                                fastserve.precision.cpu_features())}
    engines = {}
    for m in methods:
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
        out["gemm_weights_bytes"] = {m: e.stats()["memory"]["gemm_weights_bytes"] for m, e in engines.items()}
        for e in engines.values():
            e.embed(mixes["corpus"][:64])
        out["rss_mib_warm"] = common.rss_mib()
        for name, texts in mixes.items():
            vecs = {m: e.embed(texts) for m, e in engines.items()}
            arms = {m: (lambda e=e, t=texts: e.embed(t)) for m, e in engines.items()}
            if args.whole:
                arms["onednn-whole"] = lambda t=texts: whole.embed(t)
            out[name] = common.alternate(arms, len(texts), args.rounds)
            b = out[name]["mm"]
            for m in methods[1:]:
                a = out[name][m]
                a["max_abs_diff_vs_mm"] = diff = float(np.abs(vecs["mm"] - vecs[m]).max())
                ratios = " ".join(f"{x / y:.3f}" for x, y in zip(a["texts_per_s"], b["texts_per_s"]))
                print(f"{args.dtype} {name}: texts/s {m} median {a['median']:.1f} (best {a['best']:.1f}), "
                      f"mm {b['median']:.1f} ({b['best']:.1f}); {m} / mm by the median "
                      f"{a['median'] / b['median']:.3f}, per round {ratios}; max |diff| {diff:.2e}", flush=True)
            if args.whole:
                a, w = out[name]["onednn"], out[name]["onednn-whole"]
                print(f"{args.dtype} {name}: one oneDNN call per product median {w['median']:.1f}; "
                      f"whole / pieces by the median {w['median'] / a['median']:.3f}, per round "
                      + " ".join(f"{x / y:.3f}" for x, y in zip(w["texts_per_s"], a["texts_per_s"])), flush=True)
        out["rss_mib_after"] = common.rss_mib()
        print(f"resident memory after the warm-up {out['rss_mib_warm']:.0f} MiB, after every round "
              f"{out['rss_mib_after']:.0f} MiB; laid-out weights (MiB) "
              + ", ".join(f"{m} {b / 2**20:.1f}" for m, b in out["gemm_weights_bytes"].items())
              + f"; default here: {out['default']}", flush=True)
    finally:
        for e in engines.values():
            e.close()
        if args.whole:
            whole.close()
    common.write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
