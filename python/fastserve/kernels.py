"""Packing kernels for padding-free execution, on torch tensors.

    packed = pack(x, lengths)                     # [B, L, H] -> [T, H]
    padded = unpack(packed, cu_seqlens, max_len)  # [T, H] -> [B, L, H], zeros past each length
    emb = segment_pool(packed, cu_seqlens, "mean", normalize=True)  # [B, H] float32
    rows = gather(x, index)                       # x[index] along dim 0

and, on the CPU in float32 or bfloat16 (computed in float32, except bfloat16
attention on the "avx512_bf16" path, whose products run in bfloat16: see
attention), the parts of an encoder layer around its GEMMs:

    ctx = attention(qkv, cu_seqlens, bias=b)      # [T, 3, nh, hd] -> [T, nh, hd], within each sequence
    bias_gelu_(x, b)                              # x = gelu(x + b), in place
    add_layer_norm_(x, b, residual, w, beta, eps) # x = layer_norm(x + b + residual), in place

The two epilogues also run on CUDA tensors, in float32, float16 or bfloat16
(computed in float32), one kernel launch on torch's current stream that
never waits on the GPU, so they may be captured in a CUDA graph.

x may be float32, float16 or bfloat16 (gather also takes int32/int64);
lengths, cu_seqlens and index may be int32 or int64. torch owns all memory:
outputs are allocated here and passed to the C++ kernels (fastserve._core)
as raw pointers, which validate every argument and raise ValueError with a
message naming it (non-contiguous input, wrong or mismatched dtype, tensors
on different devices, lengths outside [0, L], cu_seqlens not starting at 0,
not non-decreasing or not ending at T, indices out of range, wrong output
shape, sizes that overflow). Inputs are never copied or made contiguous
behind the caller's back.

CPU tensors run the C++ kernels with the GIL released. CUDA tensors run the
CUDA kernels on torch's current stream when the extension was built with
CUDA, reading offsets and indices on the device: a call neither copies to
the host nor waits for the stream, so the values of CUDA offsets and
indices are not validated (everything else is). The kernels are
memory-safe on any values: a malformed cu_seqlens gives wrong rows, never
an access outside the tensors, and gather writes zeros for an index
outside [0, N). Two calls still wait for the stream on CUDA when the
caller leaves out a size the output needs: pack without total (T is read
from the offsets) and unpack without max_len (the longest sequence is).

torch_pack, torch_unpack, torch_segment_pool, torch_gather, torch_bias_gelu_
and torch_add_layer_norm_ compute the same results with torch operations, on
any device. They stand in where the extension has no kernels for a device (a
CPU-only build on a CUDA machine) and serve as the tests' oracle. for_device(device) picks the implementation
the engine uses: the extension's where it was built for the device, else
torch; FASTSERVE_KERNELS=torch forces torch everywhere (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Callable, Iterator, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fastserve import _core

__all__ = [
    "pack", "unpack", "segment_pool", "gather", "attention", "bias_gelu_", "add_layer_norm_",
    "cpu_isa", "cpu_isa_cap", "cpu_vector_paths",
    "cu_seqlens_from_lengths",
    "torch_pack", "torch_unpack", "torch_segment_pool", "torch_gather", "torch_attention",
    "torch_bias_gelu_", "torch_add_layer_norm_",
    "Kernels", "for_device", "fallback_reason",
]

_k = _core._kernels  # type: ignore[attr-defined]  # private submodule, see csrc/bindings/kernels.cpp

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int32: "int32",
    torch.int64: "int64",
}

PoolMode = Literal["mean", "cls", "max"]


def _require_tensor(t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _arg(t: torch.Tensor, name: str) -> object:
    _require_tensor(t, name)
    dtype = _DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))
    index = t.device.index if t.device.index is not None else 0
    return _k.TensorArg(t.data_ptr(), list(t.shape), list(t.stride()), dtype, t.device.type, index)


def _stream(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return int(torch.cuda.current_stream(t.device).cuda_stream)
    return 0


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, with an allocation failure raised as MemoryError."""
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if "alloc" in str(e).lower() or isinstance(e, torch.OutOfMemoryError):
            raise MemoryError(f"cannot allocate an output of shape {list(shape)} ({dtype}): {e}") from None
        raise


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [B + 1] int32 (0, l0, l0 + l1, ...) on lengths' device.
    ValueError for a negative length, or a total int32 cannot hold (it
    would wrap into offsets that still look valid)."""
    sums = torch.cumsum(lengths.to(torch.int64), 0)
    if lengths.numel() and (int(lengths.min()) < 0 or int(sums[-1]) > torch.iinfo(torch.int32).max):
        raise ValueError(f"lengths must be >= 0 and sum to at most {torch.iinfo(torch.int32).max}, got min "
                         f"{int(lengths.min())}, sum {int(sums[-1])}")
    out = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = sums
    return out


def pack(x: torch.Tensor, lengths: torch.Tensor, *, total: int | None = None) -> torch.Tensor:
    """Padded x [B, L, H] -> packed [T, H], T = sum of lengths.

    lengths is [B] (lengths) or [B + 1] (cu_seqlens). total, when the caller
    knows T, avoids reading it from lengths (a device synchronisation on CUDA).
    On CUDA, lengths [B] become cu_seqlens on the device (a cumsum, no sync).
    """
    _require_tensor(x, "x")
    _require_tensor(lengths, "lengths")
    if (x.device.type == "cuda" and x.dim() == 3 and lengths.dim() == 1 and lengths.shape[0] == x.shape[0]
            and lengths.device == x.device and lengths.dtype in _INTS):
        cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(lengths, 0, dtype=torch.int64, out=cu[1:])
        lengths = cu
    if total is None:
        if x.dim() >= 1 and lengths.dim() == 1 and lengths.shape[0] == x.shape[0] + 1:
            total = int(lengths[-1]) if lengths.numel() else 0
        else:
            total = int(lengths.sum()) if lengths.numel() else 0
    h = x.shape[2] if x.dim() == 3 else 0
    if x.dim() == 3 and total > x.shape[0] * x.shape[1]:
        raise ValueError(f"total={total} exceeds the {x.shape[0] * x.shape[1]} tokens x [B, L, H] can hold")
    out = _empty((max(total, 0), h), x.dtype, x.device)
    _k.pack(_arg(x, "x"), _arg(lengths, "lengths"), _arg(out, "out"), _stream(x))
    return out


def _longest(packed: torch.Tensor, cu_seqlens: torch.Tensor) -> int:
    """unpack()'s default max_len: the longest sequence of cu_seqlens, which
    is checked first (starts at 0, non-decreasing, ends at packed.shape[0];
    the extension's messages, from _check_cu) so that it bounds the output by
    T. One host read of cu_seqlens (a device-to-host copy on CUDA, where the
    reduction used to synchronise anyway). Where the extension would reject
    the arguments before reading cu_seqlens' values (packed not a 2-D float
    tensor, cu_seqlens not a 1-D int32/int64 tensor with B + 1 >= 1 entries,
    tensors on different or unsupported devices) this returns 0, and the
    extension's call raises its own message on an empty output."""
    if (packed.dim() != 2 or packed.dtype not in _FLOATS or cu_seqlens.dim() != 1
            or cu_seqlens.dtype not in _INTS or cu_seqlens.shape[0] < 1
            or cu_seqlens.device != packed.device or packed.device.type not in ("cpu", "cuda")):
        return 0
    cu = cu_seqlens.cpu().numpy()
    # The common case in a few numpy calls (per batch on the serving path);
    # _check_cu raises with the message for whatever is wrong.
    if cu[0] != 0 or cu[-1] != packed.shape[0] or (cu[1:] < cu[:-1]).any():
        _check_cu(cu, "cu_seqlens", packed.shape[0], None)
        raise AssertionError("unreachable: _check_cu accepted a cu_seqlens the fast check rejected")
    return int((cu[1:] - cu[:-1]).max()) if cu.shape[0] > 1 else 0


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Packed [T, H] + cu_seqlens [B + 1] -> padded [B, max_len, H], zero past each length.

    max_len defaults to the longest sequence (read from cu_seqlens, after
    checking it, so that a malformed one raises ValueError rather than sizing
    the output): on CUDA that read waits for the stream, so callers that
    know the padded length pass it.
    """
    _require_tensor(packed, "packed")
    _require_tensor(cu_seqlens, "cu_seqlens")
    b = max(cu_seqlens.shape[0] - 1, 0) if cu_seqlens.dim() == 1 else 0
    if max_len is None:
        max_len = _longest(packed, cu_seqlens)
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    h = packed.shape[1] if packed.dim() == 2 else 0
    out = _empty((b, max_len, h), packed.dtype, packed.device)
    _k.unpack(_arg(packed, "packed"), _arg(cu_seqlens, "cu_seqlens"), _arg(out, "out"), _stream(packed))
    return out


def segment_pool(
    x: torch.Tensor, cu_seqlens: torch.Tensor, mode: PoolMode = "mean", normalize: bool = False
) -> torch.Tensor:
    """Pool each sequence's packed rows x [T, H] into [B, H] float32.

    mode: "mean", "cls" (first row) or "max"; an empty sequence pools to zeros.
    Accumulates in float32 whatever x's dtype. normalize divides each row by
    max(||row||_2, 1e-12), like torch.nn.functional.normalize.
    """
    _require_tensor(x, "x")
    _require_tensor(cu_seqlens, "cu_seqlens")
    b = max(cu_seqlens.shape[0] - 1, 0) if cu_seqlens.dim() == 1 else 0
    h = x.shape[1] if x.dim() == 2 else 0
    out = _empty((b, h), torch.float32, x.device)
    ax, acu = _arg(x, "x"), _arg(cu_seqlens, "cu_seqlens")
    scratch = None  # kept referenced until the kernel is enqueued
    if x.device.type == "cuda":
        # Partial results where the CUDA kernel splits segments over blocks
        # (torch's caching allocator: no device allocation or sync per call).
        n = _k.segment_pool_scratch(ax, acu, mode)
        if n:
            scratch = _empty((n,), torch.float32, x.device)
    _k.segment_pool(ax, acu, _arg(out, "out"), mode, bool(normalize), _stream(x),
                    None if scratch is None else _arg(scratch, "scratch"))
    return out


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, ...] by index [M]: out[i] = x[index[i]], with 0 <= index < N
    (ValueError otherwise on the CPU; on CUDA, where indices are not read on
    the host, such a row is zeros)."""
    _require_tensor(x, "x")
    _require_tensor(index, "index")
    m = index.shape[0] if index.dim() == 1 else 0
    out = _empty((m, *x.shape[1:]), x.dtype, x.device)
    _k.gather(_arg(x, "x"), _arg(index, "index"), _arg(out, "out"), _stream(x))
    return out


