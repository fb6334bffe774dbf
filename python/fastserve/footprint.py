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
  (two boolean [B, 1, L, L]), and the int64 token types the runner passes
  where the tokenizer makes them (8 bytes); attention that materialises its scores (eager, or a
  relative position bias: MPNet, T5) adds [B, heads, L, L] twice (scores and
  probabilities), 2 * heads * L * e per padded token.

- the packed runners of families.py (MPNet, T5 and its kin, ModernBERT)
  follow their own layers, step by step (_family_elements_per_token). They
  release each tensor once it is dead: the layer's input, the attention
  context and ModernBERT's Q/K/V and rotated Q and K go before the
  feed-forward (kept through it, they cost MPNet 2H, T5 the context and
  ModernBERT 6H more: 11H, 19H and 25H per token at H = 256, I = 1024, where
  the peak is 9H, 18H and 19H). MPNet: the attention block's output beside
  the activation's tensors, H + aI (a: ACTIVATION_TENSORS), or 7H in
  attention; T5 adds T5LayerNorm's float32 temporaries and, gated,
  act(wi_0), wi_1 and their product (2H + max(aF, 3F + H)), with Q/K/V of
  width heads x d_kv; ModernBERT: 2H beside its MLP, or 9H while the rotated
  Q and K are stacked with V, plus its rotary tables. Per batch, whatever its
  tokens (mask_bytes, in the fixed bytes): making one max_length sequence's
  relative position bias (int64 [L, L] buckets, then [1, heads, L, L]) or
  local window mask. The masks and biases the runner keeps between batches
  (families._MaskCache, at most families.MASK_CACHE_BYTES) are counted
  apart, as the weights. The padded runner on MPNet and T5 holds the bias
  [B, heads, L, L] through every layer beside the scores and probabilities
  (3 * heads * L * e per padded token); on ModernBERT 5H beside the MLP.

Per batch too, on the CPU in bfloat16 (and float16 where oneDNN runs it):
the buffer oneDNN's matmul takes per thread and call beside its output
(mm_scratch_bytes).

Measured against torch's own allocation record (benchmarks/python/memory.py,
--activations; tests/python/test_footprint.py): the packed figure is exact for
the BERT family and within 0.7-1 of the peak for the others (0.997-0.999 of
it at H = 256), and the padded one is exact or an upper bound. Weights are
counted apart: a parameter's bytes, plus nothing for the packed runner's fused
Q/K/V weight, whose parts the model's parameters become views of.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import gemm, shapes
from .errors import InvalidInputError

# Per packed token: int64 rows made per batch (token types, position ids and
# their offset copy for the RoBERTa family).
_INDEX_BYTES = 24

# Per batch: tensors of a few rows alive at the peak (sequence offsets, a
# pooled row, reductions' results).
SMALL_BYTES = 4096

# Families whose attention adds a relative position bias [B, heads, L, L].
_RELATIVE_BIAS = {"mpnet", "t5", "mt5", "umt5"}


# [T, I] tensors alive at once inside a feed-forward activation, its input
# included (measured with footprint.measured_peak_bytes on transformers'
# ACT2FN; tests/python/test_footprint.py checks the table): torch's fused
# functions make one tensor, the Python compositions (gelu_new: 0.5 * x,
# x ** 3 and 0.044715 * x ** 3 beside x) more. An activation not named here
# counts as the most of them.
ACTIVATION_TENSORS = {
    "linear": 1, "relu": 2, "gelu": 2, "gelu_pytorch_tanh": 2, "silu": 2, "swish": 2, "mish": 2, "tanh": 2,
    "sigmoid": 2, "relu6": 2, "leaky_relu": 2, "quick_gelu": 3, "gelu_10": 3, "relu2": 3, "gelu_new": 4,
    "gelu_python": 4, "gelu_accurate": 4, "laplace": 4, "gelu_fast": 5,
}
_UNKNOWN_ACTIVATION = max(ACTIVATION_TENSORS.values())

