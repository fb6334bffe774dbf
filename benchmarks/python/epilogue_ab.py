"""The CUDA epilogues (kernels.bias_gelu_, kernels.add_layer_norm_) against
torch eager, A/B in one process on one CUDA device, at BERT-base's shapes
(H = 768, I = 3072; float16 by default) for T tokens of a packed batch:

  (a) intermediate: F.gelu(F.linear(x, W1, b1))    vs  F.linear(x, W1) + bias_gelu_
  (b) output:       F.layer_norm(F.linear(a, W2, b2) + r)  vs  F.linear(a, W2) + add_layer_norm_

Each arm's time per call is the median over --reps loops of --calls calls,
each loop between two CUDA events on the current stream (launch overhead
included, as a serving batch pays it), after a warm-up; the arms alternate
within each rep so drift falls on both. Also the epilogue alone (in place on
the GEMM's output) in GB/s against torch's device-to-device copy_ of the
same bytes (read + written: 2 T I for bias_gelu_, 3 T H for add_layer_norm_,
times the element size; the [N] vectors left out), and the largest
difference between the two arms' outputs.

    python benchmarks/python/epilogue_ab.py [--tokens 128 4096 16384] [--dtype float16] [--out ab.json]

About 5 s on an H200. Exits with status 2 and a message where there is no
CUDA device, or the extension was built without CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from fastserve import _core
from fastserve import kernels as K

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def time_arms(arms: dict[str, Callable[[], object]], reps: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each arm: `reps` loops of `calls` calls
    each, timed with CUDA events, arms alternating in order rep by rep."""
    for fn in arms.values():  # warm-up: cuBLAS heuristics, allocator, first launches
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    names = list(arms)
    per_call: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                arms[name]()
            end.record()
            end.synchronize()
            per_call[name].append(start.elapsed_time(end) / 1e3 / calls)
    return {k: statistics.median(v) for k, v in per_call.items()}


def bench_tokens(T: int, H: int, inter: int, dtype: torch.dtype, reps: int, calls: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(T)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen, device="cuda")).to(dtype)

    es = torch.empty((), dtype=dtype).element_size()
    eps = 1e-12
    x, W1, b1 = randn(T, H), randn(inter, H, scale=H ** -0.5), randn(inter, scale=0.1)
    a, W2, b2 = randn(T, inter), randn(H, inter, scale=inter ** -0.5), randn(H, scale=0.1)
    r, w, beta = randn(T, H), 1 + randn(H, scale=0.1), randn(H, scale=0.1)
    rows = []

    # (a) the intermediate projection's tail.
    def eager_a() -> torch.Tensor:
        return F.gelu(F.linear(x, W1, b1))

    def fused_a() -> torch.Tensor:
        return K.bias_gelu_(F.linear(x, W1), b1)

    h = F.linear(x, W1)
    src = torch.empty(T * inter, dtype=dtype, device="cuda")  # half the bytes moved: copy_ reads and writes it
    dst = torch.empty_like(src)
    t = time_arms({"eager": eager_a, "fused": fused_a, "epilogue": lambda: K.bias_gelu_(h, b1),
                   "copy": lambda: dst.copy_(src)}, reps, calls)
    diff = (eager_a().float() - fused_a().float()).abs().max().item()
    rows.append({"T": T, "op": "bias+gelu", "bytes": 2 * T * inter * es, "max_abs_diff": diff, **t})

    # (b) the output projection's tail.
    def eager_b() -> torch.Tensor:
        return F.layer_norm(F.linear(a, W2, b2) + r, (H,), w, beta, eps)

    def fused_b() -> torch.Tensor:
        return K.add_layer_norm_(F.linear(a, W2), b2, r, w, beta, eps)

    y = F.linear(a, W2)
    src = torch.empty(3 * T * H // 2, dtype=dtype, device="cuda")
    dst = torch.empty_like(src)
    t = time_arms({"eager": eager_b, "fused": fused_b, "epilogue": lambda: K.add_layer_norm_(y, b2, r, w, beta, eps),
                   "copy": lambda: dst.copy_(src)}, reps, calls)
    diff = (eager_b().float() - fused_b().float()).abs().max().item()
    rows.append({"T": T, "op": "bias+residual+layernorm", "bytes": 3 * T * H * es, "max_abs_diff": diff, **t})
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'T':>6}  {'epilogue':<24} {'eager ms':>9} {'fused ms':>9} {'speedup':>8} {'epi ms':>8} "
            f"{'epi GB/s':>9} {'copy GB/s':>9} {'epi/copy':>8} {'max|diff|':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        epi_gbs, copy_gbs = r["bytes"] / r["epilogue"] / 1e9, r["bytes"] / r["copy"] / 1e9
        lines.append(f"{r['T']:>6}  {r['op']:<24} {r['eager'] * 1e3:>9.4f} {r['fused'] * 1e3:>9.4f} "
                     f"{r['eager'] / r['fused']:>7.2f}x {r['epilogue'] * 1e3:>8.4f} {epi_gbs:>9.0f} "
                     f"{copy_gbs:>9.0f} {epi_gbs / copy_gbs:>8.2f} {r['max_abs_diff']:>10.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 4096, 16384])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--dtype", default="float16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=15, help="timed loops per arm (the median is reported)")
    p.add_argument("--calls", type=int, default=20, help="calls per timed loop")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("epilogue_ab: no CUDA device visible to torch; this benchmark runs on a GPU only", file=sys.stderr)
        return 2
    if not _core.cuda_compiled():
        print("epilogue_ab: fastserve was built without CUDA (nvcc was not found at install), so it has no "
              "CUDA epilogues; reinstall with nvcc on PATH", file=sys.stderr)
        return 2
    dev = torch.cuda.get_device_properties(0)
    print(f"{dev.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {args.dtype}, "
          f"H={args.hidden} I={args.intermediate}, median of {args.reps} x {args.calls} calls", flush=True)
    rows: list[dict] = []
    with torch.inference_mode():
        for T in args.tokens:
            rows += bench_tokens(T, args.hidden, args.intermediate, DTYPES[args.dtype], args.reps, args.calls)
            torch.cuda.empty_cache()
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev.name, "torch": torch.__version__, "dtype": args.dtype, "hidden": args.hidden,
                       "intermediate": args.intermediate, "reps": args.reps, "calls": args.calls, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