def cpu_vector_paths() -> bool:
    """Whether the CPU kernels run their AVX2 + FMA paths on this CPU (else
    portable loops: correct, but slower than torch's own CPU kernels for
    attention and the layer tails)."""
    return bool(_k.cpu_vector_paths())


def cpu_isa() -> str:
    """The widest path the CPU layer kernels run on this CPU (attention and the
    epilogues on widths a multiple of 16): "avx512_bf16" where it has AVX-512F
    and AVX512-BF16 (the AVX-512 path with bfloat16 stores in one
    instruction, the same bits, and bfloat16 attention's products in
    bfloat16 arithmetic by vdpbf16ps, within a stated bound of the float32
    arithmetic: tests/python/test_cpu_layer_kernels.py), "avx512" where it has
    AVX-512F, both without FASTSERVE_KERNEL_NO_AVX512=1, "avx2" where it has
    AVX2 + FMA, "portable" elsewhere or with FASTSERVE_KERNEL_NO_SIMD=1
    (each read once per process; unset, empty or "0" is off)."""
    return str(_k.cpu_isa())


@contextlib.contextmanager
def cpu_isa_cap(isa: str) -> Iterator[None]:
    """Within the block, every CPU layer kernel call in the process runs at
    most the `isa` path ("avx512_bf16", "avx512", "avx2" or "portable"),
    whatever engine makes it: for A/B measurements in one process
    (benchmarks/python/cpu_dtype.py), not for serving. ValueError for another
    name. Blocks in several threads take turns (one thread's block waits
    for another's to end), so each restores what it found: interleaved,
    the last to leave restored an earlier cap for good."""
    with _isa_cap_lock:
        prev = _k.set_cpu_isa_cap(isa)
        try:
            yield
        finally:
            _k.set_cpu_isa_cap(prev)


