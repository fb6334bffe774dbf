"""Packing kernels for padding-free execution, on torch tensors.

    packed = pack(x, lengths)                     # [B, L, H] -> [T, H]
    padded = unpack(packed, cu_seqlens, max_len)  # [T, H] -> [B, L, H], zeros past each length
    emb = segment_pool(packed, cu_seqlens, "mean", normalize=True)  # [B, H] float32
    rows = gather(x, index)                       # x[index] along dim 0

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
CUDA; offsets and indices are validated on the host, which costs one small
device-to-host copy and a stream synchronisation per call.
"""

from __future__ import annotations

from typing import Literal

import torch

from fastserve import _core

__all__ = ["pack", "unpack", "segment_pool", "gather", "cu_seqlens_from_lengths"]

_k = _core._kernels  # type: ignore[attr-defined]  # private submodule, see csrc/bindings/kernels.cpp

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int32: "int32",
    torch.int64: "int64",
}

PoolMode = Literal["mean", "cls", "max"]


def _arg(t: torch.Tensor, name: str) -> object:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
    """cu_seqlens [B + 1] int32 (0, l0, l0 + l1, ...) on lengths' device."""
    out = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = torch.cumsum(lengths, 0)
    return out


def pack(x: torch.Tensor, lengths: torch.Tensor, *, total: int | None = None) -> torch.Tensor:
    """Padded x [B, L, H] -> packed [T, H], T = sum of lengths.

    lengths is [B] (lengths) or [B + 1] (cu_seqlens). total, when the caller
    knows T, avoids reading it from lengths (a device synchronisation on CUDA).
    """
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


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Packed [T, H] + cu_seqlens [B + 1] -> padded [B, max_len, H], zero past each length.

    max_len defaults to the longest sequence (read from cu_seqlens).
    """
    b = max(cu_seqlens.shape[0] - 1, 0) if cu_seqlens.dim() == 1 else 0
    if max_len is None:
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if b > 0 else 0
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
    b = max(cu_seqlens.shape[0] - 1, 0) if cu_seqlens.dim() == 1 else 0
    h = x.shape[1] if x.dim() == 2 else 0
    out = _empty((b, h), torch.float32, x.device)
    _k.segment_pool(_arg(x, "x"), _arg(cu_seqlens, "cu_seqlens"), _arg(out, "out"), mode, bool(normalize), _stream(x))
    return out


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, ...] by index [M]: out[i] = x[index[i]], with 0 <= index < N."""
    m = index.shape[0] if index.dim() == 1 else 0
    out = _empty((m, *x.shape[1:]), x.dtype, x.device)
    _k.gather(_arg(x, "x"), _arg(index, "index"), _arg(out, "out"), _stream(x))
    return out
