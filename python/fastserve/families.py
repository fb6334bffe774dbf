"""The runner interface and one adapter per model family.

A runner turns one assembled batch into one output row per request
(`run(batch, prompt_lengths=None, segments=None) -> [B, dim] float32`,
or per-token rows for token-classify). What differs between
families is declared once, here, by an adapter: which model types it takes,
what it supports (layout, tasks, poolings) and, when a model of its type
still cannot run packed, why. The engine asks `select()` for the path: no
model type is compared anywhere else.

Packed families (padding-free, one row per real token):
- BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT: runners.PackedRunner;
- MPNet (relative position bias, shared by every layer),
- T5 encoders (relative bias from the first block, RMSNorm, unscaled
  attention, no token types),
- ModernBERT (rotary positions, sliding-window local layers between global
  ones; transformers >= 5's layout of the model),
  here. Every other encoder runs padded (the Hugging Face forward), and a
  model of a packed family that uses something its adapter does not
  reproduce (cross-attention, other position embeddings) runs padded too.

Attention in the packed families below runs as runners.PackedRunner's does:
on the CPU one SDPA call per run of equal-length sequences (the relative
bias or window mask of a run is one [L, L] tensor shared by its sequences);
on CUDA one call over a padded copy with a key mask."""

from __future__ import annotations

import abc
import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels
from .heads import EmbeddingHead
from .runners import (FusedQKV, PackedRunner, PaddedRunner, Stamps, Uncalled, _attention_method, _equal_length_runs,
                      _PaddedAttention, id_positions, packed_supported)
from .st_spec import POOLING_MODES

log = logging.getLogger("fastserve")


@dataclass(frozen=True)
class Capabilities:
    """What a runner supports: its layout, the tasks whose heads it runs, and
    the poolings its embed head computes."""

    layout: str  # "packed" | "padded"
    tasks: frozenset[str]
    poolings: frozenset[str] = frozenset(POOLING_MODES)


class Runner(Protocol):
    """What the engine calls: one batch in, one row per request out. What a
    runner supports is declared by its family's adapter (Family.capabilities)."""

    name: str  # the layout: "packed" or "padded"

    def run(self, batch: Any, prompt_lengths: Optional[np.ndarray] = None,
            segments: Optional[np.ndarray] = None) -> Any: ...


EMBED = frozenset({"embed"})
ALL_TASKS = frozenset({"embed", "classify", "rerank", "token-classify"})


@dataclass(frozen=True)
class Family:
    """An adapter: the model types one packed runner takes, what it supports,
    and why a model of those types cannot run packed (None when it can)."""

    name: str
    model_types: frozenset[str]
    runner: Callable[..., Runner]
    capabilities: Capabilities
    unsupported: Callable[[Any, Any], Optional[str]]


@dataclass(frozen=True)
class Choice:
    runner: Callable[..., Runner]
    family: str
    capabilities: Capabilities
    reason: Optional[str]  # why padded, when it is


PADDED = Capabilities("padded", ALL_TASKS)


def _bert_unsupported(model: Any, cfg: Any) -> Optional[str]:
    return None if packed_supported(model) else (
        "decoder, cross-attention or non-absolute position embeddings "
        f"(position_embedding_type={getattr(cfg, 'position_embedding_type', None)!r})")


def _no_extras(model: Any, cfg: Any) -> Optional[str]:
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "a decoder or cross-attention"
    return None


def _modernbert_unsupported(model: Any, cfg: Any) -> Optional[str]:
    base = getattr(model, "model", model)
    if not hasattr(base, "rotary_emb") or getattr(cfg, "layer_types", None) is None:
        return "this transformers version's ModernBERT layout (packed needs transformers >= 5)"
    if any(t not in ("full_attention", "sliding_attention") for t in cfg.layer_types):
        return f"layer types {sorted(set(cfg.layer_types))}"
    return None


