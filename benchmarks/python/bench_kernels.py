"""Packing kernels: GB/s against a plain memory copy of the same bytes, on
the CPU (default) or a CUDA device (--device cuda).

    python benchmarks/python/bench_kernels.py [--batch 64] [--max-len 128] [--hidden 384 768] [--rounds 3]
    python benchmarks/python/bench_kernels.py --large   # also B=256, L=256, H=768 (tens of MB)
    python benchmarks/python/bench_kernels.py --device cuda --large

For each kernel and dtype, bytes moved = bytes read + bytes written (index
arrays excluded: they are < 0.1% here). The baseline copies a tensor of half
that many bytes with torch's copy_ (so it also reads and writes the same
total) in the same run, on the same device; "ratio" is kernel GB/s over copy GB/s. Lengths are
drawn from a mixed distribution (half short, a third medium, the rest up to
max_len), as in a serving batch. Each figure is the fastest of many calls,
and the best of --rounds rounds (the machine may be busy). The default size
(a few MB) is cache-resident; --large adds one past the last-level cache,
where memory bandwidth rules. FASTSERVE_KERNEL_THREAD_BYTES and
FASTSERVE_KERNEL_NO_SIMD (see csrc/kernels/cpu/kernels_cpu.cpp) change the
kernels' threading and SIMD path, for comparing. On CUDA, a call's time is
that of a loop of 50 calls between two CUDA events on the current stream,
divided by 50 (launch overhead included, as a serving batch pays it), best
of 5 loops after a warm-up; offsets and indices are already on the device
(int32 cu_seqlens, int64 index, as the engine holds them) and outputs and
segment_pool's scratch preallocated, so only the kernels run: no host read,
allocation or sync in the loop. The target (issue #17): each kernel at
>= 85% of the copy at B=256, L=256, H=768.

    python benchmarks/python/bench_kernels.py --device cuda --cuda-only   # just B=256, L=256, H=768
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from typing import Callable

import numpy as np
import torch

from fastserve import _core
from fastserve import kernels as K

_k = _core._kernels  # type: ignore[attr-defined]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def mixed_lengths(gen: torch.Generator, batch: int, max_len: int) -> torch.Tensor:
    u = torch.rand(batch, generator=gen)
    short = torch.randint(4, max(5, max_len // 4), (batch,), generator=gen)
    medium = torch.randint(max_len // 4, max(max_len // 4 + 1, 3 * max_len // 4), (batch,), generator=gen)
    long = torch.randint(3 * max_len // 4, max_len + 1, (batch,), generator=gen)
    lengths = torch.where(u < 0.5, short, torch.where(u < 0.85, medium, long))
    return lengths.clamp(1, max_len).to(torch.int32)


def best_seconds(fn: Callable[[], object], min_time: float = 0.2) -> float:
    """Fastest of many calls: on a shared machine, slower calls measure the neighbours."""
    for _ in range(3):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 10:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cuda_seconds(fn: Callable[[], object], calls: int = 50, rounds: int = 5) -> float:
    """Per-call time of `fn` on the current CUDA stream: the best of `rounds`
    loops of `calls` calls, each loop timed with CUDA events."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / calls)
    return best