_isa_cap_lock = threading.RLock()  # reentrant: a block may nest in its own thread


def _threads(threads: int | None) -> int:
    return int(threads if threads is not None else torch.get_num_threads())


def attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None, *,
              bias: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """Exact self-attention of each sequence of a packed batch, on the CPU in
    float32 or bfloat16 (computed in float32, the output rounded once; bias
    and output in qkv's dtype; bfloat16 on the "avx512_bf16" path, see
    cpu_isa, rounds q, k, v and the softmax weights to bfloat16 and runs
    q k^T and p v in bfloat16 arithmetic): qkv [T, 3, nh, hd] (each token's queries,
    keys and values, as one fused projection gives them) and cu_seqlens [B + 1] ->
    [T, nh, hd], softmax(q k^T * scale) v over the rows of the same
    sequence, with no padding and no mask. bias [3 * nh * hd]: the
    projection's bias, added to q, k and v here when the projection ran
    without it. scale defaults to hd ** -0.5; threads to torch's intra-op
    thread count on the calling thread."""
    _require_tensor(qkv, "qkv")
    if qkv.dim() == 4 and qkv.device.type != "cpu":
        raise ValueError(f"attention runs on the CPU only; qkv is on {qkv.device}")
    hd = qkv.shape[3] if qkv.dim() == 4 else 0
    if scale is None:
        scale = hd ** -0.5 if hd else 1.0
    out = _empty(tuple(qkv.shape[:1]) + tuple(qkv.shape[2:]) if qkv.dim() == 4 else (0,), qkv.dtype, qkv.device)
    _k.attention(_arg(qkv, "qkv"), _arg(cu_seqlens, "cu_seqlens"), _arg(out, "out"),
                 None if bias is None else _arg(bias, "bias"), float(scale), _threads(threads))
    return out