# Bytes of masks and biases a packed runner keeps between batches. A T5
# bias is [1, heads, L, L] float: 3 MiB at L = 128 and 12 heads, 12 MiB at
# 256, so keeping one per length seen (per layer for UMT5) would grow to
# gigabytes; recomputing one is a bucket lookup, small beside its attention.
MASK_CACHE_BYTES = 64 * 2**20


class _MaskCache:
    """Masks or biases by (kind, length), the least recently used dropped
    past `limit` bytes (one larger than that is made and not kept). Locked:
    a runner's replicas share it, one worker thread each. What the biases
    are made from (watch()) changed: refresh() drops them all."""

    _MISSING = object()

    def __init__(self, limit: int = MASK_CACHE_BYTES) -> None:
        self.limit = limit
        self.bytes = 0
        self._kept: collections.OrderedDict[tuple[Any, int], Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._sources: Optional[Stamps] = None
        self._generation = 0

    def __len__(self) -> int:
        return len(self._kept)

    def watch(self, places: list[tuple[torch.nn.Module, str]]) -> None:
        """The model's tensors the biases are computed from."""
        self._sources = Stamps(places) if places else None

    def refresh(self) -> None:
        """Before a batch: drop every bias where a source changed."""
        if self._sources is None or not self._sources.changed():
            return
        with self._lock:
            self._kept.clear()
            self.bytes = 0
            self._generation += 1  # a bias made from the old tensors is not kept
            self._sources.take()

    def get(self, key: tuple[Any, int], make: Callable[[], Any]) -> Any:
        with self._lock:
            m = self._kept.get(key, self._MISSING)
            if m is not self._MISSING:
                self._kept.move_to_end(key)
                return m
            generation = self._generation
        m = make()
        size = m.numel() * m.element_size() if isinstance(m, torch.Tensor) else 0
        with self._lock:
            if key not in self._kept and size <= self.limit and generation == self._generation:
                self._kept[key] = m
                self.bytes += size
                while self.bytes > self.limit:
                    _, old = self._kept.popitem(last=False)
                    self.bytes -= old.numel() * old.element_size() if isinstance(old, torch.Tensor) else 0
        return m


class _BiasedPackedRunner(abc.ABC):
    """Shared by the packed families below: tokens in, the family's
    embeddings and layers over packed tokens [T, H], then the embedding head.
    A subclass gives embed(ids, pos), layers() and, per layer, the attention
    mask or bias of a sequence of length L (mask(layer, L): None, a bool
    [L, L] or a float [1, nh, L, L])."""

    name = "packed"
    # The id that transformers' embeddings count positions around (id_positions), or None.
    POSITION_PAD: Optional[int] = None

    def __init__(self, model: torch.nn.Module, *, task: str, device: torch.device, head: EmbeddingHead,
                 own_weights: bool = False, **_: Any) -> None:
        if task != "embed":
            raise ValueError(f"packed {type(self).__name__} runs embed only, not {task!r}")
        self.model = model
        self.task = task
        self.device = device
        self.head = head
        self.kernels = kernels.for_device(device)
        dtype = next(model.parameters()).dtype
        method = _attention_method(device, dtype)
        # Flash varlen kernels take no additive bias: the padded copy instead.
        self.attention = "pad" if method in ("flash", "varlen") else method
        self.attention_batches = {"runs": 0, "pad": 0, "flash": 0}
        self._masks = _MaskCache()
        # own_weights: the model is the engine's own, not the caller's (FusedQKV).
        self.own_weights = own_weights
        # What the family's forward never calls (a subclass sets it): runners.Uncalled.
        self.uncalled = Uncalled(model, (), ())
        # Q/K/V fused per layer (a subclass sets them): runners.FusedQKV.
        self.qkv: list[FusedQKV] = []

    def run(self, batch: Any, prompt_lengths: Optional[np.ndarray] = None,
            segments: Optional[np.ndarray] = None) -> np.ndarray:  # embed only: never pairs
        h, cu = self.hidden(batch)
        return self.head.packed(h, cu, self.kernels, prompt_lengths).cpu().numpy()

    def hidden(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        ids = torch.from_numpy(batch.packed_input_ids).to(dev, non_blocking=True)
        positions = batch.position_ids if self.POSITION_PAD is None else id_positions(batch, self.POSITION_PAD)
        pos = torch.from_numpy(positions).to(dev, non_blocking=True)
        cu = torch.from_numpy(batch.cu_seqlens).to(dev, non_blocking=True)
        lengths = np.asarray(batch.lengths)
        runs = _equal_length_runs(lengths)
        pad = None
        if self.attention == "pad" and len(runs) > 1:
            pad = _PaddedAttention(lengths, cu, self.kernels)
        self.attention_batches["pad" if pad is not None else "runs"] += 1
        self.uncalled.check_all()
        # Weights changed since the last batch: copies made anew (Stamps).
        for qkv in self.qkv:
            qkv.refresh()
        self._masks.refresh()
        h = self.forward(ids, pos, lambda layer, qkv: self._attend(layer, qkv, runs, pad))
        return h, cu

    def _mask(self, layer: int, length: int) -> Any:
        return self._masks.get((self.mask_kind(layer), length), lambda: self.mask(layer, length))

    def _attend(self, layer: int, qkv: torch.Tensor, runs: list, pad: Optional[_PaddedAttention]) -> torch.Tensor:
        """Attention of qkv [T, 3, nh, hd] within each sequence: [T, nh * hd]."""
        T, _, nh, hd = qkv.shape
        if pad is not None:
            return pad(qkv, self._mask(layer, pad.L), self.scale).reshape(T, nh * hd)
        out = torch.empty(T, nh, hd, dtype=qkv.dtype, device=qkv.device)
        for start, n, length in runs:
            g = qkv[start: start + n * length].view(n, length, 3, nh, hd).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(g[0], g[1], g[2], attn_mask=self._mask(layer, length),
                                               scale=self.scale)
            out[start: start + n * length] = o.transpose(1, 2).reshape(n * length, nh, hd)
        return out.view(T, nh * hd)

    # What a family defines.
    scale: Optional[float] = None  # SDPA's default, 1/sqrt(head_dim), when None

    def mask_kind(self, layer: int) -> Any:
        return 0  # every layer shares one mask per length (or: the layer whose mask it is)

    @abc.abstractmethod
    def mask(self, layer: int, length: int) -> Any:
        """None, a bool [L, L] or a float [1, nh, L, L] for a sequence of length L at this layer."""

    @abc.abstractmethod
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, attend: Callable) -> torch.Tensor:
        """The family's embeddings and layers over packed tokens: [T, H]."""


class MPNetPackedRunner(_BiasedPackedRunner):
    """MPNet: BERT's layer with the encoder's relative position bias added to
    every layer's scores; positions start at padding_idx + 1 (= 2)."""

    POSITION_OFFSET = 2  # MPNetEmbeddings.padding_idx + 1, fixed whatever pad_token_id is
    POSITION_PAD = 1  # MPNetEmbeddings.padding_idx: an id 1 in a text moves the positions after it

    def __init__(self, model: torch.nn.Module, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.base = model.base_model
        self.layers = list(self.base.encoder.layer)
        self.heads = model.config.num_attention_heads
        self.qkv = [FusedQKV(b.attention.attn.q, b.attention.attn.k, b.attention.attn.v, own=self.own_weights)
                    for b in self.layers]
        self.uncalled = Uncalled(model, (model, self.base, self.base.embeddings, self.base.encoder),
                                 [(b, b.attention, b.attention.attn) for b in self.layers])
        self._masks.watch([(self.base.encoder.relative_attention_bias, "weight")])

    def mask(self, layer: int, length: int) -> torch.Tensor:
        enc = self.base.encoder
        probe = torch.empty(1, length, 1, device=self.device)
        return enc.compute_position_bias(probe).to(next(self.model.parameters()).dtype)  # [1, nh, L, L]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, attend: Callable) -> torch.Tensor:
        emb = self.base.embeddings
        h = emb.dropout(emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(pos + self.POSITION_OFFSET)))
        T, H = h.shape
        for i, (block, qkv) in enumerate(zip(self.layers, self.qkv)):
            ctx = attend(i, qkv(h).view(T, 3, self.heads, H // self.heads))
            att = block.attention
            h = att.LayerNorm(att.dropout(att.attn.o(ctx)) + h)
            del ctx  # dead: the feed-forward needs only the attention block's output (the layer's input went with h)
            h = block.output(block.intermediate(h), h)
        return h


class T5PackedRunner(_BiasedPackedRunner):
    """T5's encoder: pre-norm RMSNorm blocks, attention without scaling and
    with a relative position bias, no token types. T5 and mT5 compute the
    bias in the first block and use it in every layer; UMT5 gives every
    layer a bias of its own."""

    scale = 1.0

    def __init__(self, model: torch.nn.Module, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.stack = model.get_encoder() if hasattr(model, "get_encoder") else model.encoder
        self.blocks = list(self.stack.block)
        cfg = model.config
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.qkv = [FusedQKV(b.layer[0].SelfAttention.q, b.layer[0].SelfAttention.k, b.layer[0].SelfAttention.v,
                             own=self.own_weights) for b in self.blocks]
        self.uncalled = Uncalled(model, (model, self.stack),
                                 [(b, b.layer[0], b.layer[0].SelfAttention) for b in self.blocks])
        # The block whose bias each layer uses: its own where it has one.
        self.bias_of = [i if getattr(b.layer[0].SelfAttention, "has_relative_attention_bias", False) else 0
                        for i, b in enumerate(self.blocks)]
        self._masks.watch([(self.blocks[i].layer[0].SelfAttention.relative_attention_bias, "weight")
                           for i in sorted(set(self.bias_of))])

    def mask_kind(self, layer: int) -> Any:
        return self.bias_of[layer]

    def mask(self, layer: int, length: int) -> torch.Tensor:
        attention = self.blocks[self.bias_of[layer]].layer[0].SelfAttention
        return attention.compute_bias(length, length)  # [1, nh, L, L]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, attend: Callable) -> torch.Tensor:
        h = self.stack.dropout(self.stack.embed_tokens(ids))
        T = h.shape[0]
        for i, (block, qkv) in enumerate(zip(self.blocks, self.qkv)):
            sa = block.layer[0]
            ctx = attend(i, qkv(sa.layer_norm(h)).view(T, 3, self.heads, self.d_kv))
            h = _clamp_fp16(h + sa.dropout(sa.SelfAttention.o(ctx)))
            del ctx  # dead: not kept through the feed-forward
            h = _clamp_fp16(block.layer[-1](h))
        return self.stack.dropout(self.stack.final_layer_norm(h))


def _clamp_fp16(h: torch.Tensor) -> torch.Tensor:
    """T5Block's clamp of float16 overflow (the same bound)."""
    if h.dtype != torch.float16:
        return h
    big = torch.finfo(h.dtype).max
    bound = torch.where(torch.isinf(h).any(), big - 1000, big)
    return torch.clamp(h, min=-bound, max=bound)


class ModernBertPackedRunner(_BiasedPackedRunner):
    """ModernBERT: rotary positions (a theta per layer type), global layers
    and sliding-window layers (|i - j| <= local_attention / 2 within each
    sequence), pre-norm blocks with a GLU feed-forward."""

    def __init__(self, model: torch.nn.Module, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.base = getattr(model, "model", model)
        cfg = model.config
        self.layers = list(self.base.layers)
        self.types = list(cfg.layer_types)
        self.window = cfg.local_attention // 2
        self.heads = cfg.num_attention_heads
        self.uncalled = Uncalled(model, (model, self.base), [(b, b.attn) for b in self.layers])

    def mask_kind(self, layer: int) -> Any:
        return self.types[layer]

    def mask(self, layer: int, length: int) -> Optional[torch.Tensor]:
        if self.types[layer] != "sliding_attention" or length <= self.window + 1:
            return None  # the window covers the whole sequence
        i = torch.arange(length, device=self.device)
        return ((i[:, None] - i[None, :]).abs() <= self.window)[None, None]  # [1, 1, L, L]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, attend: Callable) -> torch.Tensor:
        h = self.base.embeddings(input_ids=ids[None])[0]
        T, H = h.shape
        hd = H // self.heads
        rope = {t: self.base.rotary_emb(h[None], pos[None], t) for t in set(self.types)}
        for i, layer in enumerate(self.layers):
            cos, sin = (x[0][:, None, :] for x in rope[self.types[i]])  # [T, 1, hd]
            qkv = layer.attn.Wqkv(layer.attn_norm(h)).view(T, 3, self.heads, hd)
            q = qkv[:, 0] * cos + _rotate_half(qkv[:, 0]) * sin
            k = qkv[:, 1] * cos + _rotate_half(qkv[:, 1]) * sin
            qkv = torch.stack([q, k, qkv[:, 2]], dim=1)  # (the unrotated Q/K/V dies here)
            del q, k
            ctx = attend(i, qkv)
            del qkv  # each dead once used: none is kept through the MLP or into the next layer
            h = h + layer.attn.out_drop(layer.attn.Wo(ctx))
            del ctx
            h = h + layer.mlp(layer.mlp_norm(h))
        return self.base.final_norm(h)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


FAMILIES = (
    # The runner is the class itself: called from Engine(...) directly, so a
    # warning it raises at construction points at the caller's line.
    Family("bert", frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert"}), PackedRunner,
           Capabilities("packed", ALL_TASKS), _bert_unsupported),
    Family("mpnet", frozenset({"mpnet"}), MPNetPackedRunner, Capabilities("packed", EMBED), _no_extras),
    Family("t5", frozenset({"t5", "mt5", "umt5"}), T5PackedRunner, Capabilities("packed", EMBED), _no_extras),
    Family("modernbert", frozenset({"modernbert"}), ModernBertPackedRunner, Capabilities("packed", EMBED),
           _modernbert_unsupported),
)


_logged: set[tuple[str, str]] = set()


def select(model: torch.nn.Module, task: str, execution: str) -> Choice:
    """The runner for `model` and `task`: packed where its family's adapter
    declares the support and execution allows, else padded with the reason.
    execution="packed" without packed support raises ValueError; "auto"
    logs (once per model type and reason) why it picked padded."""
    cfg = model.config
    family = next((f for f in FAMILIES if cfg.model_type in f.model_types), None)
    if family is None:
        reason: Optional[str] = f"no packed runner for model_type={cfg.model_type!r}"
    elif task not in family.capabilities.tasks:
        reason = f"the packed {family.name} runner has no {task!r} head"
    else:
        reason = family.unsupported(model, cfg)
        if reason is not None:
            reason = f"{cfg.model_type}: {reason}"
    if execution == "padded":
        return Choice(PaddedRunner, family.name if family else "other", PADDED, "execution='padded'")
    if reason is None and family is not None:
        return Choice(family.runner, family.name, family.capabilities, None)
    if execution == "packed":
        raise ValueError(f"execution='packed' is not available: {reason} (use 'auto' or 'padded')")
    key = (cfg.model_type, str(reason))
    if key not in _logged:
        _logged.add(key)
        log.info("fastserve: execution='auto' runs %s padded: %s", cfg.model_type, reason)
    return Choice(PaddedRunner, family.name if family else "other", PADDED, reason)