def copy_gbps(nbytes: int, device: str = "cpu") -> float:
    """GB/s (read + write) of a copy between two buffers of nbytes each. CPU:
    the faster of torch's copy_ and a single-threaded memcpy (numpy.copyto):
    on a busy 2-core machine torch's threaded copy_ of a few MB can stall on
    its second thread (measured ~1 GB/s), which would flatter the kernels.
    CUDA: torch's device-to-device copy_."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device != "cpu":
        return 2 * nbytes / cuda_seconds(lambda: dst.copy_(src)) / 1e9
    a, b = src.numpy(), dst.numpy()
    t = min(best_seconds(lambda: dst.copy_(src)), best_seconds(lambda: np.copyto(b, a)))
    return 2 * nbytes / t / 1e9


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def run_round(
    batch: int, max_len: int, hiddens: list[int], seed: int, device: str = "cpu"
) -> dict[tuple[str, str, int], tuple[float, float, int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = mixed_lengths(gen, batch, max_len)
    cu = K.cu_seqlens_from_lengths(lengths)
    timed = best_seconds if device == "cpu" else cuda_seconds
    T = int(lengths.sum())
    results = {}
    for h in hiddens:
        for name, dt in DTYPES.items():
            es = torch.empty((), dtype=dt).element_size()
            if device == "cpu":
                x = torch.randn((batch, max_len, h), generator=gen).to(dt)
            else:  # drawn on the device: a CPU draw of 50M values takes longer than the whole CUDA run
                x = torch.randn((batch, max_len, h), device=device, generator=torch.Generator(device).manual_seed(seed),
                                dtype=dt)
            # CUDA's pack takes cu_seqlens (lengths [B] would need a host prefix sum); the CPU's, lengths.
            dl, dcu = (lengths if device == "cpu" else cu).to(device), cu.to(device)
            packed = K.pack(x, dl, total=T)
            index = torch.randperm(T, generator=gen).to(device)
            # Outputs preallocated, as in the copy baseline: this times the
            # kernels; fastserve.kernels adds one torch.empty per call.
            a = K._arg
            ax, al, acu, ap, ai = a(x, "x"), a(dl, "l"), a(dcu, "cu"), a(packed, "p"), a(index, "i")
            outs = [torch.empty_like(packed), torch.empty_like(x), torch.empty((batch, h), device=device)]  # kept alive
            ap_out, ax_out, apool = (a(o, "out") for o in outs)
            scratch = {m: _k.segment_pool_scratch(ap, acu, m) for m in ("mean", "max")}
            bufs = {m: torch.empty(max(n, 1), device=device) for m, n in scratch.items()}  # kept alive
            ascratch = {m: a(bufs[m], "scratch") if scratch[m] else None for m in scratch}
            cases = {
                "pack": (lambda: _k.pack(ax, al, ap_out), 2 * T * h * es),
                "unpack": (lambda: _k.unpack(ap, acu, ax_out), (T + batch * max_len) * h * es),
                "segment_pool mean": (
                    lambda: _k.segment_pool(ap, acu, apool, "mean", False, scratch=ascratch["mean"]),
                    T * h * es + batch * h * 4,
                ),
                "segment_pool max+norm": (
                    lambda: _k.segment_pool(ap, acu, apool, "max", True, scratch=ascratch["max"]),
                    T * h * es + batch * h * 4,
                ),
                "gather": (lambda: _k.gather(ap, ai, ap_out), 2 * T * h * es),
            }
            for op, (fn, moved) in cases.items():
                gbps = moved / timed(fn) / 1e9
                base = copy_gbps(moved // 2, device)
                results[(op, name, h)] = (gbps, base, moved)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, nargs="+", default=[384, 768])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--large", action="store_true", help="also run B=256, L=256, H=768")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--cuda-only", action="store_true", help="only B=256, L=256, H=768 (the issue's target shape)")
    args = ap.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
    if args.device != "cpu" and not _core.cuda_compiled():
        raise SystemExit(f"--device {args.device}: fastserve was built without CUDA (nvcc not found at install)")

    configs = [] if args.cuda_only else [(args.batch, args.max_len, args.hidden)]
    if args.large or args.cuda_only:
        configs.append((256, 256, [768]))
    for batch, max_len, hiddens in configs:
        report(batch, max_len, hiddens, args.rounds, args.seed, args.device)


def report(batch: int, max_len: int, hiddens: list[int], rounds: int, seed: int, device: str = "cpu") -> list[dict]:
    """Prints the markdown table and returns its rows."""
    best: dict[tuple[str, str, int], tuple[float, float, int]] = {}
    for _ in range(rounds):
        for key, (gbps, base, moved) in run_round(batch, max_len, hiddens, seed, device).items():
            old = best.get(key)
            best[key] = (max(gbps, old[0]) if old else gbps, max(base, old[1]) if old else base, moved)

    lengths = mixed_lengths(torch.Generator().manual_seed(seed), batch, max_len)
    where = (f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads, {_k.cpu_threads_for(1 << 30)} kernel "
             "threads at most" if device == "cpu" else f"GPU: {torch.cuda.get_device_name(device)}")
    print(
        f"{where}; B={batch}, L={max_len}, T={int(lengths.sum())} (mixed lengths, mean {lengths.float().mean():.1f}); "
        f"best of {rounds} rounds\n"
    )
    print("| kernel | dtype | H | MB moved | kernel GB/s | copy GB/s | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for (op, name, h), (gbps, base, moved) in best.items():
        print(f"| {op} | {name} | {h} | {moved / 1e6:.1f} | {gbps:.1f} | {base:.1f} | {gbps / base:.0%} |")
        rows.append({"kernel": op, "dtype": name, "B": batch, "L": max_len, "H": h, "bytes": moved,
                     "kernel_gbps": gbps, "copy_gbps": base})
    print()
    return rows


if __name__ == "__main__":
    main()
