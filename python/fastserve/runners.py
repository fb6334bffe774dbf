"""Runners turn one assembled batch into one output row per request."""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels
from .heads import EmbeddingHead

ACTIVATIONS = ("auto", "softmax", "sigmoid", "none")


def classification_activation(config, activation: str = "auto") -> str:
    """The function applied to a classifier's logits: `activation` unless
    "auto", else what transformers' text-classification pipeline applies:
    none for regression, sigmoid for multi-label or one-logit heads, softmax
    for single-label or several-logit heads (the pipeline's fallback to
    config.function_to_apply is never reached: every head has a label)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation != "auto":
        return activation
    problem = getattr(config, "problem_type", None)
    if problem == "regression":
        return "none"
    if problem == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """[B, labels] float32 scores from a classifier's logits."""
    logits = logits.float()
    if activation == "softmax":
        return torch.softmax(logits, dim=-1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    return logits


class PaddedRunner:
    """Calls the Hugging Face model on the padded layout: works for any encoder."""

    name = "padded"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        task: str,
        pooling: str,
        normalize: bool,
        device: torch.device,
        activation: str = "softmax",
        head: EmbeddingHead | None = None,
    ) -> None:
        self.model = model
        # Encoder-decoder models (T5) are served by their encoder alone.
        is_enc_dec = getattr(model.config, "is_encoder_decoder", False)
        self.encoder = model.get_encoder() if is_enc_dec and task == "embed" else model
        self.task = task
        self.pooling = pooling
        self.normalize = normalize
        self.device = device
        self.activation = activation
        self.head = head or EmbeddingHead((pooling,), post=["normalize"] if normalize else [], device=device)

    def run(self, batch, prompt_lengths: Optional[np.ndarray] = None, segments: Optional[np.ndarray] = None):
        """[B, dim] float32: pooled embeddings, or class scores for classify
        and rerank; for token-classify a list of [length, labels] logits.
        prompt_lengths: each row's prompt tokens, for a head that leaves them out.
        segments: [B] where each request's token type 1 starts (pairs)."""
        ids = torch.from_numpy(batch.input_ids).to(self.device, non_blocking=True)
        mask = torch.from_numpy(batch.attention_mask).to(self.device, non_blocking=True)
        extra = {}
        if segments is not None:
            types = (np.arange(batch.input_ids.shape[1])[None, :] >= segments[:, None]) & (batch.attention_mask != 0)
            extra["token_type_ids"] = torch.from_numpy(types.astype(np.int64)).to(self.device, non_blocking=True)
        out = self.encoder(input_ids=ids, attention_mask=mask, **extra)
        if self.task == "token-classify":
            logits = out.logits.float().cpu().numpy()
            return [logits[i, :n] for i, n in enumerate(batch.lengths.tolist())]
        if self.task in ("classify", "rerank"):
            rows = activate(out.logits, self.activation)
        else:
            rows = self.head.padded(out.last_hidden_state, mask, prompt_lengths)
        return rows.cpu().numpy()


# Architectures whose layers the packed runner drives directly. BERT-like
# models share BertLayer's structure; DistilBERT has its own block.
_BERT_LIKE = {"bert": 0, "roberta": 1, "xlm-roberta": 1, "camembert": 1}  # value: position offset kind
_DISTIL = {"distilbert"}


def packed_supported(model: torch.nn.Module) -> bool:
    """True when PackedRunner can run `model` exactly: a BERT-family encoder
    with absolute position embeddings and no cross-attention."""
    cfg = model.config
    if cfg.model_type not in _BERT_LIKE and cfg.model_type not in _DISTIL:
        return False
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return False
    return getattr(cfg, "position_embedding_type", "absolute") in (None, "absolute")


