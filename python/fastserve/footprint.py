"""What a batch costs in memory, from the model's shape: the activation
formula behind `Engine(max_batch_memory_mb=...)` and stats()["memory"].

Each layer's activations live only while the layer runs, so a batch's peak is
the largest set of tensors alive at one moment inside one layer, times the
batch's tokens. With H the hidden size, I the feed-forward's inner size, e the
bytes of an element of the model's dtype, and T tokens:

- packed runner (python/fastserve/runners.py): the feed-forward holds the
  attention block's output [T, H] while its up-projection [T, I] and the
  activation's result [T, I] both exist: T * (H + 2I) * e (the layer's input
  and the attention context are released before it; with them it was
  T * (3H + 2I) * e). Attention holds the layer's input [T, H], Q/K/V
  [T, 3H], the context [T, H] and, per run of equal lengths, SDPA's output
  and its re-laid-out copy: at most T * 7H * e, when one run holds the whole
  batch. The peak is the larger of the two, T * max(H + 2I, 7H) * e (the
  feed-forward's for the usual I = 4H), plus the CPU attention kernel's
  scratch, a few blocks of scores per thread whatever the batch, and 24
  bytes of int64 rows (token types, position ids and their offset copy).
  Where the layers run through fastserve's CPU kernels (float32 and
  bfloat16 on the CPU, runners.fused_layers), GELU and the LayerNorms work
  in place and Q/K/V die with the attention kernel's call: attention holds the input, Q/K/V and
  the context (5H), the feed-forward the attention block's output, the
  up-projection and the down-projection's result (2H + I), so
  T * max(2H + I, 5H) * e: 6H instead of 9H per token for I = 4H. Under
  autocast the layers' products and GELU are bfloat16 and their residual
  stream float32, with a bfloat16 copy of each product's input and a
  float32 one of each output: measured 20H bytes per token at I = 4H
  (tests/python/test_footprint.py), within the float32 count of 24H that
  the engine budgets. (The
  kernel's own scratch, a sequence's keys and values and four rows of
  scores per thread, is outside torch's allocator, a few hundred KiB at
  most for 512-token sequences);
- padded runner (the model's own forward on [B, L]): T = B * L padded tokens
  and the layer input and attention context stay alive, T * (3H + 2I) * e,
  plus the attention masks transformers builds, 2L bytes per padded token
  (two boolean [B, 1, L, L]); attention that materialises its scores (eager, or a
  relative position bias: MPNet, T5) adds [B, heads, L, L] twice (scores and
  probabilities), 2 * heads * L * e per padded token.

Measured against torch's own allocation record (benchmarks/python/memory.py,
--activations; tests/python/test_footprint.py): the packed figure is exact for
the BERT family, and the padded one is exact or an upper bound. Weights are
counted apart: a parameter's bytes, plus nothing for the packed runner's fused
Q/K/V weight, whose parts the model's parameters become views of.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import shapes
from .errors import InvalidInputError

# Per packed token: int64 rows made per batch (token types, position ids and
# their offset copy for the RoBERTa family).
_INDEX_BYTES = 24

# Per batch: tensors of a few rows alive at the peak (sequence offsets, a
# pooled row, reductions' results).
SMALL_BYTES = 4096

# Families whose attention adds a relative position bias [B, heads, L, L].
_RELATIVE_BIAS = {"mpnet", "t5", "mt5", "umt5"}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    relative_bias: bool


def shape_of(config: Any) -> Shape | None:
    """The sizes the formula needs, read from a transformers config; None when
    the config does not name them."""
    mt = getattr(config, "model_type", "")
    if mt == "distilbert":
        names = ("dim", "hidden_dim", "n_heads", "n_layers")
    elif mt in ("t5", "mt5", "umt5"):
        names = ("d_model", "d_ff", "num_heads", "num_layers")
    else:
        names = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
    values = [getattr(config, n, None) for n in names]
    if not all(isinstance(v, int) and v > 0 for v in values):
        return None
    hidden, inter, heads, layers = values
    if getattr(config, "feed_forward_proj", "").startswith("gated") or mt == "modernbert":
        inter *= 2  # gated feed-forward: the up-projection is twice as wide
    return Shape(hidden, inter, heads, layers, mt in _RELATIVE_BIAS)


def activation_bytes_per_token(shape: Shape, dtype: torch.dtype, execution: str, *, max_length: int,
                               scores: bool = False, fused: bool = False) -> int:
    """Peak activation bytes per token the scheduler counts: real tokens for
    the packed runner, padded tokens (B * L, L <= max_length) for the padded
    one. scores: the padded attention materialises its scores (eager).
    fused: the packed runner's layers run through the CPU kernels."""
    e = torch.empty((), dtype=dtype).element_size()
    H, I = shape.hidden, shape.intermediate
    if execution == "packed":
        return max(2 * H + I if fused else H + 2 * I, 5 * H if fused else 7 * H) * e + _INDEX_BYTES
    per = (3 * H + 2 * I) * e + 2 * max_length  # + the boolean masks' rows
    if scores or shape.relative_bias:
        per += 2 * shape.heads * max_length * e
    return per


