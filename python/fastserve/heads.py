"""From a batch's last hidden states to one embedding per sequence, as the
model's sentence-transformers stack computes it: Pooling (every mode, with
the prompt's tokens left out when include_prompt is false), then each Dense
and Normalize module in order, then the cut to truncate_dim (Truncate).

Both layouts pool through one implementation: packed tokens [T, H] with
cu_seqlens, and padded [B, L, H] (right padding) gathered to packed first.
The common stacks (one of mean/cls/max, normalised or not) go through the
packing kernels' fused segment_pool instead."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .st_spec import DenseLayer, Truncate

KERNEL_POOLINGS = ("mean", "cls", "max")


class EmbeddingHead:
    """pooling: sentence-transformers mode names, concatenated in this order.
    post: DenseLayer objects, "normalize" and Truncate, applied in order."""

    def __init__(self, pooling: Sequence[str], *, include_prompt: bool = True, post: Sequence[Any] = (),
                 device: torch.device | str = "cpu") -> None:
        self.modes = tuple(pooling)
        self.include_prompt = include_prompt
        self.post = [p.to(torch.device(device)) if isinstance(p, DenseLayer) else p for p in post]
        # The fused kernel pools and normalises; a cut after it (truncate_dim) is a slice of its output.
        self.kernel_cut = self.post[-1] if self.post and isinstance(self.post[-1], Truncate) else None
        fused = self.post[:-1] if self.kernel_cut is not None else self.post
        only_norm = all(p == "normalize" for p in fused)
        self.kernel_mode = self.modes[0] if len(self.modes) == 1 and self.modes[0] in KERNEL_POOLINGS and only_norm \
            else None
        self.kernel_normalize = bool(fused)

    def dim(self, hidden: int) -> int:
        """The embedding's width for hidden states of width `hidden`."""
        width = len(self.modes) * hidden
        for p in self.post:
            if isinstance(p, DenseLayer):
                width = int(p.weight.shape[0])
            elif isinstance(p, Truncate):
                width = p.width(width)
        return width

    @property
    def needs_prompt_lengths(self) -> bool:
        """Whether run(batch) needs each row's prompt length (tokens to leave out)."""
        return not self.include_prompt

    def packed(self, h: torch.Tensor, cu: torch.Tensor, kernels: Any = None,
               skip: np.ndarray | None = None) -> torch.Tensor:
        """[B, dim] float32 from packed hidden states [T, H] and cu_seqlens [B + 1].
        A head that leaves prompts out (skip) always pools by pool_packed,
        whether or not a row of this batch has a prompt: the path must not
        depend on the other rows (a row's bits would, by 3e-8)."""
        if self.kernel_mode is not None and skip is None and kernels is not None:
            out = kernels.segment_pool(h, cu, mode=self.kernel_mode, normalize=self.kernel_normalize)
            return out if self.kernel_cut is None else self.kernel_cut(out)
        return self._post(pool_packed(h.float(), cu.long(), self.modes, skip))

    def padded(self, hidden: torch.Tensor, mask: torch.Tensor, skip: np.ndarray | None = None) -> torch.Tensor:
        """[B, dim] float32 from right-padded hidden states [B, L, H] and their mask [B, L]."""
        keep = mask.bool()
        lengths = keep.sum(1)
        cu = F.pad(lengths.cumsum(0), (1, 0))
        return self.packed(hidden[keep], cu, None if self.kernel_mode is None else _TorchPool, skip)

    def _post(self, x: torch.Tensor) -> torch.Tensor:
        if not self.post:
            return x
        # float32 in every dtype: under dtype="autocast" the worker's autocast
        # would run a Dense module's linear in bfloat16.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            for op in self.post:
                x = F.normalize(x, p=2, dim=-1) if op == "normalize" else op(x)  # a DenseLayer or a Truncate
        return x


class _TorchPool:
    """segment_pool for the padded path (no packing kernels there)."""

    @staticmethod
    def segment_pool(h: torch.Tensor, cu: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
        out = pool_packed(h.float(), cu.long(), (mode,), None)
        return F.normalize(out, p=2, dim=-1) if normalize else out


def pool_packed(h: torch.Tensor, cu: torch.Tensor, modes: Sequence[str], skip: np.ndarray | None) -> torch.Tensor:
    """sentence-transformers' Pooling over packed float32 tokens [T, H]
    (cu_seqlens int64 [B + 1]). skip[i]: sequence i's first tokens to leave
    out (its prompt) as Pooling does with include_prompt=False: they are
    masked, CLS becomes the first token kept, weightedmean keeps each kept
    token's position weight, a sequence with no token kept pools to zeros
    (mean, lasttoken) or -inf (max), as the padded Pooling gives."""
    T, H = h.shape
    B = cu.numel() - 1
    dev = h.device
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(B, device=dev), lengths, output_size=T)
    pos = torch.arange(T, device=dev) - cu[:-1][seg]
    if skip is None:
        first = torch.zeros(B, dtype=torch.long, device=dev)
        keep = None
    else:
        first = torch.as_tensor(np.asarray(skip), dtype=torch.long, device=dev)
        keep = pos >= first[seg]
    w_keep = torch.ones(T, 1, dtype=h.dtype, device=dev) if keep is None else keep[:, None].to(h.dtype)
    count = torch.zeros(B, 1, dtype=h.dtype, device=dev).index_add_(0, seg, w_keep)
    out = []
    total = None
    for mode in modes:
        if mode == "cls":
            has = lengths > first
            out.append(h[cu[:-1] + torch.where(has, first, 0)])
        elif mode == "lasttoken":
            last = h[cu[1:] - 1]
            out.append(last if keep is None else last * (lengths > first)[:, None].to(h.dtype))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if total is None:
                total = torch.zeros(B, H, dtype=h.dtype, device=dev).index_add_(0, seg, h * w_keep)
            den = count.clamp_min(1e-9)
            out.append(total / (den if mode == "mean" else den.sqrt()))
        elif mode == "max":
            src = h if keep is None else h.masked_fill(~keep[:, None], float("-inf"))
            init = torch.full((B, H), float("-inf"), dtype=h.dtype, device=dev)
            out.append(init.scatter_reduce(0, seg[:, None].expand(T, H), src, reduce="amax"))
        elif mode == "weightedmean":
            w = (pos + 1).to(h.dtype)[:, None] * w_keep
            num = torch.zeros(B, H, dtype=h.dtype, device=dev).index_add_(0, seg, h * w)
            den = torch.zeros(B, 1, dtype=h.dtype, device=dev).index_add_(0, seg, w)
            out.append(num / den.clamp_min(1e-9))
        else:
            raise ValueError(f"unknown pooling {mode!r}")
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)
