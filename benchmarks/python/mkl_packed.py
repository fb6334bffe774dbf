"""Would packing the weights once help the float32 GEMMs? MKL can pack a
GEMM's B matrix ahead of time (cblas_sgemm_pack) and reuse it in every call
(cblas_sgemm_compute), which saves the per-call copy of the weights into
MKL's panels (`mkl_blas_def_sgemm_scopy_*`, about 7% of a float32 `embed` in
`perf` on the AMD EPYC VM) and the zeroing pass over the output
(`sgemm_mscale`, about 2%). torch's own `mkl::_mkl_linear` uses the packed
weight only when a call's token count equals the one it was packed for, so
this calls MKL from libtorch_cpu directly through ctypes: MiniLM's four
shapes, one thread, several token counts, `torch.mm` into a preallocated
output against the packed call, alternating; and checks that the packed
result equals `torch.mm`'s.

    python benchmarks/python/mkl_packed.py --rounds 7 --out DIR
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from typing import Any

import torch

import common
from mm_concurrency import SHAPES

ROW_MAJOR, NO_TRANS, TRANS, PACKED, B_MATRIX = 101, 111, 112, 151, 162


def mkl() -> ctypes.CDLL:
    """libtorch_cpu's MKL (LP64 CBLAS), or SystemExit where torch has none."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    if not hasattr(lib, "cblas_sgemm_compute"):
        raise SystemExit("this torch build exports no MKL packed GEMM")
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    lib.cblas_sgemm_pack_get_size.argtypes = [i, i, i, i]
    lib.cblas_sgemm_pack.argtypes = [i, i, i, i, i, i, f, p, i, p]
    lib.cblas_sgemm_compute.argtypes = [i, i, i, i, i, i, p, i, p, i, f, p, i]
    return lib


def pack(lib: ctypes.CDLL, w: torch.Tensor, m: int) -> torch.Tensor:
    """w [N, K] (an nn.Linear weight) packed as B of x @ w.T for m rows."""
    n, k = w.shape
    size = lib.cblas_sgemm_pack_get_size(B_MATRIX, m, n, k)
    buf = torch.empty(size // 4 + 16, dtype=torch.float32)
    lib.cblas_sgemm_pack(ROW_MAJOR, B_MATRIX, TRANS, m, n, k, 1.0, w.data_ptr(), k, buf.data_ptr())
    return buf


def packed_mm(lib: ctypes.CDLL, x: torch.Tensor, wp: torch.Tensor, n: int, out: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    lib.cblas_sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, m, n, k, x.data_ptr(), k, wp.data_ptr(), k, 0.0,
                            out.data_ptr(), n)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=20, help="calls per timing")
    p.add_argument("--tokens", default="2048,600", help="token counts (the GEMMs' M), packed once for 2048")
    p.add_argument("--out", default=None, help="folder for mkl_packed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lib = mkl()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for m in (int(t) for t in args.tokens.split(",")):
        for _, k, n in SHAPES:
            w, x, out = torch.randn(n, k), torch.randn(m, k), torch.empty(m, n)
            wp = pack(lib, w, 2048)
            diff = float((packed_mm(lib, x, wp, n, out.clone()) - torch.mm(x, w.t())).abs().max())
            rates: dict[str, list[float]] = {"mm": [], "packed": []}
            for _ in range(args.rounds):
                for kind in ("mm", "packed"):
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        if kind == "mm":
                            torch.mm(x, w.t(), out=out)
                        else:
                            packed_mm(lib, x, wp, n, out)
                    rates[kind].append(2.0 * m * n * k * args.reps / (time.perf_counter() - t0) / 1e9)
            row = {"tokens": m, "k": k, "n": n, "max_abs_diff_vs_mm": diff,
                   **{f"{kind}_best": max(r) for kind, r in rates.items()},
                   **{f"{kind}_median": statistics.median(r) for kind, r in rates.items()}}
            rows.append(row)
            print(f"{m} x {k} -> {n}: mm best {row['mm_best']:.1f} median {row['mm_median']:.1f} | packed best "
                  f"{row['packed_best']:.1f} median {row['packed_median']:.1f} GFLOP/s | max |diff| {diff:.1e}",
                  flush=True)
    common.save_result("mkl_packed.py", argv, {"rows": rows}, args.out, "mkl_packed.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
