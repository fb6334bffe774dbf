"""The matrix products of the CPU layer kernels (runners._FusedLayer):
x [M, K] @ W.T for a linear layer's weight W [N, K], through torch.mm or
through oneDNN with the weight laid out for it once.

- "mm": torch.mm on the weight it is given (the model's own, or a copy in
  the compute dtype under autocast: runners._FusedLayer): MKL's sgemm in
  float32 (torch's BLAS), oneDNN with the weight reordered on every call in
  bfloat16.
- "onednn": the weight reordered once, at construction, into oneDNN's blocked
  layout (torch.ops.mkldnn._reorder_linear_weight, a second copy of the
  layer weights, reported in stats()["memory"]["gemm_weights_bytes"]; the
  weight itself is not kept), and
  one torch.ops.mkldnn._linear_pointwise call per piece of rows. oneDNN builds
  a primitive per shape and keeps it in a process-wide cache (1,024 entries),
  and packed batches have a new token count nearly every time (docs/design.md,
  "oneDNN's shape cache"): one call per product grew the process by 765-917
  MiB over 300 batches of random sizes at MiniLM's shapes, where with the
  pieces it levels off a few MiB above MKL's own buffers
  (benchmarks/README.md, "oneDNN GEMMs"). So the rows go
  in pieces of six fixed sizes (pieces()), the last, when it has fewer than
  GRANULE rows, padded with zeros up to 4, 8 or 16 rows (padded_rows()):
  eight shapes per weight shape. A piece's result is copied into the
  product unless it is the whole of it.
  Every row goes through oneDNN, and oneDNN gives a row the same bits in
  every one of those shapes, so a text's embedding stays bitwise the same
  whatever else is in its batch (tests/python/test_batch_invariance.py);
  "mm" pads a product of fewer than shapes.MIN_ROWS rows up to it, since
  torch.mm gives 1 to 3 rows other bits.

Why both: MKL dispatches its AVX-512 kernels on Intel CPUs only, so on an
AMD EPYC with AVX-512 (Zen 4) float32 products ran at MKL's AVX2 speed while
oneDNN, which dispatches on the CPU's features, took its AVX-512 kernels:
up to 1.5x per product at the MiniLM shapes, 1.16-1.22x end to end
(benchmarks/README.md, "oneDNN GEMMs"). With oneDNN capped to AVX2 the two
were level (0.95-1.14x), on an AVX2-only AMD EPYC oneDNN was slower
(0.93-0.99x: "AMD EPYC (AVX2) again"), and on Intel CPUs MKL has AVX-512
itself; so "onednn" is the default for float32 where the CPU has AVX-512,
is not an Intel CPU and oneDNN is not capped below AVX-512, and "mm"
elsewhere.

bfloat16 products go through "onednn" wherever oneDNN runs them (on
AVX512-BF16, AMX, or AVX-512 without either): torch.mm is oneDNN there too,
but it reorders the weight on every call, which a short batch pays in full.
One request of 3 / 20 / 128 tokens to MiniLM took 2.7 / 6.2 / 18.0 ms against
5.6 / 7.6 / 19.7 through torch.mm (with the token buckets torch.mm needs and the
pieces do not: process.onednn_buckets); 400 texts offline 0.99-1.03x; the
same bits (benchmarks/README.md, "bfloat16 products through oneDNN"). Where oneDNN
cannot (capped below AVX-512, or no oneDNN), torch.mm emulates.

FASTSERVE_CPU_GEMM=mm|onednn overrides the choice.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from .shapes import MIN_ROWS

GEMMS = ("mm", "onednn")

# Rows per oneDNN call while they last; the rows left go in pieces of
# PIECE / 2, PIECE / 4, ... down to GRANULE rows (their binary digits), and the
# last rows (fewer than GRANULE) are padded with zeros up to the power of two at
# or above them, at least TAIL_MIN_ROWS: 4, 8 or 16 rows. Eight shapes per
# weight shape in oneDNN's cache, whatever the batches. A tail padded to
# GRANULE alone computed 16 rows for a request of one token: at MiniLM's
# products 16 rows took 1.9-2.5x the time of 4 (benchmarks/README.md,
# "Short batches through oneDNN").
PIECE = 512
GRANULE = 16
# One row alone takes oneDNN's GEMV path, whose bits differ; from 2 rows up a
# row's bits agreed with the same row's in 1,024 (MiniLM's and BERT-base's
# weight shapes, natively and capped to AVX2; docs/design.md, "The layers'
# matrix products"). MIN_ROWS, the floor the "mm" path keeps too, leaves a
# margin; tests/python/test_gemm.py checks tails of 4, 8 and 16 rows.
TAIL_MIN_ROWS = MIN_ROWS

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX-512.
_CAPS_BELOW_AVX512 = ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2")


def onednn_available() -> bool:
    """Whether this torch has oneDNN and the two operators the "onednn"
    products call."""
    mk = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mk, "_reorder_linear_weight")
            and hasattr(mk, "_linear_pointwise"))


def default_method(dtype: torch.dtype, cpu: dict[str, Any]) -> str:
    """The products' method for layers computing in `dtype` on a CPU with
    the features `cpu` (precision.cpu_features()), without the override.
    bfloat16 asks this process's oneDNN whether it runs bfloat16 products
    (onednn_cannot), whatever `cpu` says: its ISA cap and build decide."""
    if dtype == torch.bfloat16:
        return "onednn" if onednn_cannot(dtype) is None else "mm"
    flags = cpu.get("flags") or ()
    cap = (cpu.get("onednn_max_isa") or "").lower()
    if (dtype == torch.float32 and "avx512f" in flags and cpu.get("vendor") not in (None, "GenuineIntel")
            and cap not in _CAPS_BELOW_AVX512 and onednn_available()):
        return "onednn"
    return "mm"


def method(dtype: torch.dtype) -> str:
    """The products' method here: FASTSERVE_CPU_GEMM when set, else
    default_method. ValueError for an unknown name, or "onednn" where this
    torch lacks it."""
    from .precision import cpu_features

    forced = os.environ.get("FASTSERVE_CPU_GEMM", "")
    if not forced:
        return default_method(dtype, cpu_features())
    if forced not in GEMMS:
        raise ValueError(f"FASTSERVE_CPU_GEMM must be one of {GEMMS}, got {forced!r}")
    if forced == "onednn":
        why = onednn_cannot(dtype)
        if why:
            raise ValueError(f"FASTSERVE_CPU_GEMM=onednn cannot run {dtype} products on this CPU: {why}")
    return forced


def onednn_cannot(dtype: torch.dtype) -> Optional[str]:
    """Why oneDNN cannot run `dtype` products here, or None where it can
    (onednn_available() and, for bfloat16, AVX-512 BW, VL and DQ or
    AVX-NE-CONVERT under oneDNN's ISA cap: asked of oneDNN itself)."""
    if not onednn_available():
        return "this torch has no oneDNN (torch.backends.mkldnn)"
    if dtype == torch.float32:
        return None
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(GRANULE, GRANULE, dtype=dtype), None)
    except RuntimeError as e:
        return f"oneDNN's ISA cap ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')!r}: {e}"
    return None


def onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ W.T in one oneDNN call, W laid out by _reorder_linear_weight
    (packed): a primitive for x's shape, cached by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def pieces(rows: int) -> list[tuple[int, int]]:
    """How `rows` rows go through oneDNN: (start, rows) per call, each call's
    rows one of PIECE, PIECE / 2, ..., GRANULE, except the last call's, which
    may be fewer than GRANULE (padded up to padded_rows() of it)."""
    out: list[tuple[int, int]] = []
    start, size = 0, PIECE
    while rows - start >= GRANULE:
        while rows - start < size:
            size //= 2
        out.append((start, size))
        start += size
    if start < rows:
        out.append((start, rows - start))
    return out


def padded_rows(rows: int) -> int:
    """The rows oneDNN computes for a piece of `rows` (pieces()): a piece of
    GRANULE or more as it is; fewer, the power of two at or above it, at
    least TAIL_MIN_ROWS."""
    if rows >= GRANULE:
        return rows
    return max(TAIL_MIN_ROWS, 1 << (rows - 1).bit_length())


class Gemm:
    """x @ weight.T for one linear layer's weight [N, K] (bias left to the
    caller), by `method` (GEMMS)."""

    def __init__(self, weight: torch.Tensor, method: str) -> None:
        if method not in GEMMS:
            raise ValueError(f"method must be one of {GEMMS}, got {method!r}")
        self.method = method
        self.shape = tuple(weight.shape)  # [N, K]
        # "mm": the weight; "onednn": its reordered copy alone, so that a copy
        # made for this product (autocast's) is not held twice.
        self.weight: Optional[torch.Tensor] = weight if method == "mm" else None
        self.packed: Optional[torch.Tensor] = None
        self._packed_bytes = 0
        if method == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self._packed_bytes = weight.numel() * weight.element_size()

    @property
    def extra_bytes(self) -> int:
        """Bytes of the reordered copy ("onednn"; 0 for "mm")."""
        return self._packed_bytes

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        return _at_least(padded_rows(x.shape[0]), x, lambda rows: onednn_linear(rows, self.packed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            # A row's bits as in any larger product (shapes.MIN_ROWS).
            return _at_least(MIN_ROWS, x, lambda rows: torch.mm(rows, self.weight.t()))
        calls = pieces(x.shape[0])
        if len(calls) == 1:
            return self._onednn(x)
        out = torch.empty(x.shape[0], self.shape[0], dtype=x.dtype, device=x.device)
        for start, n in calls:
            out[start : start + n] = self._onednn(x[start : start + n])
        return out


def _at_least(n: int, x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """product(x), x padded with zero rows up to n rows first (the padding's
    rows dropped from the result)."""
    rows = x.shape[0]
    if rows >= n:
        return product(x)
    padded = x.new_zeros(n, x.shape[1])
    padded[:rows] = x
    return product(padded)[:rows]