def bias_gelu_(x: torch.Tensor, bias: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
    """x [rows, N] = gelu(x + bias [N]) in place (exact GELU, erf), on the
    CPU in float32 or bfloat16, or on CUDA (a CUDA build) in float32, float16
    or bfloat16 (bias in x's dtype; computed in float32): the tail of an
    intermediate projection run without its bias. Returns x. On CUDA: one
    launch on torch's current stream, no synchronisation (threads unused)."""
    _k.bias_gelu(_arg(x, "x"), _arg(bias, "bias"), _threads(threads), stream=_stream(x))
    return x


def add_layer_norm_(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    beta: torch.Tensor, eps: float, *, threads: int | None = None) -> torch.Tensor:
    """x [rows, N] = layer_norm(x + bias + residual) * weight + beta in place,
    over the last dimension, on the CPU in float32 or bfloat16, or on CUDA (a
    CUDA build) in float32, float16 or bfloat16 (every tensor in x's dtype;
    computed in float32, the sum rounded to x's dtype before the
    normalisation, as torch's add then LayerNorm): the tail of an attention
    or feed-forward output projection run without its bias. Returns x. On
    CUDA: one launch on torch's current stream, no synchronisation (threads
    unused)."""
    _k.add_layer_norm(_arg(x, "x"), _arg(bias, "bias"), _arg(residual, "residual"), _arg(weight, "weight"),
                      _arg(beta, "beta"), float(eps), _threads(threads), stream=_stream(x))
    return x


# ------------------------------------------------------ torch implementations
#
# The same contracts with torch operations on any device. Arguments are
# checked like the extension checks them (same messages), offsets and indices
# on the host: one small device-to-host copy per call, as on the CUDA path.
# Inputs need not be contiguous.

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)