# The packed runners of families.py whose layers the formula follows step by step.
_PACKED_FAMILIES = {"mpnet": "mpnet", "t5": "t5", "mt5": "t5", "umt5": "t5", "modernbert": "modernbert"}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int  # the up-projection's width (twice the inner width for a gated feed-forward)
    heads: int
    layers: int
    relative_bias: bool
    # What the packed runners of families.py need besides (their defaults: a BERT-family layer).
    family: str = "bert"  # "bert" (runners.PackedRunner), "mpnet", "t5" or "modernbert"
    inner: int = 0  # attention width, heads x head size (T5's num_heads x d_kv; 0: hidden)
    feed_forward: int = 0  # the activation's width (T5's d_ff, ModernBERT's intermediate_size; 0: intermediate)
    gated: bool = False
    activation: int = 2  # ACTIVATION_TENSORS of the feed-forward's activation
    rope_types: int = 0  # ModernBERT: rotary tables kept per batch (one per layer type)
    window: int | None = None  # ModernBERT: half the local window where a layer is local, else None


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
    hidden, inter, heads, layers = (int(v or 0) for v in values)  # (each a positive int, checked above)
    gated = bool(getattr(config, "is_gated_act", False)) or str(getattr(config, "feed_forward_proj", "")).startswith(
        "gated") or mt == "modernbert"
    act = getattr(config, {"t5": "dense_act_fn", "mt5": "dense_act_fn", "umt5": "dense_act_fn",
                           "modernbert": "hidden_activation"}.get(mt, "hidden_act"), None)
    extra: dict[str, Any] = dict(family=_PACKED_FAMILIES.get(mt, "bert"), feed_forward=inter, gated=gated,
                                 activation=ACTIVATION_TENSORS.get(act, _UNKNOWN_ACTIVATION)
                                 if isinstance(act, str) else _UNKNOWN_ACTIVATION)
    if mt in ("t5", "mt5", "umt5"):
        d_kv = getattr(config, "d_kv", None)
        extra["inner"] = heads * d_kv if isinstance(d_kv, int) and d_kv > 0 else hidden
    if mt == "modernbert":
        types = list(getattr(config, "layer_types", None) or ())
        extra["rope_types"] = max(1, len(set(types)))
        if "sliding_attention" in types:
            extra["window"] = int(getattr(config, "local_attention", 0)) // 2
    if gated:
        inter *= 2  # gated feed-forward: the up-projection is twice as wide
    return Shape(hidden, inter, heads, layers, mt in _RELATIVE_BIAS, **extra)