def _equal_length_runs(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(first token, sequences, length) of each run of consecutive sequences
    with the same length. The scheduler emits rows sorted by length, so a
    batch usually has one run per distinct length; any order stays exact."""
    runs = []
    n = len(lengths)
    i = tok = 0
    while i < n:
        j = i
        while j + 1 < n and lengths[j + 1] == lengths[i]:
            j += 1
        count, length = j - i + 1, int(lengths[i])
        runs.append((tok, count, length))
        tok += count * length
        i = j + 1
    return runs


def _packed_embeddings(emb: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, distil: bool,
                       types: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's embeddings of packed tokens: ids and per-sequence position
    ids [T] -> [T, H], with T free to exceed max_position_embeddings, in a form
    every supported transformers version (4.40 to 5.x) accepts. Unless given
    them, 4.x BERT/RoBERTa embeddings slice a max_position_embeddings-long
    buffer of zero token types to T; DistilBERT's take no position ids before
    5.0 and slice their own buffer, so its forward's steps (the same in 4.x and
    5.x) run here from its modules. types: [T] token types (pairs), else zeros."""
    if distil:
        h = emb.word_embeddings(ids) + emb.position_embeddings(pos)
        return emb.dropout(emb.LayerNorm(h))
    types = torch.zeros_like(ids) if types is None else types
    return emb(input_ids=ids[None], token_type_ids=types[None], position_ids=pos[None])[0]


class _PackedAttention:
    """Self-attention over packed tokens [T, H], exact per sequence: one SDPA
    call per run of equal-length sequences (no padding, no mask), or through
    `varlen` (length groups, a padded copy, flash-attn's varlen kernel)."""

    def __init__(self, q: torch.nn.Linear, k: torch.nn.Linear, v: torch.nn.Linear, heads: int) -> None:
        # One GEMM for Q, K and V instead of three (same weights, concatenated
        # once). The model's own Q, K and V parameters then become views of the
        # fused tensors, so the fusion keeps no second copy of the weights.
        self.weight = torch.cat([q.weight, k.weight, v.weight]).detach()
        self.bias = torch.cat([q.bias, k.bias, v.bias]).detach()
        self.heads = heads
        rows = q.weight.shape[0]
        for i, lin in enumerate((q, k, v)):
            lin.weight.data = self.weight[i * rows : (i + 1) * rows]
            lin.bias.data = self.bias[i * rows : (i + 1) * rows]

    def __call__(self, h: torch.Tensor, runs, varlen) -> torch.Tensor:
        T, H = h.shape
        nh, hd = self.heads, H // self.heads
        qkv = F.linear(h, self.weight, self.bias).view(T, 3, nh, hd)
        if varlen is not None:
            return varlen(qkv).reshape(T, H)
        out = torch.empty(T, nh, hd, dtype=h.dtype, device=h.device)
        for start, n, length in runs:
            g = qkv[start : start + n * length].view(n, length, 3, nh, hd).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(g[0], g[1], g[2])  # [n, nh, length, hd]
            out[start : start + n * length] = o.transpose(1, 2).reshape(n * length, nh, hd)
        return out.view(T, H)


def _groups_measured_faster(h: torch.Tensor) -> bool:  # h: any tensor of the compute dtype
    """Length groups (_LengthGroups) instead of one call per run: measured
    faster in float32 on the CPU (benchmarks/README.md, "CPU dtypes", AMD
    EPYC); in bfloat16 on an AMX Xeon masked calls per group of similar
    lengths measured slower than per-run calls, so half precision and
    autocast keep the runs."""
    return h.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type)


# A group of sequences padded to its longest may cost at most this many times
# the attention FLOPs of its sequences alone (sum of L_max^2 over sum of l^2).
GROUP_SLACK = 1.1
# A gathered group holds its padded Q/K/V copy (3H), SDPA's output (H) and its
# real rows (H) per padded token beside the layer's input, Q/K/V and context
# (5H per batch token): at most 0.4 of the batch's tokens keeps attention
# within the 7H per token that python/fastserve/footprint.py counts.
GROUP_TOKENS = 0.4