def _name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check(t: torch.Tensor, name: str, dim: int, dtypes: tuple[torch.dtype, ...], what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {what}, got {_name(t)}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {list(t.shape)}")


def _check_float(t: torch.Tensor, name: str, dim: int) -> None:
    _check(t, name, dim, _FLOATS, "float32, float16 or bfloat16")


def _host_ints(t: torch.Tensor, name: str, x: torch.Tensor, x_name: str) -> np.ndarray:
    """A 1-D int32/int64 tensor on x's device, read into host int64."""
    _check(t, name, 1, _INTS, "int32 or int64")
    if t.device != x.device:
        raise ValueError(f"all tensors must be on one device: {x_name} is on {x.device}, {name} on {t.device}")
    return t.cpu().numpy().astype(np.int64, copy=False)


def _check_cu(cu: np.ndarray, name: str, rows: int | None, max_len: int | None) -> np.ndarray:
    """Validate cu_seqlens (the extension's messages); the lengths [B]."""
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have B + 1 >= 1 entries, got 0")
    if cu[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {cu[0]}")
    # Compared, not subtracted: a difference of two int64 offsets can wrap
    # ([0, 2**62, -2**63, -2**62, 4] has only non-negative wrapped differences).
    decreasing = cu[1:] < cu[:-1]
    if decreasing.any():
        b = int(np.argmax(decreasing))
        raise ValueError(f"{name} must be non-decreasing, but {name}[{b + 1}] = {cu[b + 1]} < {name}[{b}] = {cu[b]}")
    lengths = np.diff(cu)  # exact now: every entry lies in [0, cu[-1]]
    if max_len is not None and (lengths > max_len).any():
        b = int(np.argmax(lengths > max_len))
        raise ValueError(f"sequence {b} has length {lengths[b]} > max length {max_len}")
    if rows is not None and cu[-1] != rows:
        raise ValueError(f"{name}[-1] must equal the number of packed rows {rows}, got {cu[-1]}")
    return lengths


def _padded_rows(lengths: np.ndarray, max_len: int, device: torch.device) -> torch.Tensor:
    """For each packed row, its row in the padded [B * max_len] layout."""
    starts = np.arange(lengths.shape[0], dtype=np.int64) * max_len
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if lengths.size else lengths
    rows = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
    return torch.from_numpy(rows).to(device)


def torch_pack(x: torch.Tensor, lengths: torch.Tensor, *, total: int | None = None) -> torch.Tensor:
    """pack() with torch operations."""
    _check_float(x, "x", 3)
    B, L, H = x.shape
    seq = _host_ints(lengths, "lengths", x, "x")
    if seq.shape[0] == B:
        bad = np.flatnonzero((seq < 0) | (seq > L))
        if bad.size:
            raise ValueError(f"lengths[{bad[0]}] = {seq[bad[0]]} is outside [0, L = {L}]")
    elif seq.shape[0] == B + 1:
        seq = _check_cu(seq, "cu_seqlens", None, L)
    else:
        raise ValueError(f"lengths must have B = {B} entries (lengths) or B + 1 (cu_seqlens), got {seq.shape[0]}")
    T = int(seq.sum())
    if total is not None and total != T:
        raise ValueError(f"out must have shape [{T}, {H}], got [{total}, {H}]")
    return x.reshape(B * L, H).index_select(0, _padded_rows(seq, L, x.device))


def torch_unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """unpack() with torch operations."""
    _check_float(packed, "packed", 2)
    T, H = packed.shape
    if max_len is not None and max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    cu = _host_ints(cu_seqlens, "cu_seqlens", packed, "packed")
    lengths = _check_cu(cu, "cu_seqlens", T, max_len)
    if max_len is None:
        max_len = int(lengths.max()) if lengths.size else 0
    out = packed.new_zeros((lengths.shape[0] * max_len, H))
    out.index_copy_(0, _padded_rows(lengths, max_len, packed.device), packed)
    return out.view(lengths.shape[0], max_len, H)


def torch_segment_pool(
    x: torch.Tensor, cu_seqlens: torch.Tensor, mode: PoolMode = "mean", normalize: bool = False
) -> torch.Tensor:
    """segment_pool() with torch operations. Sums and maxima run over a
    zero-padded float32 copy [B, longest, H] (deterministic reductions, no
    atomics), so the results may differ from the extension's in the last bits."""
    _check_float(x, "x", 2)
    if mode not in ("mean", "cls", "max"):
        raise ValueError(f"mode must be 'mean', 'cls' or 'max', got '{mode}'")
    T, H = x.shape
    cu = _host_ints(cu_seqlens, "cu_seqlens", x, "x")
    lengths = _check_cu(cu, "cu_seqlens", T, None)
    B = lengths.shape[0]
    if B == 0 or T == 0:
        return torch.zeros((B, H), dtype=torch.float32, device=x.device)
    n = torch.from_numpy(lengths).to(x.device)
    if mode == "cls":
        first = torch.from_numpy(np.minimum(cu[:-1], T - 1)).to(x.device)
        out = x.index_select(0, first).float().masked_fill((n == 0)[:, None], 0.0)
    else:
        longest = int(lengths.max())
        padded = torch_unpack(x.float(), cu_seqlens, longest)
        if mode == "mean":
            out = padded.sum(1) / n.clamp_min(1)[:, None].float()
        else:
            keep = torch.arange(longest, device=x.device)[None, :] < n[:, None]
            out = padded.masked_fill(~keep[..., None], float("-inf")).amax(1).masked_fill((n == 0)[:, None], 0.0)
    return F.normalize(out, p=2.0, dim=1, eps=1e-12) if normalize else out


def torch_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """gather() with torch operations."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got shape []")
    if x.dtype not in _FLOATS + _INTS:
        raise ValueError(f"x must be float32, float16, bfloat16, int32 or int64, got {_name(x)}")
    idx = _host_ints(index, "index", x, "x")
    bad = np.flatnonzero((idx < 0) | (idx >= x.shape[0]))
    if bad.size:
        raise ValueError(f"index[{bad[0]}] = {idx[bad[0]]} is out of range for {x.shape[0]} rows")
    return x.index_select(0, index)


def torch_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None, *,
                    bias: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """attention() with torch operations: one scaled_dot_product_attention
    call per sequence, on any device and float dtype (threads is unused)."""
    _check_float(qkv, "qkv", 4)
    T, three, nh, hd = qkv.shape
    if three != 3:
        raise ValueError(f"qkv must have shape [T, 3, heads, head_dim], got {list(qkv.shape)}")
    if bias is not None:
        qkv = qkv + bias.view(3, nh, hd)
    lengths = _check_cu(_host_ints(cu_seqlens, "cu_seqlens", qkv, "qkv"), "cu_seqlens", T, None)
    out = torch.empty(T, nh, hd, dtype=qkv.dtype, device=qkv.device)
    start = 0
    for n in lengths.tolist():
        if n:
            q, k, v = qkv[start : start + n].permute(1, 2, 0, 3)  # each [nh, n, hd]
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
            out[start : start + n] = o.transpose(0, 1)
        start += n
    return out


def _check_epilogue(x: torch.Tensor, named: list[tuple[torch.Tensor, str, int]]) -> None:
    """The epilogues' checks on CUDA (the extension's messages), with no
    device read: x [rows, N] float; the others x's dtype, on x's device,
    [N] (1-D) or x's shape (2-D)."""
    _check_float(x, "x", 2)
    for t, name, dim in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"{name} must have {dim} dimensions, got shape {list(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({_name(x)}), got {_name(t)}")
        want = list(x.shape) if dim == 2 else [x.shape[1]]
        if list(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"all tensors must be on one device: x is on {x.device}, {name} is on {t.device}")


