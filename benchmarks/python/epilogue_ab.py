"""The CUDA epilogues (kernels.bias_gelu_, kernels.add_layer_norm_) against
torch eager, A/B in one process on one CUDA device, at BERT-base's shapes
(H = 768, I = 3072; float16 by default) for T tokens of a packed batch:

  (a) intermediate: F.gelu(F.linear(x, W1, b1))    vs  F.linear(x, W1) + bias_gelu_
  (b) output:       F.layer_norm(F.linear(a, W2, b2) + r)  vs  F.linear(a, W2) + add_layer_norm_

Each arm's time per call is the median over --reps loops of --calls calls,
each loop between two CUDA events on the current stream, after a warm-up;
the arms alternate within each rep so drift falls on both. Two ways: eager
(the calls launched from Python one by one: the host's launch overhead
included, as an eager serving batch pays it, which dominates at small T)
and graphed (the --calls calls captured once in a CUDA graph and replayed:
the device's time alone, as a captured layer pays it). Also the epilogue
alone (graphed, in place on the GEMM's output) in GB/s against torch's
device-to-device copy_ of the same bytes (read + written: 2 T I for
bias_gelu_, 3 T H for add_layer_norm_, times the element size; the [N]
vectors left out), and the largest difference between the two arms' outputs.

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


def graphed(fn: Callable[[], object], calls: int) -> Callable[[], object]:
    """`calls` calls of fn captured in one CUDA graph (after a warm-up on a
    side stream, as torch advises); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def time_arms(arms: dict[str, Callable[[], object]], reps: int, calls: int, graph: bool) -> dict[str, float]:
    """Median seconds per call of each arm: `reps` loops of `calls` calls
    each (graph: one replay of them captured), timed with CUDA events, arms
    alternating in order rep by rep."""
    runs = {k: graphed(fn, calls) for k, fn in arms.items()} if graph else arms
    loops = 1 if graph else calls
    for fn in runs.values():  # warm-up: cuBLAS heuristics, allocator, first launches
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    names = list(runs)
    per_call: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(loops):
                runs[name]()
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
    def torch_a() -> torch.Tensor:
        return F.gelu(F.linear(x, W1, b1))

    def fused_a() -> torch.Tensor:
        return K.bias_gelu_(F.linear(x, W1), b1)

    h = F.linear(x, W1)
    src = torch.empty(T * inter, dtype=dtype, device="cuda")  # half the bytes moved: copy_ reads and writes it
    dst = torch.empty_like(src)
    rows.append(measure(T, "bias+gelu", 2 * T * inter * es, torch_a, fused_a, lambda: K.bias_gelu_(h, b1),
                        lambda: dst.copy_(src), reps, calls))

    # (b) the output projection's tail.
    def torch_b() -> torch.Tensor:
        return F.layer_norm(F.linear(a, W2, b2) + r, (H,), w, beta, eps)

    def fused_b() -> torch.Tensor:
        return K.add_layer_norm_(F.linear(a, W2), b2, r, w, beta, eps)

    y = F.linear(a, W2)
    src = torch.empty(3 * T * H // 2, dtype=dtype, device="cuda")
    dst = torch.empty_like(src)
    rows.append(measure(T, "bias+residual+layernorm", 3 * T * H * es, torch_b, fused_b,
                        lambda: K.add_layer_norm_(y, b2, r, w, beta, eps), lambda: dst.copy_(src), reps, calls))
    return rows


def measure(T: int, op: str, nbytes: int, torch_arm: Callable[[], torch.Tensor], fused_arm: Callable[[], torch.Tensor],
            epilogue: Callable[[], object], copy: Callable[[], object], reps: int, calls: int) -> dict:
    arms = {"torch": torch_arm, "fastserve": fused_arm}
    eager = time_arms(arms, reps, calls, graph=False)
    graph = time_arms({**arms, "epilogue": epilogue, "copy": copy}, reps, calls, graph=True)
    diff = (torch_arm().float() - fused_arm().float()).abs().max().item()
    return {"T": T, "op": op, "bytes": nbytes, "max_abs_diff": diff, "eager": eager, "graph": graph}


def table(rows: list[dict]) -> str:
    """Times in microseconds per call: torch's arm, fastserve's (GEMM without
    bias + epilogue) and the speedup, eager and graphed; then the epilogue
    alone (graphed) and its bandwidth against a copy of as many bytes."""
    head = (f"{'T':>6} {'epilogue':<23} {'eager: torch':>12} {'fastserve':>9} {'speedup':>7} "
            f"{'graph: torch':>12} {'fastserve':>9} {'speedup':>7} {'epi us':>7} {'epi GB/s':>8} "
            f"{'copy GB/s':>9} {'epi/copy':>8} {'max|diff|':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        e, g = r["eager"], r["graph"]
        epi_gbs, copy_gbs = r["bytes"] / g["epilogue"] / 1e9, r["bytes"] / g["copy"] / 1e9
        lines.append(f"{r['T']:>6} {r['op']:<23} {e['torch'] * 1e6:>12.1f} {e['fastserve'] * 1e6:>9.1f} "
                     f"{e['torch'] / e['fastserve']:>6.2f}x {g['torch'] * 1e6:>12.1f} {g['fastserve'] * 1e6:>9.1f} "
                     f"{g['torch'] / g['fastserve']:>6.2f}x {g['epilogue'] * 1e6:>7.1f} {epi_gbs:>8.0f} "
                     f"{copy_gbs:>9.0f} {epi_gbs / copy_gbs:>8.2f} {r['max_abs_diff']:>9.2e}")
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