class _LengthGroups:
    """Exact attention per sequence for one packed batch ("runs" on the CPU):
    the sequences sorted by length across the batch and grouped while padding
    each group to its longest adds at most GROUP_SLACK x its attention FLOPs
    (and its padded tokens stay within GROUP_TOKENS of the batch's), one SDPA
    call per group, with a key mask only where its lengths differ.
    The scheduler does not sort a batch by length, so its runs of equal
    lengths are mostly single sequences: one call per sequence per layer
    was an eighth of a float32 batch's time on the CPU (docs/design.md,
    "Precision"). A group of equal lengths that lie next to each other in
    the batch is a view of its rows; any other is gathered into its padded
    slots (pad slots read a real row, masked as keys, and are dropped as
    queries) and its real rows scattered back. The indices are built once
    per batch and serve every layer."""

    def __init__(self, lengths: np.ndarray, device: torch.device, slack: float = GROUP_SLACK) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        order = np.argsort(lengths, kind="stable")
        self.views: list[tuple[int, int, int]] = []  # (first token, sequences, length)
        # (gather index, sequences, length, key mask, real rows, their slots)
        self.gathered: list[tuple[torch.Tensor, int, int, Optional[torch.Tensor], torch.Tensor,
                                  Optional[torch.Tensor]]] = []
        cap = GROUP_TOKENS * int(lengths.sum())
        i, n = 0, len(order)
        while i < n:
            j, cost = i + 1, int(lengths[order[i]]) ** 2
            while j < n:
                longest = int(lengths[order[j]])
                if (j + 1 - i) * longest * longest > slack * (cost + longest * longest) or \
                        (j + 1 - i) * longest > cap:
                    break
                cost += longest * longest
                j += 1
            seqs = order[i:j]
            i = j
            ls = lengths[seqs]
            m, longest = len(seqs), int(ls[-1])
            if longest == 0:
                continue
            equal = int(ls[0]) == longest
            if equal and (m == 1 or bool(np.all(np.diff(seqs) == 1))):
                self.views.append((int(starts[seqs[0]]), m, longest))
                continue
            slot = np.arange(longest)[None, :]
            real = slot < ls[:, None]  # [m, longest]
            first = starts[seqs][:, None]
            gather = np.where(real, first + slot, first).reshape(-1)
            rows = (first + slot)[real]
            mask = slots = None
            if not equal:
                mask = torch.from_numpy(real).to(device)[:, None, None, :]
                slots = torch.from_numpy((np.arange(m)[:, None] * longest + slot)[real]).to(device)
            self.gathered.append((torch.from_numpy(gather).to(device), m, longest, mask,
                                  torch.from_numpy(rows).to(device), slots))

    def __call__(self, qkv: torch.Tensor) -> torch.Tensor:
        T, _, nh, hd = qkv.shape
        out = torch.empty(T, nh, hd, dtype=qkv.dtype, device=qkv.device)
        for start, m, length in self.views:
            g = qkv[start : start + m * length].view(m, length, 3, nh, hd).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(g[0], g[1], g[2])  # [m, nh, length, hd]
            out[start : start + m * length] = o.transpose(1, 2).reshape(m * length, nh, hd)
        for gather, m, length, mask, rows, slots in self.gathered:
            if gather.device != qkv.device:  # a pipeline stage on another device
                gather, rows = gather.to(qkv.device), rows.to(qkv.device)
                mask = None if mask is None else mask.to(qkv.device)
                slots = None if slots is None else slots.to(qkv.device)
            g = qkv.index_select(0, gather).view(m, length, 3, nh, hd).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(g[0], g[1], g[2], attn_mask=mask)
            o = o.transpose(1, 2).reshape(m * length, nh, hd)
            out.index_copy_(0, rows, o if slots is None else o.index_select(0, slots))
        return out


class BatchAbandoned(Exception):
    """Raised by PackedRunner when a pause dropped every row of its batch."""