def torch_bias_gelu_(x: torch.Tensor, bias: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
    """bias_gelu_() with torch operations, on any device and float dtype
    (computed in float32 through a temporary; threads is unused)."""
    _check_epilogue(x, [(bias, "bias", 1)])
    x.copy_(F.gelu(x.float() + bias.float()))
    return x


def torch_add_layer_norm_(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          beta: torch.Tensor, eps: float, *, threads: int | None = None) -> torch.Tensor:
    """add_layer_norm_() with torch operations, on any device and float dtype
    (the sum rounded to x's dtype, then F.layer_norm in float32; threads is
    unused)."""
    _check_epilogue(x, [(bias, "bias", 1), (residual, "residual", 2), (weight, "weight", 1), (beta, "beta", 1)])
    if not (math.isfinite(eps) and 0 <= eps <= torch.finfo(torch.float32).max):
        raise ValueError(f"eps must be finite and >= 0 as a float32, got {eps}")
    s = (x.float() + bias.float() + residual.float()).to(x.dtype)
    x.copy_(F.layer_norm(s.float(), (x.shape[1],), weight.float(), beta.float(), float(eps)))
    return x


# -------------------------------------------------------------- per device


class Kernels(NamedTuple):
    """One implementation of the kernels; name is "cpu" or "cuda" (the
    extension's) or "torch"."""

    name: str
    pack: Callable[..., torch.Tensor]
    unpack: Callable[..., torch.Tensor]
    segment_pool: Callable[..., torch.Tensor]
    gather: Callable[..., torch.Tensor]
    bias_gelu_: Callable[..., torch.Tensor]
    add_layer_norm_: Callable[..., torch.Tensor]


_TORCH = Kernels("torch", torch_pack, torch_unpack, torch_segment_pool, torch_gather, torch_bias_gelu_,
                 torch_add_layer_norm_)


def _compiled_for(device_type: str) -> bool:
    """Whether the extension has kernels for this device type."""
    return device_type == "cpu" or (device_type == "cuda" and bool(_core.cuda_compiled()))


def _forced_torch() -> bool:
    forced = os.environ.get("FASTSERVE_KERNELS", "auto") or "auto"
    if forced not in ("auto", "torch"):
        raise ValueError(f"FASTSERVE_KERNELS must be 'auto' or 'torch', got {forced!r}")
    return forced == "torch"


def for_device(device: torch.device | str) -> Kernels:
    """The kernels for tensors on `device`: the extension's where it was built
    for the device type, else the torch implementations."""
    device = torch.device(device)
    if _forced_torch() or not _compiled_for(device.type):
        return _TORCH
    return Kernels(device.type, pack, unpack, segment_pool, gather, bias_gelu_, add_layer_norm_)


def fallback_reason(device: torch.device | str) -> str | None:
    """Why for_device(device) falls back to torch, and the fix; None when it
    does not, or does because FASTSERVE_KERNELS=torch asked for it."""
    device = torch.device(device)
    if _forced_torch() or _compiled_for(device.type):
        return None
    if device.type == "cuda":
        why = "fastserve's C++ extension was built without CUDA (nvcc was not found when it was installed)"
        fix = ("reinstall fastserve with the CUDA toolkit's nvcc on PATH; pass "
               "-C cmake.define.FASTSERVE_CUDA=ON to pip to make a missing nvcc a build error")
    else:
        why = f"fastserve's C++ extension has no {device.type} kernels"
        fix = "reinstall fastserve from source on this machine"
    return (f"{why}, so its packing kernels run as torch operations on {device} (correct, but slower). "
            f"To fix: {fix}.")
