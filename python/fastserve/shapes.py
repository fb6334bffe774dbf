"""Token-count buckets for packed CPU batches that run through oneDNN.

oneDNN, which torch calls for bf16/fp16 matrix products on the CPU, builds a
primitive for every new shape and keeps it in a process-wide cache (1,024
entries by default). A packed batch's matrix products are [T, H] x [H, N] with
T its real tokens, so nearly every batch is a new shape: measured on the
2-core AMX Xeon with MiniLM in bf16, RSS grew by 870 MiB over 240 batches of
distinct sizes (benchmarks/README.md, "Memory"). Rounding T up to one of a
few sizes bounds the shapes, hence the cache: `bucket(T)` rounds up in steps
of 16 tokens below 128 and of an eighth of the power of two at or below T
from there (eight sizes per doubling), so a batch of 128 tokens or more
computes at most 1/8 more, and 40 sizes cover 1 to 2,048 tokens. The extra tokens are a ghost sequence (or several, each within
the model's maximum length) appended to the batch; its rows are dropped
before the results go back, and no request ever sees it. An engine whose
layers' products go through gemm.py's oneDNN pieces (bfloat16's default
where oneDNN runs it) does not round: the pieces bound the shapes
themselves (process.onednn_buckets).

In float32 the engine avoids oneDNN instead (process.onednn_for), which is as
fast there, so fp32 batches are not rounded to buckets. They are padded only
up to MIN_ROWS tokens: one thread's torch.mm (MKL's sgemm) gives a row other
bits in a product of 1 to 3 rows than in a larger one (checked at MiniLM's
four weight shapes on an AMD EPYC, 4 to 2,048 rows all agreeing), which would
break the bitwise batch invariance the README promises for a text of a few
tokens alone.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

MIN_STEP = 16
PER_DOUBLING = 8
MIN_ROWS = 4  # the fewest rows of a float32 product whose bits agree with any larger product's


def bucket(tokens: int) -> int:
    """The smallest bucket size >= tokens."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    step = max(MIN_STEP, (1 << (int(tokens).bit_length() - 1)) // PER_DOUBLING)
    return -(-tokens // step) * step


def ghost_pieces(extra: int, max_length: int) -> list[int]:
    """Lengths of the ghost sequences that fill `extra` tokens, each at most
    max_length (here and in the CUDA graphs' batches, graphs.py)."""
    return [max_length] * (extra // max_length) + ([extra % max_length] if extra % max_length else [])


class GhostedBatch:
    """A packed batch with ghost sequences appended so that its token count is
    `bucket(T)`: the attributes the packed runners read (packed_input_ids,
    position_ids, cu_seqlens, lengths, max_seqlen, size), extended. `ghosts`
    is how many rows to drop from the end of the runner's output."""

    def __init__(self, batch: Any, extra: int, max_length: int, pad_id: int) -> None:
        pieces = ghost_pieces(extra, max_length)
        self.ghosts = len(pieces)
        self.ids = batch.ids
        ids = np.asarray(batch.packed_input_ids)
        self.packed_input_ids = np.concatenate([ids, np.full(extra, pad_id, dtype=ids.dtype)])
        pos = np.asarray(batch.position_ids)
        self.position_ids = np.concatenate([pos, *(np.arange(n, dtype=pos.dtype) for n in pieces)])
        lengths = np.asarray(batch.lengths)
        self.lengths = np.concatenate([lengths, np.asarray(pieces, dtype=lengths.dtype)])
        cu = np.asarray(batch.cu_seqlens)
        self.cu_seqlens = np.concatenate([cu, cu[-1] + np.cumsum(pieces).astype(cu.dtype)])
        self.max_seqlen = max(int(batch.max_seqlen), max(pieces))
        self.size = int(batch.size) + self.ghosts


def target(tokens: int, buckets: bool) -> int:
    """The token count a packed CPU batch of `tokens` runs at: its bucket
    (buckets: bf16/fp16 whose products run through torch.mm), else at least
    MIN_ROWS (float32, and bf16 through gemm.py's pieces)."""
    return bucket(tokens) if buckets else max(int(tokens), MIN_ROWS)


def fitting(room: int, buckets: bool) -> int:
    """The most tokens T whose target(T, buckets) is at most `room` (0 when
    none is): room itself where it is a target, else the bucket below it."""
    if room < (MIN_STEP if buckets else MIN_ROWS):
        return 0
    if not buckets:
        return room
    step = max(MIN_STEP, (1 << (int(room).bit_length() - 1)) // PER_DOUBLING)
    return room // step * step


def ghosted(batch: Any, max_length: int, pad_id: int, buckets: bool = True) -> Optional[GhostedBatch]:
    """The batch padded with ghost sequences to target(T, buckets), or None
    when its token count T already is that."""
    tokens = int(np.asarray(batch.cu_seqlens)[-1])
    extra = target(tokens, buckets) - tokens
    return GhostedBatch(batch, extra, max_length, pad_id) if extra else None


def extend(values: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """A per-request array (prompt lengths, pair segments) with the ghosts' entries appended."""
    values = np.asarray(values)
    return np.concatenate([values, fill.astype(values.dtype)])