class PackedRunner:
    """Runs BERT-family models on packed tokens [T, H] with the model's own
    modules: embeddings with per-sequence position ids, Q/K/V and feed-forward
    on all real tokens at once, attention per run of equal-length sequences,
    pooling by segment. No compute is spent on padding."""

    name = "packed"
    # Pipeline stages (python/fastserve/pipeline.py): called as hook(i, h)
    # before layer i and hook(len(blocks), h) after the last; returns h.
    stage_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None
    # Pausing (Engine(preempt=...)): called as hook(i, layers) after layer i
    # of `layers` (i < layers), where the running batch may be paused; it may
    # run another batch through this runner before returning, and returns
    # None or a bool mask over the batch's live rows: False rows are dropped
    # from the layers left (python/fastserve/engine.py, Engine._pausing).
    pause_hook: Optional[Callable[[int, int], Optional[np.ndarray]]] = None
    pausable = True

    def __init__(self, model: torch.nn.Module, *, task: str, pooling: str, normalize: bool, device: torch.device,
                 activation: str = "softmax", head: EmbeddingHead | None = None) -> None:
        if not packed_supported(model):
            raise ValueError(f"packed execution does not support model_type={model.config.model_type!r}")
        cfg = model.config
        self.model = model
        self.task = task
        self.pooling = pooling
        self.normalize = normalize
        self.device = device
        self.activation = activation
        self.head = head or EmbeddingHead((pooling,), post=["normalize"] if normalize else [], device=device)
        self.kernels = kernels.for_device(device)
        reason = kernels.fallback_reason(device)
        if reason:
            warnings.warn(reason, RuntimeWarning, stacklevel=3)  # points at Engine(...)
        self.base = model.base_model
        self.distil = cfg.model_type in _DISTIL
        # RoBERTa-family position ids start after padding_idx.
        self.position_offset = cfg.pad_token_id + 1 if _BERT_LIKE.get(cfg.model_type) == 1 else 0
        if self.distil:
            self.blocks = list(self.base.transformer.layer)
            self.attn = [_PackedAttention(b.attention.q_lin, b.attention.k_lin, b.attention.v_lin, cfg.n_heads)
                         for b in self.blocks]
        else:
            self.blocks = list(self.base.encoder.layer)
            self.attn = [_PackedAttention(b.attention.self.query, b.attention.self.key, b.attention.self.value,
                                          cfg.num_attention_heads) for b in self.blocks]
        self.attention = _attention_method(device, getattr(model, "dtype", torch.float32))
        self._flash = _flash_varlen() if self.attention == "flash" else None
        # Batches by the attention that actually ran: with one length in the
        # batch, "pad" runs as "runs" (one dense call needs no mask).
        self.attention_batches = dict.fromkeys(ATTENTION_METHODS, 0)

    def hidden(self, batch, segments: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                          Optional[np.ndarray]]:
        """Last hidden states [T, H] and cu_seqlens [B + 1] (int32) on the
        device, and which of the batch's rows they hold (None: all; rows are
        dropped only at a pause). segments: [B] where each request's token
        type 1 starts."""
        dev = self.device
        ids = torch.from_numpy(batch.packed_input_ids).to(dev, non_blocking=True)
        pos = torch.from_numpy(batch.position_ids).to(dev, non_blocking=True)
        cu = torch.from_numpy(batch.cu_seqlens).to(dev, non_blocking=True)
        if self.position_offset:
            pos = pos + self.position_offset
        types = None
        if segments is not None and not self.distil:  # DistilBERT has no token types
            packed = np.asarray(batch.position_ids) >= np.repeat(segments, batch.lengths)
            types = torch.from_numpy(packed.astype(np.int64)).to(dev, non_blocking=True)
        h = _packed_embeddings(self.base.embeddings, ids, pos, self.distil, types)
        lengths, positions = np.asarray(batch.lengths), np.asarray(batch.position_ids)
        runs, varlen = self._attention_plan(lengths, positions, cu, int(batch.max_seqlen), count=True)
        rows: Optional[np.ndarray] = None
        hook = self.stage_hook
        for i, (block, attn) in enumerate(zip(self.blocks, self.attn)):
            if hook is not None:
                h = hook(i, h)
            ctx = attn(h, runs, varlen)
            if self.distil:
                a = block.sa_layer_norm(block.attention.out_lin(ctx) + h)
            else:
                a = block.attention.output(ctx, h)
            # The layer's input and the attention context are dead here;
            # dropping them before the feed-forward takes (2H) x 4 bytes per
            # token off the batch's peak in fp32 (python/fastserve/footprint.py).
            del ctx, h
            if self.distil:
                h = block.output_layer_norm(block.ffn(a) + a)
            else:
                h = block.output(block.intermediate(a), a)
            if self.pause_hook is not None and i + 1 < len(self.blocks):
                keep = self.pause_hook(i + 1, len(self.blocks))
                if keep is not None:
                    # Rows past the mask (shapes.py's ghost sequences) stay.
                    keep = np.concatenate([np.asarray(keep, bool), np.ones(len(lengths) - len(keep), bool)])
                    if not keep.any():
                        raise BatchAbandoned
                    tokens = np.repeat(keep, lengths)
                    h = h[torch.from_numpy(tokens).to(dev)]
                    lengths, positions = lengths[keep], positions[tokens]
                    rows = (np.arange(len(keep)) if rows is None else rows)[keep]
                    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)).to(dev)
                    runs, varlen = self._attention_plan(lengths, positions, cu, int(lengths.max()))
        if hook is not None:
            h = hook(len(self.blocks), h)
        return h, cu, rows

    def _attention_plan(self, lengths: np.ndarray, positions: np.ndarray, cu: torch.Tensor, maxlen: int,
                        count: bool = False) -> tuple[list, Optional[Callable[[torch.Tensor], torch.Tensor]]]:
        """The runs of equal lengths, and the attention over all of them at
        once where one is used (varlen), for sequences of these lengths."""
        runs = _equal_length_runs(lengths)
        varlen: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        if self.attention == "flash":
            varlen = lambda qkv: self._flash(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, maxlen, maxlen)  # noqa: E731
        elif self.attention == "pad" and len(runs) > 1:
            varlen = _PaddedAttention(lengths, positions, self.device)
        if count:
            self.attention_batches[self.attention if varlen is not None else "runs"] += 1
        if varlen is None and len(runs) > 1 and _groups_measured_faster(self.attn[0].weight):
            varlen = _LengthGroups(lengths, self.device)  # still "runs": exact per sequence
        return runs, varlen

    def run(self, batch, prompt_lengths: Optional[np.ndarray] = None, segments: Optional[np.ndarray] = None):
        """As PaddedRunner.run, on packed tokens: for token-classify each
        token's row goes back to its request (no pooling). Rows dropped at a
        pause (Engine(preempt=...)) are left out."""
        h, cu, kept = self.hidden(batch, segments)
        if kept is not None and prompt_lengths is not None:
            prompt_lengths = prompt_lengths[kept]
        if self.task == "token-classify":
            m = self.model
            logits = m.classifier(m.dropout(h)).float().cpu().numpy()
            return np.split(logits, cu.cpu().numpy()[1:-1])
        if self.task in ("classify", "rerank"):
            cls = h[cu[:-1].long()]
            rows = activate(self._classify(cls), self.activation)
        else:
            rows = self.head.packed(h, cu, self.kernels, prompt_lengths)
        return rows.cpu().numpy()

    def _classify(self, cls: torch.Tensor) -> torch.Tensor:
        """The model's own classification head on the first token of each sequence."""
        m = self.model
        if self.distil:
            x = torch.relu(m.pre_classifier(cls))
            return m.classifier(m.dropout(x))
        if self.model.config.model_type == "bert":
            return m.classifier(m.dropout(self.base.pooler(cls[:, None, :])))
        return m.classifier(cls[:, None, :])  # RoBERTa head reads features[:, 0]