def attention_scratch_bytes(shape: Shape, dtype: torch.dtype, *, max_length: int, threads: int) -> int:
    """Scratch of torch's CPU flash-attention kernel for one call, at most:
    per thread a block of scores (q_split x kv_split), its row maxima and
    sums, and an output block (q_split x head_dim), in float32 whatever the
    model's dtype. The split sizes are the kernel's own (32, 64 or 256 query
    rows by the sequence length; 512 keys at most)."""
    q = 256 if max_length >= 768 else 64 if max_length >= 192 else 32
    kv = min(512, max_length)
    head_dim = shape.hidden // shape.heads
    return threads * (q * kv + 2 * q + q * head_dim) * 4


def gemm_piece_row_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes per row of a piece of a product that oneDNN returns apart and
    that is copied into the product (gemm.Gemm, method "onednn"): a row of
    the widest output, Q/K/V's 3H or the feed-forward's I. A batch of T
    tokens holds one piece of min(T, gemm.PIECE) rows beside its peak."""
    e = torch.empty((), dtype=dtype).element_size()
    return max(3 * shape.hidden, shape.intermediate) * e


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once (tied or
    shared weights, views of one fused tensor)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


@dataclass(frozen=True)
class MemoryBudget:
    """max_batch_memory_mb turned into the largest batch, in the tokens the
    scheduler counts."""

    mib: float
    bytes_per_token: int
    fixed_bytes: int = 0  # per batch whatever its size (attention scratch, small tensors)
    # A piece of a product beside the peak (gemm_piece_row_bytes): this many
    # bytes per token for the batch's first piece_rows tokens.
    piece_row_bytes: int = 0
    piece_rows: int = 0
    # How a batch of T tokens runs (shapes.target): None, at T; False, at
    # least shapes.MIN_ROWS (packed CPU float32); True, at its token bucket
    # (packed CPU bfloat16/float16). The ghost rows count like real ones.
    buckets: bool | None = None

    def batch_bytes(self, tokens: int) -> int:
        """What a batch of `tokens` tokens holds at its peak."""
        return self.fixed_bytes + self.bytes_per_token * tokens + self.piece_row_bytes * min(tokens, self.piece_rows)

    def running_bytes(self, tokens: int) -> int:
        """batch_bytes of a batch of `tokens` tokens as it runs (padded to its target)."""
        return self.batch_bytes(tokens if self.buckets is None else shapes.target(tokens, self.buckets))

    @property
    def tokens(self) -> int:
        """The most tokens whose batch, as it runs (padded to its target),
        has batch_bytes within the budget."""
        room = max(0, int(self.mib * 2**20) - self.fixed_bytes)
        few = room // (self.bytes_per_token + self.piece_row_bytes)
        rows = few if few < self.piece_rows else (room - self.piece_row_bytes * self.piece_rows) // self.bytes_per_token
        return rows if self.buckets is None else shapes.fitting(rows, self.buckets)

    def describe(self) -> str:
        return (f"max_batch_memory_mb={self.mib:g} holds {self.tokens} tokens per batch "
                f"({self.bytes_per_token} bytes of activations per token)")

    def refuse(self, n: int, where: str = "") -> InvalidInputError:
        return InvalidInputError(
            f"input{where} is {n} tokens long; {self.describe()}: it can never run "
            "(shorten it, or raise max_batch_memory_mb)")


def per_token(config: Any, dtype: torch.dtype, execution: str, *, max_length: int,
              scores: bool = False, fused: bool = False) -> int | None:
    """activation_bytes_per_token for a transformers config (None when its
    sizes are unknown)."""
    shape = shape_of(config)
    if shape is None:
        return None
    return activation_bytes_per_token(shape, dtype, execution, max_length=max_length, scores=scores, fused=fused)


def check_mib(mib: Any) -> None:
    """ValueError unless max_batch_memory_mb is None or a positive finite number."""
    if mib is None:
        return
    try:
        fine = (not isinstance(mib, bool) and isinstance(mib, (int, float)) and mib > 0
                and math.isfinite(float(mib) * 2**20))  # in bytes too
    except OverflowError:  # an int past float's range
        fine = False
    if not fine:
        raise ValueError(f"max_batch_memory_mb must be a positive number, got {mib!r}")


def formula(bytes_per_token: int, fixed_bytes: int = 0, piece_row_bytes: int = 0, piece_rows: int = 0,
            buckets: bool | None = None) -> MemoryBudget:
    """The activation formula of an engine's batches (its batch_bytes), with
    no budget (mib inf)."""
    return MemoryBudget(math.inf, int(bytes_per_token), int(fixed_bytes) + SMALL_BYTES, int(piece_row_bytes),
                        int(piece_rows), buckets)  # (plain ints: stats() is JSON, whatever numbers a caller gave)


def memory_budget(mib: float | None, bytes_per_token: int | None, model_type: str,
                  fixed_bytes: int = 0, piece_row_bytes: int = 0, piece_rows: int = 0,
                  buckets: bool | None = None) -> MemoryBudget | None:
    """The budget for Engine(max_batch_memory_mb=mib); ValueError when it can
    not be computed or holds no token at all."""
    if mib is None:
        return None
    check_mib(mib)
    if bytes_per_token is None:
        raise ValueError(f"max_batch_memory_mb: the sizes of model_type={model_type!r} are not known to the "
                         "activation formula (use max_batch_tokens)")
    budget = dataclasses.replace(formula(bytes_per_token, fixed_bytes, piece_row_bytes, piece_rows, buckets),
                                 mib=float(mib))
    if budget.tokens < 1:
        fewest = 1 if buckets is None else shapes.target(1, buckets)  # a batch of one token runs this many
        least = math.ceil(budget.batch_bytes(fewest) / 2**20 * 1e4) / 1e4  # rounded up: it holds one
        first = (f" ({bytes_per_token + piece_row_bytes} for each of its first {piece_rows})"
                 if piece_row_bytes and piece_rows else "")
        padded = f", and runs at least {fewest} tokens" if fewest > 1 else ""
        raise ValueError(f"max_batch_memory_mb={mib:g} holds no token: a batch needs {budget.fixed_bytes} bytes "
                         f"whatever its size and {bytes_per_token} bytes per token{first}{padded} "
                         f"(at least {least:g} MiB)")
    return budget


def measured_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn's result and the peak of the bytes its tensors held at once (on
    the CPU), from torch's allocation record: what the formula is checked
    against. Allocations only, so the allocator's caching does not blur it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return out, peak