def activation_bytes_per_token(shape: Shape, dtype: torch.dtype, execution: str, *, max_length: int,
                               scores: bool = False, fused: bool = False) -> int:
    """Peak activation bytes per token the scheduler counts: real tokens for
    the packed runner, padded tokens (B * L, L <= max_length) for the padded
    one. scores: the padded attention materialises its scores (eager).
    fused: the packed runner's layers run through the CPU kernels."""
    e = torch.empty((), dtype=dtype).element_size()
    H, I = shape.hidden, shape.intermediate
    if execution == "packed" and shape.family != "bert":
        return _family_elements_per_token(shape, e) * e + _INDEX_BYTES
    if execution == "packed":
        return max(2 * H + I if fused else H + 2 * I, 5 * H if fused else 7 * H) * e + _INDEX_BYTES
    if shape.family == "modernbert":
        # transformers' ModernBERT forward keeps the embeddings' output, the
        # layer's input, its attention output, the residual sum and the
        # normed input beside the MLP (5H), or holds Q/K/V, rotated Q and K and
        # their temporaries, SDPA's output and its copy in attention (at most
        # 13H); rotary cos and sin per layer type.
        F, a = shape.feed_forward or I // 2, shape.activation
        mlp = max((1 + a) * F, 4 * F, 3 * F + H)
        return (max(13 * H, 5 * H + mlp) + 2 * (H // shape.heads) * shape.rope_types) * e + 2 * max_length
    per = (3 * H + 2 * I) * e + 2 * max_length + 8  # + the boolean masks' rows, the token types' int64
    if shape.relative_bias:  # MPNet, T5: the bias [B, heads, L, L] lives through every layer
        per += 3 * shape.heads * max_length * e
    elif scores:
        per += 2 * shape.heads * max_length * e
    return per


def _family_elements_per_token(shape: Shape, e: int) -> int:
    """Elements of the model's dtype per packed token at the peak of a layer
    of families.py's MPNet, T5 and ModernBERT runners: the largest of the
    sets of [T, .] tensors alive at once, step by step, as those runners and
    transformers' modules hold them (module docstring). a: ACTIVATION_TENSORS.
    The runners release each tensor once it is dead: only the residual
    stream crosses from attention into the feed-forward."""
    H, F, a = shape.hidden, shape.feed_forward or shape.intermediate, shape.activation
    inner = shape.inner or H
    if shape.family == "mpnet":
        # attention: input, Q/K/V (and its three parts while they are
        # concatenated, a caller's model), the context, SDPA's output and its
        # re-laid-out copy; feed-forward: the attention block's output beside
        # the activation's tensors, then the activation's output, the
        # down-projection, the residual sum and the LayerNorm's result.
        return max(7 * H, H + max(a, 2) * F, 4 * H + F)
    if shape.family == "t5":
        # T5LayerNorm computes in float32: two float32 [T, H] besides its input.
        norm = 2 * H * max(1, 4 // e)
        # feed-forward (beside the residual stream and the normed input): the
        # activation's tensors, or (gated) act(wi_0), wi_1, their product and wo's result.
        ff = max(a * F, 3 * F + H if shape.gated else F + H)
        return max(2 * H + 6 * inner,  # Q/K/V: normed input, three products and their concatenation
                   H + 6 * inner,  # attention: as MPNet's
                   2 * H + norm,  # a T5LayerNorm: its input, temporaries and result
                   2 * H + ff)
    if shape.family == "modernbert":
        # Stacking the rotated Q and K with V: the residual stream, Q/K/V
        # [T, 3H], rotated Q and K and the stacked copy (9H); attention: the
        # stream, the stacked Q/K/V, the output, SDPA's output and its copy
        # (7H). MLP: the stream and the normed input (2H) beside Wi's [T, 2F]
        # output, which lives through it (its two halves are views), with the
        # activation's tensors, then act(x) * gate and Wo's result. Rotary
        # cos and sin [T, head size] per layer type.
        mlp = max((1 + a) * F, 4 * F, 3 * F + H)
        return max(9 * H, 2 * H + mlp) + 2 * (H // shape.heads) * shape.rope_types
    raise ValueError(f"no packed formula for family {shape.family!r}")


def mask_bytes(shape: Shape, dtype: torch.dtype, *, max_length: int) -> int:
    """Per batch, whatever its tokens: making and using the attention mask or
    relative position bias of one sequence of max_length tokens (L), which a
    batch may need afresh (families._MaskCache keeps them between batches,
    counted apart, at most families.MASK_CACHE_BYTES). MPNet and T5 build the
    bias from int64 [L, L] buckets, up to 53 bytes per L^2 at once (measured,
    tests/python/test_footprint.py), then the bias [1, heads, L, L] (MPNet:
    a contiguous copy beside it) while the buckets and the int64 relative
    positions they came from are still alive (16 bytes per L^2: counting
    the buckets alone, a bfloat16 MPNet's 1,024-token batch peaked 8 MiB
    past the formula); SDPA may hold a copy of it. ModernBERT's
    local window: two int64 [L, L] and the boolean mask, then SDPA's float
    copy of the mask."""
    e = torch.empty((), dtype=dtype).element_size()
    L = max_length
    if shape.relative_bias:
        return L * L * max(56, 16 + 2 * shape.heads * e)
    if shape.family == "modernbert" and shape.window is not None and L > shape.window + 1:
        return L * L * max(17, 1 + e)
    return 0


def per_batch(config: Any, dtype: torch.dtype, *, max_length: int) -> int:
    """mask_bytes for a transformers config (0 when its sizes are unknown)."""
    shape = shape_of(config)
    return 0 if shape is None else mask_bytes(shape, dtype, max_length=max_length)


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


# Per thread, per call: the buffer oneDNN's bfloat16 / float16 matmul takes
# from torch's allocator inside torch.mm (and F.linear) beside its output,
# whatever the rows past a few hundred, by the product's inner size K:
# 66,560 + 128 bytes per K rounded up to 32 (at most 512), 197,632 above
# K = 1,024, and 1,721,472 where K is a power of two from 4,096 on (oneDNN
# copies such an input). Measured with torch 2.13's oneDNN on an AMD EPYC
# with AVX512-BF16 (Zen 4): K from 16 to 16,384, N from 256 to 8,192, 1 and
# 2 threads (twice as much with two); none where oneDNN cannot run the dtype
# (bfloat16 capped to AVX2, float16 without AVX512-FP16), nor through the
# weights reordered once (gemm "onednn"). Unmeasured on AMX CPUs.
def mm_scratch_per_thread(k: int) -> int:
    if k >= 4096 and k & (k - 1) == 0:
        return 1_721_472
    if k > 1024:
        return 197_632
    return 66_560 + 128 * min(512, -(-k // 32) * 32)


def mm_scratch_bytes(model: torch.nn.Module, dtype: torch.dtype, threads: int) -> int:
    """Per batch: the scratch one reduced-precision CPU product through
    torch.mm allocates beside its output on `threads` threads, at the
    model's largest (its linear layers' in_features); counted in the
    budget's fixed bytes (a bfloat16 MiniLM batch of 256 tokens peaked 236 KB
    past the formula without it, 1.155x a 1.3 MiB budget)."""
    if dtype not in (torch.bfloat16, torch.float16) or gemm.onednn_cannot(dtype):
        return 0
    ks = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return max(1, threads) * max((mm_scratch_per_thread(k) for k in ks), default=0)


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
    # least shapes.MIN_ROWS (packed CPU float32, or bfloat16 whose products
    # run through gemm.py's pieces); True, at its token bucket (packed CPU
    # bfloat16/float16 otherwise: process.onednn_buckets). The ghost rows
    # count like real ones.
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