ATTENTION_METHODS = ("runs", "pad", "flash")


def _attention_method(device: torch.device, dtype: torch.dtype) -> str:
    """How packed attention runs. CPU: "runs", exact attention per sequence
    with no mask over real tokens: in float32 one SDPA call per group of
    similar lengths across the batch (_LengthGroups: padded within the group,
    a key mask where its lengths differ), in half precision and autocast one
    call per run of equal lengths. CUDA: flash-attn's varlen kernel
    when installed and the model is float16 or bfloat16 (flash-attn has no
    float32 kernels), else "pad": attention alone on a padded copy with a key
    mask, one SDPA call per layer, since a per-run loop launches kernels per
    distinct length per layer (benchmarks/README.md, "GPU").
    FASTSERVE_PACKED_ATTENTION overrides the choice (benchmarks, tests)."""
    flash_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None
    forced = os.environ.get("FASTSERVE_PACKED_ATTENTION", "")
    if forced:
        if forced not in ATTENTION_METHODS:
            raise ValueError(f"FASTSERVE_PACKED_ATTENTION must be one of {ATTENTION_METHODS}, got {forced!r}")
        if forced == "flash" and not flash_ok:
            raise ValueError("FASTSERVE_PACKED_ATTENTION=flash needs the flash-attn package, a CUDA device "
                             "and a float16 or bfloat16 model")
        return forced
    if device.type != "cuda":
        return "runs"
    return "flash" if flash_ok else "pad"


class _PaddedAttention:
    """Exact attention per sequence for one packed batch through a padded
    copy: qkv rows are scattered into [B * L] slots (zeros elsewhere), SDPA
    runs once with a key-padding mask, and the real rows are gathered back.
    The index and mask are built once per batch and serve every layer."""

    def __init__(self, lengths: np.ndarray, positions: np.ndarray, device: torch.device) -> None:
        self.B, self.L = len(lengths), int(lengths.max())
        rows = np.repeat(np.arange(self.B, dtype=np.int64) * self.L, lengths) + positions
        self.index = torch.from_numpy(rows).to(device)
        keep = np.arange(self.L)[None, :] < lengths[:, None]  # [B, L]: real tokens
        self.mask = torch.from_numpy(keep).to(device)[:, None, None, :]

    def __call__(self, qkv: torch.Tensor) -> torch.Tensor:
        _, three, nh, hd = qkv.shape
        if self.index.device != qkv.device:  # a pipeline stage on another device
            self.index, self.mask = self.index.to(qkv.device), self.mask.to(qkv.device)
        padded = qkv.new_zeros(self.B * self.L, three, nh, hd)
        padded.index_copy_(0, self.index, qkv)
        q, k, v = padded.view(self.B, self.L, three, nh, hd).permute(2, 0, 3, 1, 4)  # each [B, nh, L, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return out.transpose(1, 2).reshape(self.B * self.L, nh, hd).index_select(0, self.index)


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func
