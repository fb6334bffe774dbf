"""Where a packed CPU batch spends its time, by operation: the default
engine (two one-thread replicas, static 2,048-token batches) embeds 400 texts
of each of cpu_dtype.py's mixes, with every product of the CPU layer kernels
(gemm.Gemm, by weight shape) and every kernel call (attention, bias + GELU,
bias + residual + LayerNorm) timed, summed over both replicas' threads, next
to the runner's whole time and the wall time. From the products' time and
their FLOPs it gives the products' GFLOP/s per thread, to hold against
gemm_micro.py's per-product figures. Timing each call adds a few
microseconds per call; compare the wall time with an untimed run.
Figures: benchmarks/README.md, "oneDNN GEMMs".

    python benchmarks/python/op_profile.py [--dtype bfloat16] [--out FILE]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import threading
import time
from typing import Any, Callable
from unittest import mock

import common
import cpu_dtype


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args(argv)
    common.quiet()
    import torch

    from fastserve import gemm, kernels, runners

    seconds: dict[str, float] = collections.defaultdict(float)
    flops: dict[str, float] = collections.defaultdict(float)
    lock = threading.Lock()

    def timed(label: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = f(*a, **k)
            with lock:
                seconds[label] += time.perf_counter() - t0
            return out
        return call

    product = gemm.Gemm.__call__

    def timed_product(self: gemm.Gemm, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        label = f"product {n}x{k}"
        t0 = time.perf_counter()
        out = product(self, x)
        with lock:
            seconds[label] += time.perf_counter() - t0
            flops[label] += 2.0 * x.shape[0] * n * k
        return out

    engine = cpu_dtype.static_engine(args.dtype)
    res: dict[str, Any] = {"command": "python benchmarks/python/op_profile.py " + " ".join(sys.argv[1:] if argv is None else argv),
                           "machine": common.machine(), "dtype": args.dtype, "gemm": engine.stats()["gemm"],
                           "mixes": []}
    with engine:
        if res["gemm"] is None:
            print("the engine does not run the CPU layer kernels here (stats()['gemm'] is None)", file=sys.stderr)
            return 2
        # float32 as it runs alone in a process (cpu_dtype.alone_fp32): torch's oneDNN switch off.
        with torch.backends.mkldnn.flags(enabled=args.dtype != "float32"):
            for name, texts in cpu_dtype.mixes(args.n, args.seed).items():
                engine.embed(texts)  # warm-up, untimed
                t0 = time.perf_counter()
                engine.embed(texts)
                plain = time.perf_counter() - t0
                seconds.clear()
                flops.clear()
                with contextlib.ExitStack() as patches:  # every call timed within, restored after
                    for n in ("attention", "bias_gelu_", "add_layer_norm_"):
                        patches.enter_context(mock.patch.object(kernels, n, timed(n, getattr(kernels, n))))
                    patches.enter_context(mock.patch.object(gemm.Gemm, "__call__", timed_product))
                    patches.enter_context(mock.patch.object(runners.PackedRunner, "run",
                                                            timed("runner", runners.PackedRunner.run)))
                    t0 = time.perf_counter()
                    engine.embed(texts)
                    wall = time.perf_counter() - t0
                ops = {k: round(v, 3) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
                products = sum(v for k, v in seconds.items() if k.startswith("product"))
                rate = sum(flops.values()) / products / 1e9 if products else 0.0
                res["mixes"].append({"mix": name, "wall_s": round(wall, 3), "untimed_wall_s": round(plain, 3),
                                     "thread_seconds": ops, "products_gflops_per_thread": round(rate, 1)})
                print(f"{name}: wall {wall:.2f} s timed, {plain:.2f} s untimed; thread-seconds: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in ops.items())
                      + f"; products {rate:.0f} GFLOP/s per thread, {products / seconds['runner']:.0%} of the runner",
                      flush=True)
    common.write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
