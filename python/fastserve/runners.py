"""Runners turn one assembled batch into one output row per request."""

from __future__ import annotations

import inspect
import logging
import os
import threading
import types
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from . import gemm, kernels
from .gemm import Gemm
from .graphs import CudaGraphs
from .heads import EmbeddingHead

log = logging.getLogger("fastserve")

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
        token_types: bool = False,
        **_: Any,
    ) -> None:
        self.model = model
        # Encoder-decoder models (T5) are served by their encoder alone.
        is_enc_dec = getattr(model.config, "is_encoder_decoder", False)
        self.encoder = model.get_encoder() if is_enc_dec and task == "embed" else model
        # token_types: the tokenizer makes them, so sentence-transformers
        # passes them (zeros for one text) to a forward that takes them. BERT
        # counts them left out as zeros; XLM and FlauBERT add the embedding
        # of the ids given, nothing when left out (0.55 apart on a tiny XLM).
        self.token_types = token_types and "token_type_ids" in inspect.signature(self.encoder.forward).parameters
        self.task = task
        self.pooling = pooling
        self.normalize = normalize
        self.device = device
        self.activation = activation
        self.head = head or EmbeddingHead((pooling,), post=["normalize"] if normalize else [], device=device)
        if task in ("classify", "rerank") and getattr(model.config, "pad_token_id", None) is None:
            # stacklevel: the Engine(...) call, as PackedRunner's warning
            warnings.warn("the model's config.pad_token_id is None: each row of a batch runs alone (transformers' "
                          "decoder classification heads find a row's last token by that id and take no batch "
                          "without it); set model.config.pad_token_id to the tokenizer's pad id to batch",
                          RuntimeWarning, stacklevel=5)
        # Whether a row's real tokens see the padding after them (MobileBERT's
        # trigram embeddings take each token's neighbours, a padding token's
        # too): such batches run one length at a time, without padding.
        # Probed at the first batch with padding (on the worker, as any
        # batch: a model's hooks see no call at construction).
        self.pads_leak: Optional[bool] = None

    def run(self, batch, prompt_lengths: Optional[np.ndarray] = None, segments: Optional[np.ndarray] = None):
        """[B, dim] float32: pooled embeddings, or class scores for classify
        and rerank; for token-classify a list of [length, labels] logits.
        prompt_lengths: each row's prompt tokens, for a head that leaves them out.
        segments: [B] where each request's token type 1 starts (pairs)."""
        lengths = batch.lengths
        if self.pads_leak is not False and lengths.min() != lengths.max():  # padding, and not known masked
            if self.pads_leak is None:
                self.pads_leak = _pads_leak(self.encoder, self.device)
            if self.pads_leak:
                return self._by_length(batch, prompt_lengths, segments)
        return self._run(batch, prompt_lengths, segments)

    def _run(self, batch, prompt_lengths: Optional[np.ndarray], segments: Optional[np.ndarray]):
        ids = torch.from_numpy(batch.input_ids).to(self.device, non_blocking=True)
        mask = torch.from_numpy(batch.attention_mask).to(self.device, non_blocking=True)
        extra = {}
        if segments is not None:
            types = (np.arange(batch.input_ids.shape[1])[None, :] >= segments[:, None]) & (batch.attention_mask != 0)
            extra["token_type_ids"] = torch.from_numpy(types.astype(np.int64)).to(self.device, non_blocking=True)
        elif self.token_types:
            extra["token_type_ids"] = torch.zeros_like(ids)
        if self.task in ("classify", "rerank"):
            return activate(self._sequence_logits(ids, mask, batch.lengths, extra), self.activation).cpu().numpy()
        out = self.encoder(input_ids=ids, attention_mask=mask, **extra)
        if self.task == "token-classify":
            logits = out.logits.float().cpu().numpy()
            return [logits[i, :n] for i, n in enumerate(batch.lengths.tolist())]
        return self.head.padded(out.last_hidden_state, mask, prompt_lengths).cpu().numpy()

    def _by_length(self, batch, prompt_lengths: Optional[np.ndarray], segments: Optional[np.ndarray]):
        """run() over each length's rows as a batch of its own (no padding),
        the results in the batch's order."""
        lengths = np.asarray(batch.lengths)
        out: list = [None] * len(lengths)
        for n in np.unique(lengths):
            rows = np.flatnonzero(lengths == n)
            part = types.SimpleNamespace(input_ids=np.ascontiguousarray(batch.input_ids[rows, :n]),
                                         attention_mask=np.ascontiguousarray(batch.attention_mask[rows, :n]),
                                         lengths=lengths[rows])
            got = self._run(part, None if prompt_lengths is None else np.asarray(prompt_lengths)[rows],
                            None if segments is None else np.asarray(segments)[rows])
            for i, r in zip(rows.tolist(), got):
                out[i] = r
        return out if self.task == "token-classify" else np.stack(out)

    def _sequence_logits(self, ids: torch.Tensor, mask: torch.Tensor, lengths: np.ndarray,
                         extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, labels]: each row's logits as the model gives them for the row
        alone. transformers' decoder heads (Qwen2, Llama, Mistral, ...) take a
        row's last token that is not config.pad_token_id (the attention mask
        aside), and refuse a batch of several rows where it is None: the
        padding is that id, and without one each row runs alone, unpadded."""
        pad = getattr(self.model.config, "pad_token_id", None)
        if pad is None and ids.shape[0] > 1:
            return torch.cat([self.encoder(input_ids=ids[i:i + 1, :n], attention_mask=mask[i:i + 1, :n],
                                           **{k: v[i:i + 1, :n] for k, v in extra.items()}).logits
                              for i, n in enumerate(lengths.tolist())])
        if pad is not None:
            ids = ids.masked_fill(mask == 0, int(pad))
        return self.encoder(input_ids=ids, attention_mask=mask, **extra).logits


@torch.inference_mode()
def _pads_leak(encoder: torch.nn.Module, device: torch.device) -> bool:
    """Whether the model lets the padding of a padded batch into its real
    tokens: rows of 3 to 7 tokens beside one of 8, their padding filled with
    two different ids; where the attention mask keeps padding out, the real
    tokens' outputs are the same bits (same shapes, the padding's weights
    exactly 0). MobileBERT's trigram embeddings took a padding token's: a
    text's embedding moved 1.7e-3 with its batch company. Funnel pools the
    sequence in blocks (strides 2, 4, ...), a real token's block holding
    padding only at some lengths: one row of three tokens (all Funnel's
    blocks of real tokens alone) found nothing, and a text moved 0.12 with
    its company; rows of every length up to 8 meet every stride's residues."""
    cfg = encoder.config
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    width = 8
    if vocab < width + 4:
        return False
    pad = getattr(cfg, "pad_token_id", None)
    pad = int(pad) if isinstance(pad, int) and 0 <= pad < vocab else 0
    other = pad + 1 if pad + 1 < vocab else pad - 1
    real = [i for i in range(1, width + 4) if i not in (pad, other)][:width]
    lengths = range(width, 2, -1)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
    base = getattr(encoder, "base_model", None) or encoder  # the hidden states, under any head
    outs = []
    for fill in (pad, other):
        ids = torch.tensor([real[:n] + [fill] * (width - n) for n in lengths], device=device)
        try:
            h = getattr(base(input_ids=ids, attention_mask=mask), "last_hidden_state", None)
        except Exception:  # noqa: BLE001 - a model that cannot take the probe runs as it did
            return False
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[1] != width:
            return False
        outs.append(torch.where(mask[..., None] != 0, h, 0))
    return not torch.equal(outs[0], outs[1])


# Architectures whose layers the packed runner drives directly. BERT-like
# models share BertLayer's structure; DistilBERT has its own block.
_BERT_LIKE = {"bert": 0, "roberta": 1, "xlm-roberta": 1, "camembert": 1}  # value: position offset kind
_DISTIL = {"distilbert"}


def id_positions(batch: Any, pad: int) -> np.ndarray:
    """The packed batch's position ids as transformers' RoBERTa and MPNet
    count them from the ids (create_position_ids_from_input_ids), less their
    offset (padding_idx + 1): a token equal to the pad id sits at -1 (the
    padding row, once offset) and the tokens after it in its sequence one
    place earlier each. The batch's own positions (0.. per sequence) where no
    sequence holds the pad id: a text can, when it spells the pad token out."""
    ids, positions = np.asarray(batch.packed_input_ids), np.asarray(batch.position_ids)
    keep = ids != pad
    if keep.all():
        return positions
    count = np.cumsum(keep)
    starts = np.asarray(batch.cu_seqlens)[:-1]
    before = np.repeat(count[starts] - keep[starts], np.asarray(batch.lengths))  # kept before each sequence
    return ((count - before) * keep - 1).astype(positions.dtype)


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


def _touched(modules, everywhere: bool = True) -> bool:
    """Whether a forward hook (global with `everywhere`, or on one of
    `modules`) or a forward replaced on one of their instances would run if
    they were called."""
    if everywhere and (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules)


class Stamps:
    """What sits at some places of a model (a module's parameter or buffer,
    by name), as when taken: which tensor, where its data is and its version
    counter, which every in-place change moves (load_state_dict, an
    optimizer step, any op with a trailing underscore; not a change through
    `.data`, which has a counter of its own; an inference tensor has none).
    changed() says whether any differs now, in about 0.2 us a place, so that
    what holds copies of those tensors can rebuild them before a batch.
    versions=False: only which tensor and where its data is (an in-place
    change reaches views of it)."""

    def __init__(self, places: Sequence[tuple[torch.nn.Module, str]], *, versions: bool = True) -> None:
        self._places = [(m._parameters if name in m._parameters else m._buffers, name) for m, name in places]
        self._versions = versions
        self.take()

    def take(self) -> None:
        self._seen = [(d, name, t) + self._stamp(t) for d, name in self._places for t in (d.get(name),)]

    def _stamp(self, t: Optional[torch.Tensor]) -> tuple[int, int]:
        if t is None:
            return 0, 0
        counted = self._versions and not t.is_inference()
        return t.data_ptr(), t._version if counted else -1

    def changed(self) -> bool:
        for d, name, t, ptr, version in self._seen:
            if d.get(name) is not t or (t is not None and (
                    t.data_ptr() != ptr or (version >= 0 and t._version != version))):
                return True
        return False


class Uncalled:
    """The modules a packed runner never calls: their forwards take padded
    batches, so the runner calls their parts instead (the model itself, its
    encoder, a layer, its attention block...). A hook or a replaced forward
    on one of them cannot run; the `fastserve` logger says so once per
    module. `always`: checked every batch; `layers`: per layer, checked
    where that layer runs its modules (an untouched fused layer has no hook
    on any module)."""

    def __init__(self, model: torch.nn.Module, always: Sequence[torch.nn.Module],
                 layers: Sequence[Sequence[torch.nn.Module]]) -> None:
        self.always = tuple(dict.fromkeys(always))  # the base model may be the model itself
        self.layers = [tuple(ms) for ms in layers]
        self._names = {id(m): name for name, m in model.named_modules()}
        self._said: set[int] = set()

    def check_all(self) -> None:
        """Check `always` and every layer's modules."""
        self.check()
        for i in range(len(self.layers)):
            self.check(i)

    def check(self, layer: Optional[int] = None) -> None:
        """Check `always` (layer None), or that layer's modules."""
        for m in self.always if layer is None else self.layers[layer]:
            if id(m) not in self._said and _touched((m,), everywhere=False):
                self._said.add(id(m))
                name = self._names.get(id(m)) or "the model"
                log.warning("a forward hook or a replaced forward on %s (%s) does not run in packed execution, "
                            "which never calls that module (its forward takes padded batches): attach it to the "
                            "modules it contains (its Linear, LayerNorm or activation parts), or use "
                            "Engine(execution='padded')", name, type(m).__name__)


class FusedQKV:
    """Q, K and V's projections as one product.

    own: the engine owns the model (loaded, or its own copy): the weights
    (and biases, None without) are concatenated once and the modules' own
    parameters become views of the fused tensors, so the fusion keeps no
    second copy. Else (a model the caller passed in and still holds) the
    caller's parameters are left as they are and the three modules run:
    0.92-1.28x one fused product's time on the CPU, where concatenating the
    weights for each product took 2x on few tokens (docs/design.md,
    "Memory: where it goes"); _FusedLayer keeps one fused copy.

    Only three plain Linear layers fuse: a subclass, an adapter wrapping the
    layer (LoRA) or a parametrization computes more than its weight's
    product, so then the three modules always run. They also run while one
    of them has a hook or a patched forward, so that what a caller attached
    runs."""

    def __init__(self, q: torch.nn.Module, k: torch.nn.Module, v: torch.nn.Module, *, own: bool) -> None:
        self.projections = (q, k, v)
        self._fused: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        # An owned model's parameters replaced (load_state_dict(assign=True))
        # are no longer views of the fused tensors: refresh() then lets the
        # three modules run.
        self._stamps: Optional[Stamps] = None
        if own and fusable_projections(self.projections):
            # Outside inference mode, so that the model's parameters do not
            # become inference tensors (they could no longer be trained).
            with torch.inference_mode(False), torch.no_grad():
                weight, bias = self._concatenated()
                start = 0
                for lin in self.projections:
                    rows = lin.weight.shape[0]
                    lin.weight.data = weight[start : start + rows]
                    if bias is not None:
                        lin.bias.data = bias[start : start + rows]
                    start += rows
            self._fused = (weight, bias)
            self._stamps = Stamps([(lin, name) for lin in self.projections for name in ("weight", "bias")],
                                  versions=False)

    def refresh(self) -> None:
        """Before a batch: where an owned model's Q/K/V parameter was replaced
        (no longer a view of the fused tensors), the three modules run from
        then on. Fusing them again would re-point the parameters' data while
        the caller's thread may still be writing into the old one."""
        stamps = self._stamps  # (another replica's worker may clear it meanwhile)
        if stamps is not None and stamps.changed():
            self._fused = self._stamps = None

    @property
    def own(self) -> bool:
        """The fused tensors are the model's own parameters (their views)."""
        return self._fused is not None

    def _concatenated(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        q = self.projections[0]
        weight = torch.cat([lin.weight for lin in self.projections]).detach()
        bias = None if q.bias is None else torch.cat([lin.bias for lin in self.projections]).detach()
        return weight, bias

    def tensors(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The fused weight [q + k + v outputs, in] and bias (None without):
        the owned ones, or a concatenation of the caller's made now."""
        if not fusable_projections(self.projections):
            raise ValueError("Q, K and V are not three plain Linear layers: they do not fuse")
        return self._fused if self._fused is not None else self._concatenated()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """[T, q + k + v outputs]."""
        fused = self._fused  # (read once: refresh() may clear it meanwhile)
        if fused is None or _touched(self.projections):
            return torch.cat([lin(h) for lin in self.projections], dim=-1)
        return F.linear(h, *fused)


def fusable_projections(projections) -> bool:
    """Whether Q, K and V's projections are plain Linear layers that fuse
    into one product: exactly torch.nn.Linear (no subclass, no wrapper, no
    parametrization) with the same dtype and device, all with a bias or none."""
    return (all(type(lin) is torch.nn.Linear for lin in projections)
            and len({(lin.bias is None, lin.weight.dtype, lin.weight.device) for lin in projections}) == 1)


class _PackedAttention:
    """Self-attention over packed tokens [T, H], exact per sequence: one SDPA
    call per run of equal-length sequences (no padding, no mask), or through
    `varlen` (the CPU attention kernel, a padded copy, flash-attn's varlen
    kernel)."""

    def __init__(self, q: torch.nn.Module, k: torch.nn.Module, v: torch.nn.Module, heads: int, *,
                 own: bool) -> None:
        # One GEMM for Q, K and V where they fuse (FusedQKV), else three.
        self.qkv = FusedQKV(q, k, v, own=own)
        self.heads = heads

    def __call__(self, h: torch.Tensor, runs, varlen) -> torch.Tensor:
        T, H = h.shape
        nh, hd = self.heads, H // self.heads
        qkv = self.qkv(h).view(T, 3, nh, hd)
        if varlen is not None:
            return varlen(qkv).reshape(T, H)
        out = torch.empty(T, nh, hd, dtype=h.dtype, device=h.device)
        for start, n, length in runs:
            g = qkv[start : start + n * length].view(n, length, 3, nh, hd).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(g[0], g[1], g[2])  # [n, nh, length, hd]
            out[start : start + n * length] = o.transpose(1, 2).reshape(n * length, nh, hd)
        return out.view(T, H)


def _exact_gelu(act: Any) -> bool:
    """Whether an activation module is GELU with erf (not the tanh form)."""
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "none"
    try:
        from transformers.activations import GELUActivation
    except ImportError:  # pragma: no cover - every supported transformers has it
        return False
    return type(act) is GELUActivation


class _FusedLayer:
    """One encoder layer on the CPU (float32 or bfloat16) through fastserve's
    kernels: four GEMMs without their bias (gemm.Gemm: torch.mm, or oneDNN
    with the weight laid out for it once) and, between them, the attention
    kernel (adding the Q/K/V bias), bias + GELU and bias + residual +
    LayerNorm, in place. The same arithmetic as the model's modules; what it
    saves is addmm's copy of the broadcast bias into each output, a fresh
    tensor per elementwise op and a pass over the activations per op
    (benchmarks/README.md, "CPU dtypes"). Built only where fused_layers()
    says every layer is the standard one.

    compute: the dtype the products run in. Where it is the weights', the
    products use the model's own tensors (method="onednn": a reordered copy
    of them). Where it is not (float32 weights under bfloat16 autocast), the
    products take copies of the weights in it, made once, and inputs cast
    to it, as autocast's linear layers would; attention runs in it (with the
    Q/K/V bias in it), as does GELU (with its bias); the output biases, the
    residual stream and the LayerNorms stay in the weights' dtype."""

    def __init__(self, block: torch.nn.Module, attn: "_PackedAttention", out: torch.nn.Linear,
                 ln1: torch.nn.LayerNorm, inter: torch.nn.Linear, out2: torch.nn.Linear,
                 ln2: torch.nn.LayerNorm, method: str, compute: torch.dtype | None = None) -> None:
        self.parts = list(block.modules())
        self.heads = attn.heads
        # The model's tensors it copies or reads, stamped before the copies:
        # a change made while they are taken shows at the next batch.
        self.stamps = Stamps([(m, name) for m in (*attn.qkv.projections, out, ln1, inter, out2, ln2)
                              for name in ("weight", "bias")])
        attn.qkv.refresh()  # a Q/K/V parameter replaced since the runner's refresh: not the old fused one
        wqkv, bqkv = attn.qkv.tensors()
        self.compute = compute = compute or wqkv.dtype

        def cast(t: Optional[torch.Tensor], dtype: torch.dtype = compute) -> Optional[torch.Tensor]:
            # The kernels take contiguous vectors: a strided one is copied.
            return None if t is None else t.detach().to(dtype).contiguous()

        def own(t: torch.Tensor) -> torch.Tensor:
            return cast(t, t.dtype)

        # The four products without their bias, by gemm.Gemm's `method`.
        self.qkv, self.bqkv = Gemm(cast(wqkv), method), cast(bqkv)
        self.o, self.bo = Gemm(cast(out.weight), method), own(out.bias)
        self.ln1 = (own(ln1.weight), own(ln1.bias), float(ln1.eps))
        self.up, self.bi = Gemm(cast(inter.weight), method), cast(inter.bias)
        self.down, self.bo2 = Gemm(cast(out2.weight), method), own(out2.bias)
        self.ln2 = (own(ln2.weight), own(ln2.bias), float(ln2.eps))
        self._norms = (ln1, ln2)
        # Bytes of what the layer keeps besides the model's own tensors: the
        # copies in the compute dtype, a caller's model's Q/K/V fused, and
        # contiguous copies of strided vectors (none where the products take
        # the model's tensors; "onednn" keeps only its reordered copy, which
        # the Gemm counts).
        model = {p.untyped_storage().data_ptr() for p in block.parameters()}
        kept = [self.bqkv, self.bi, self.bo, self.bo2, *self.ln1[:2], *self.ln2[:2]] + \
            [g.weight for g in (self.qkv, self.up, self.o, self.down)]
        self._copy_bytes = sum(t.numel() * t.element_size() for t in kept
                               if t is not None and t.untyped_storage().data_ptr() not in model)

    @property
    def extra_bytes(self) -> int:
        """Bytes the layer holds besides the model's weights: the copies in
        the compute dtype and oneDNN's reordered ones."""
        return self._copy_bytes + sum(g.extra_bytes for g in (self.qkv, self.o, self.up, self.down))

    def stale(self) -> bool:
        """Whether a tensor it copied or reads changed since it was built, or
        a LayerNorm's eps (a float it keeps)."""
        return (self.stamps.changed() or self._norms[0].eps != self.ln1[2]
                or self._norms[1].eps != self.ln2[2])

    def untouched(self) -> bool:
        """No forward hook and no forward replaced on the instance, on any part
        of the layer: else the batch runs the modules, so that what a caller
        attached to them (a hook, a patched forward) still runs."""
        return not _touched(self.parts)

    def attend(self, h: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        """The attention context [T, H] of the layer's input h [T, H], in the
        compute dtype."""
        T, H = h.shape
        qkv = self.qkv(h.to(self.compute)).view(T, 3, self.heads, H // self.heads)
        return kernels.attention(qkv, cu, bias=self.bqkv).view(T, H)

    def attention_output(self, ctx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return kernels.add_layer_norm_(self.o(ctx).to(h.dtype), self.bo, h, *self.ln1)

    def feed_forward(self, a: torch.Tensor) -> torch.Tensor:
        x = kernels.bias_gelu_(self.up(a.to(self.compute)), self.bi)
        return kernels.add_layer_norm_(self.down(x).to(a.dtype), self.bo2, a, *self.ln2)


class _FusedLayers:
    """A PackedRunner's fused layers, shared by its shallow copies (the
    replicas' runners). Before each batch, a layer whose model tensors
    (its Stamps) or LayerNorm eps changed since it was built is built anew,
    once for all the copies; one that is no longer the standard layer (a
    bias removed) is None: its modules run, as the model now says."""

    def __init__(self, blocks: Sequence[torch.nn.Module], attn: Sequence["_PackedAttention"], distil: bool,
                 method: str, compute: torch.dtype) -> None:
        # No reference back to the runner: a cycle would keep a closed
        # engine's model alive past gc.freeze() (engine.py).
        self._blocks, self._attn, self._distil = blocks, attn, distil
        self._method, self._compute = method, compute
        self._lock = threading.Lock()
        self.layers = [self._build(i) for i in range(len(blocks))]

    def _build(self, i: int) -> Optional[_FusedLayer]:
        parts = _standard_layer(self._blocks[i], self._distil)
        return None if parts is None else _FusedLayer(self._blocks[i], self._attn[i], *parts, method=self._method,
                                                      compute=self._compute)

    def current(self) -> list[Optional[_FusedLayer]]:
        layers = self.layers
        if not any(f is not None and f.stale() for f in layers):
            return layers
        with self._lock:
            layers = list(self.layers)
            for i, f in enumerate(layers):
                if f is not None and f.stale():
                    layers[i] = self._build(i)
            self.layers = layers  # a batch under way keeps the list it started with
        return layers


def _standard_layer(block: torch.nn.Module, distil: bool) -> Optional[tuple]:
    """A BERT or DistilBERT layer's attention output projection, LayerNorm,
    intermediate and output projections and LayerNorm, where every part is
    the standard one _FusedLayer computes (projections with a bias, affine
    LayerNorm over the last dimension, GELU with erf); else None."""
    if distil:
        qkv = (block.attention.q_lin, block.attention.k_lin, block.attention.v_lin)
        parts = (block.attention.out_lin, block.sa_layer_norm, block.ffn.lin1, block.ffn.lin2,
                 block.output_layer_norm)
        act = block.ffn.activation
    else:
        att = block.attention.self
        qkv = (att.query, att.key, att.value)
        parts = (block.attention.output.dense, block.attention.output.LayerNorm, block.intermediate.dense,
                 block.output.dense, block.output.LayerNorm)
        act = block.intermediate.intermediate_act_fn
    out, ln1, inter, out2, ln2 = parts
    linear = fusable_projections(qkv) and \
        all(type(m) is torch.nn.Linear and m.bias is not None for m in (out, inter, out2))
    norms = all(type(m) is torch.nn.LayerNorm and m.weight is not None and m.bias is not None
                and len(m.normalized_shape) == 1 for m in (ln1, ln2))
    return parts if linear and norms and _exact_gelu(act) else None


def _tail_containers(block: torch.nn.Module, distil: bool) -> tuple:
    """The modules of a standard layer (_standard_layer) around its tails'
    parts, whose forwards the CUDA epilogue also stands for."""
    return (block.ffn,) if distil else (block.attention.output, block.output)


def _kernels_vectorized(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether fastserve's CPU layer kernels run vectorised for this model:
    the extension's CPU kernels are in use, their AVX2 path runs on this
    CPU, and the head, hidden and intermediate widths are multiples of 8.
    Elsewhere torch's own kernels are faster than the portable loops."""
    from .footprint import shape_of

    shape = shape_of(model.config)
    return (kernels.for_device(device).name == "cpu" and kernels.cpu_vector_paths() and shape is not None
            and shape.hidden % shape.heads == 0 and (shape.hidden // shape.heads) % 8 == 0
            and shape.hidden % 8 == 0 and shape.intermediate % 8 == 0)


def fused_layers(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PackedRunner runs this model's layers through fastserve's CPU
    kernels (_FusedLayer) when its batches compute in `dtype` (the weights',
    or autocast's): a BERT-family model whose attention runs in the CPU
    kernel (float32 or bfloat16, the kernels vectorised here) and whose
    every layer is the standard one. What the activation footprint
    (python/fastserve/footprint.py) counts on."""
    if not packed_supported(model):
        return False
    if _attention_method(device, dtype, kernel=_kernels_vectorized(model, device)) != "kernel":
        return False
    distil = model.config.model_type in _DISTIL
    blocks = model.base_model.transformer.layer if distil else model.base_model.encoder.layer
    return all(_standard_layer(b, distil) is not None for b in blocks)


def layer_gemm(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """How the layers' matrix products run (gemm.GEMMS) where fused_layers()
    holds, else None."""
    return gemm.method(dtype) if fused_layers(model, device, dtype) else None


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
    # Set by an engine whose batches are not rounded to token buckets because
    # every product of a batch's token count runs through gemm.py's pieces
    # (process.onednn_buckets): warned once (then None) if a layer runs its
    # modules instead (a hook or a change after construction), whose products
    # give oneDNN a new shape per token count.
    unbounded_warning: Optional[str] = None

    def __init__(self, model: torch.nn.Module, *, task: str, pooling: str, normalize: bool, device: torch.device,
                 activation: str = "softmax", head: EmbeddingHead | None = None,
                 compute: torch.dtype | None = None, own_weights: bool = False, **_: Any) -> None:
        # compute: the dtype batches compute in, where it is not the model's:
        # autocast's (Engine(dtype="autocast") runs every batch under it).
        # own_weights: the model is the engine's own (FusedQKV may make its
        # Q/K/V parameters views of one tensor), not the caller's.
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
            # stacklevel: the Engine(...) call (here, Engine.__init__'s make_runner, Engine.__init__, its
            # refusal wrapper)
            warnings.warn(reason, RuntimeWarning, stacklevel=5)
        self.base = model.base_model
        self.distil = cfg.model_type in _DISTIL
        # RoBERTa-family position ids start after padding_idx (and skip pad ids: id_positions).
        self.position_offset = cfg.pad_token_id + 1 if _BERT_LIKE.get(cfg.model_type) == 1 else 0
        if self.distil:
            self.blocks = list(self.base.transformer.layer)
            self.attn = [_PackedAttention(b.attention.q_lin, b.attention.k_lin, b.attention.v_lin, cfg.n_heads,
                                          own=own_weights) for b in self.blocks]
        else:
            self.blocks = list(self.base.encoder.layer)
            self.attn = [_PackedAttention(b.attention.self.query, b.attention.self.key, b.attention.self.value,
                                          cfg.num_attention_heads, own=own_weights) for b in self.blocks]
        # The compute dtype decides the CPU kernels only: on a GPU autocast
        # keeps the attention a float32 model gets ("pad"; flash-attn takes
        # half precision alone, and a pipeline refuses it).
        dtype = (compute if device.type == "cpu" else None) or getattr(model, "dtype", torch.float32)
        heads = cfg.n_heads if self.distil else cfg.num_attention_heads
        self.attention = _attention_method(device, dtype, kernel=_kernels_vectorized(model, device),
                                           head_dim=int(getattr(cfg, "dim", 0) or cfg.hidden_size) // heads)
        self._flash = _flash_varlen() if self.attention == "flash" else \
            _torch_flash_varlen(device) if self.attention == "varlen" else None
        # Whole layers through fastserve's CPU kernels where attention runs in
        # the kernel and every layer is the standard one (None: the modules).
        self._fused: Optional[_FusedLayers] = None
        # Their matrix products' method (gemm.py; None: the modules run).
        self.gemm = layer_gemm(model, device, dtype)
        if self.gemm is not None:
            self._fused = _FusedLayers(self.blocks, self.attn, self.distil, self.gemm, dtype)
        # Batches by the attention that actually ran: with one length in the
        # batch, "pad" runs as "runs" (one dense call needs no mask).
        self.attention_batches = dict.fromkeys(ATTENTION_METHODS, 0)
        # CUDA: the layers' output projection tails (bias + residual +
        # LayerNorm) through fastserve's epilogue kernel, where every layer
        # is the standard one and the kernels are built for CUDA;
        # FASTSERVE_CUDA_EPILOGUES=0 turns them off (benchmarks). Each with
        # the modules its parts stand for (a hook on one: that layer's modules run).
        self._tails: Optional[list[tuple[tuple, tuple]]] = None
        parts = [_standard_layer(b, self.distil) for b in self.blocks]
        # (Not under autocast: the kernels take one dtype, the weights'.)
        if (self.kernels.name == "cuda" and os.environ.get("FASTSERVE_CUDA_EPILOGUES", "1") != "0"
                and compute in (None, getattr(model, "dtype", None)) and all(p is not None for p in parts)):
            self._tails = [(p, p + _tail_containers(b, self.distil)) for p, b in zip(parts, self.blocks)]
        # CUDA graphs (graphs.py) where attention runs over cu_seqlens in one
        # kernel; FASTSERVE_CUDA_GRAPHS=0 turns them off (benchmarks).
        self.graphs: Optional[CudaGraphs] = None
        if self.attention in ("flash", "varlen") and os.environ.get("FASTSERVE_CUDA_GRAPHS", "1") != "0":
            self.graphs = CudaGraphs(self._graph_forward, model, device,
                                     pad_id=int(cfg.pad_token_id or 0),
                                     max_length=int(cfg.max_position_embeddings) - self.position_offset,
                                     position_offset=self.position_offset, max_tokens=GRAPH_MAX_TOKENS)
        # What packed execution never calls: the model, its encoder (and
        # DistilBERT's embeddings), and each layer itself, its attention
        # block and self-attention.
        top = [model, self.base, self.base.transformer if self.distil else self.base.encoder]
        self.uncalled = Uncalled(model, top + ([self.base.embeddings] if self.distil else []),
                                 [(b, b.attention) if self.distil else (b, b.attention, b.attention.self)
                                  for b in self.blocks])

    @property
    def fused(self) -> Optional[list[Optional["_FusedLayer"]]]:
        """The layers through the CPU kernels, as the next batch runs them
        (None: every layer runs its modules; an entry None: that layer)."""
        return None if self._fused is None else self._fused.layers

    def refresh(self) -> Optional[list[Optional["_FusedLayer"]]]:
        """Before a batch: what was made from weights changed since the last
        one made anew (Stamps; a fused layer's cover its Q/K/V, and its
        rebuild refreshes them). The fused layers the batch runs."""
        fused = None if self._fused is None else self._fused.current()
        for i, attn in enumerate(self.attn):
            if fused is None or fused[i] is None:
                attn.qkv.refresh()
        return fused

    def hidden(self, batch, segments: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                          Optional[np.ndarray]]:
        """Last hidden states [T, H] and cu_seqlens [B + 1] (int32) on the
        device, and which of the batch's rows they hold (None: all; rows are
        dropped only at a pause). segments: [B] where each request's token
        type 1 starts."""
        dev = self.device
        ids = torch.from_numpy(batch.packed_input_ids).to(dev, non_blocking=True)
        pos = torch.from_numpy(self._positions(batch)).to(dev, non_blocking=True)
        cu = torch.from_numpy(batch.cu_seqlens).to(dev, non_blocking=True)
        types = None
        if segments is not None and not self.distil:  # DistilBERT has no token types
            packed = np.asarray(batch.position_ids) >= np.repeat(segments, batch.lengths)
            types = torch.from_numpy(packed.astype(np.int64)).to(dev, non_blocking=True)
        self.uncalled.check()
        h = _packed_embeddings(self.base.embeddings, ids, pos, self.distil, types)
        lengths = np.asarray(batch.lengths)
        runs, varlen = self._attention_plan(lengths, cu, int(batch.max_seqlen), count=True)
        rows: Optional[np.ndarray] = None
        hook = self.stage_hook
        fused = self.refresh()
        for i in range(len(self.blocks)):
            if hook is not None:
                h = hook(i, h)
            if fused is not None and fused[i] is not None and fused[i].untouched():
                # The same steps as below, through the CPU kernels.
                ctx = fused[i].attend(h, cu)
                a = fused[i].attention_output(ctx, h)
                del ctx, h
                h = fused[i].feed_forward(a)
                del a  # else it lives through the next layer's attention
            else:
                # (An untouched fused layer has no hook on any module at all.)
                self.uncalled.check(i)
                if self.unbounded_warning is not None:
                    warnings.warn(self.unbounded_warning, RuntimeWarning, stacklevel=2)
                    self.unbounded_warning = None
                tail = self._tail(i)
                a = self._attention(i, h, runs, varlen, tail)
                del h
                h = self._feed_forward(i, a, tail)
                del a
            if self.pause_hook is not None and i + 1 < len(self.blocks):
                keep = self.pause_hook(i + 1, len(self.blocks))
                if keep is not None:
                    # Rows past the mask (shapes.py's ghost sequences) stay.
                    keep = np.concatenate([np.asarray(keep, bool), np.ones(len(lengths) - len(keep), bool)])
                    if not keep.any():
                        raise BatchAbandoned
                    tokens = np.repeat(keep, lengths)
                    h = h[torch.from_numpy(tokens).to(dev)]
                    lengths = lengths[keep]
                    rows = (np.arange(len(keep)) if rows is None else rows)[keep]
                    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)).to(dev)
                    runs, varlen = self._attention_plan(lengths, cu, int(lengths.max()))
        if hook is not None:
            h = hook(len(self.blocks), h)
        return h, cu, rows

    def _positions(self, batch) -> np.ndarray:
        """The batch's position ids [T], as the model's embeddings take them."""
        if self.position_offset:
            return id_positions(batch, self.position_offset - 1) + self.position_offset
        return np.asarray(batch.position_ids)

    def _tail(self, i: int) -> Optional[tuple]:
        """Layer i's parts (_standard_layer) where its output projections'
        tails run through the CUDA epilogue kernel now: none of the modules
        it stands for has a hook or a replaced forward, and their biases and
        LayerNorms' affine tensors are still there (one set to None since:
        the modules run, as the model now says)."""
        if self._tails is None:
            return None
        parts, modules = self._tails[i]
        out, ln1, _, out2, ln2 = parts
        if any(t is None for t in (out.bias, out2.bias, ln1.weight, ln1.bias, ln2.weight, ln2.bias)):
            return None
        return None if _touched(modules) else parts

    def _attention(self, i: int, h: torch.Tensor, runs, varlen, tail: Optional[tuple]) -> torch.Tensor:
        """Layer i's attention and its output LayerNorm, through its modules
        (or, with its tail parts (_tail, asked once per layer and batch), the
        projection, then bias + residual + LayerNorm in one CUDA kernel).
        The caller drops h after it: the layer's input and the
        attention context dead before the feed-forward take (2H) x 4 bytes
        per token off the batch's peak in fp32 (python/fastserve/footprint.py)."""
        block = self.blocks[i]
        ctx = self.attn[i](h, runs, varlen)
        if tail is not None:
            out, ln = tail[0], tail[1]
            return kernels.add_layer_norm_(F.linear(ctx, out.weight), out.bias, h, ln.weight, ln.bias, ln.eps)
        if self.distil:
            return block.sa_layer_norm(block.attention.out_lin(ctx) + h)
        return block.attention.output(ctx, h)

    def _feed_forward(self, i: int, a: torch.Tensor, tail: Optional[tuple]) -> torch.Tensor:
        """Layer i's feed-forward and its output LayerNorm, through its
        modules (or, with its tail parts, the output projection, then bias +
        residual + LayerNorm in one CUDA kernel). The intermediate projection keeps its own bias
        and GELU: cuBLAS adds the bias inside the product, and fastserve's
        bias + GELU kernel measured no faster than that and torch's GELU
        (0.94-0.99x on an H200, benchmarks/README.md, "GPU")."""
        block = self.blocks[i]
        if tail is not None:
            _, _, inter, out, ln = tail
            x = block.ffn.activation(inter(a)) if self.distil else block.intermediate(a)
            return kernels.add_layer_norm_(F.linear(x, out.weight), out.bias, a, ln.weight, ln.bias, ln.eps)
        if self.distil:
            return block.output_layer_norm(block.ffn(a) + a)
        return block.output(block.intermediate(a), a)

    def _graph_forward(self, ids: torch.Tensor, pos: torch.Tensor, cu: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """The encoder as a CUDA graph captures it (graphs.py): embeddings,
        then every layer through its modules, attention over cu_seqlens."""
        h = _packed_embeddings(self.base.embeddings, ids, pos, self.distil)
        _, varlen = self._attention_plan(np.zeros(0, np.int64), cu, max_seqlen)
        for i in range(len(self.blocks)):
            tail = self._tail(i)
            a = self._attention(i, h, [], varlen, tail)
            del h
            h = self._feed_forward(i, a, tail)
            del a
        return h

    def _attention_plan(self, lengths: np.ndarray, cu: torch.Tensor, maxlen: int,
                        count: bool = False) -> tuple[list, Optional[Callable[[torch.Tensor], torch.Tensor]]]:
        """The runs of equal lengths, and the attention over all of them at
        once where one is used (varlen), for sequences of these lengths."""
        method = self.attention
        # Only the per-run and padded-copy methods need the runs.
        runs = _equal_length_runs(lengths) if method in ("runs", "pad") else []
        varlen: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        if method in ("flash", "varlen"):
            on = {cu.device: cu}  # cu_seqlens per device: a pipeline's stages take it where their layers are

            def attend(qkv: torch.Tensor) -> torch.Tensor:
                c = on.get(qkv.device)
                if c is None:
                    c = on[qkv.device] = cu.to(qkv.device)
                return self._flash(qkv[:, 0], qkv[:, 1], qkv[:, 2], c, c, maxlen, maxlen)

            varlen = attend
        elif method == "kernel":
            varlen = lambda qkv: kernels.attention(qkv, cu)  # noqa: E731
        elif method == "pad" and len(runs) > 1:
            varlen = _PaddedAttention(lengths, cu, self.kernels)
        if count:
            self.attention_batches[method if varlen is not None else "runs"] += 1
        return runs, varlen

    def run(self, batch, prompt_lengths: Optional[np.ndarray] = None, segments: Optional[np.ndarray] = None):
        """As PaddedRunner.run, on packed tokens: for token-classify each
        token's row goes back to its request (no pooling). Rows dropped at a
        pause (Engine(preempt=...)) are left out."""
        graphs = self.graphs
        if graphs is not None and segments is None and self.stage_hook is None and self.pause_hook is None:
            with graphs.lock:
                self.uncalled.check()
                out = None
                if graphs.usable():
                    self._refresh_graphs(graphs)
                    out = graphs.run(np.asarray(batch.packed_input_ids), self._positions(batch),
                                     np.asarray(batch.cu_seqlens))
                else:
                    graphs.eager += 1
                if out is not None:
                    self.attention_batches[self.attention] += 1
                    # Read before the lock goes: the next replay overwrites them.
                    return self._rows(*out, prompt_lengths)
        h, cu, kept = self.hidden(batch, segments)
        if kept is not None and prompt_lengths is not None:
            prompt_lengths = prompt_lengths[kept]
        return self._rows(h, cu, prompt_lengths)

    def _refresh_graphs(self, graphs: CudaGraphs) -> None:
        """Refresh Q/K/V's fusion (PackedRunner.refresh); where a layer's
        changed, the graphs (which ran the old one) are dropped."""
        before = [a.qkv.own for a in self.attn]
        self.refresh()
        if [a.qkv.own for a in self.attn] != before:
            graphs.drop()

    def _rows(self, h: torch.Tensor, cu: torch.Tensor, prompt_lengths: Optional[np.ndarray]):
        """The batch's output rows on the host from its last hidden states."""
        if self.task == "token-classify":
            m = self.model
            logits = m.classifier(m.dropout(h)).float().cpu().numpy()
            return np.split(logits, cu.cpu().numpy()[1:-1])
        if self.task in ("classify", "rerank"):
            cls = self.kernels.gather(h.contiguous(), cu[:-1])  # first rows; on CUDA no index copy or sync
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


ATTENTION_METHODS = ("runs", "pad", "flash", "varlen", "kernel")
# The most tokens a batch replays a CUDA graph for (the engine lowers it to
# its max_batch_tokens); larger batches run eagerly.
GRAPH_MAX_TOKENS = 8192


def _attention_method(device: torch.device, dtype: torch.dtype, kernel: bool = False, head_dim: int = 64) -> str:
    """How packed attention runs. CPU: "kernel" for a float32 or bfloat16
    model where the caller can run fastserve's CPU attention kernel
    vectorised (kernel=True: runners._kernels_vectorized; in bfloat16 it
    measured 1.20x torch's bfloat16 path on a CPU with AVX512-BF16, and level
    with it where bfloat16 is emulated: benchmarks/README.md, "CPU dtypes"),
    one C++ call per layer over every
    sequence (kernels.attention); else "runs", exact attention per sequence with no mask, one
    SDPA call per run of equal lengths. CUDA, for a float16 or bfloat16
    model (flash kernels have no float32 ones): flash-attn's varlen kernel
    when that package is installed, else "varlen", the flash kernel torch
    ships, over cu_seqlens too (head widths a multiple of 8, up to 256);
    else "pad": attention alone on a padded copy with a key mask, one SDPA
    call per layer, since a per-run loop launches kernels per distinct
    length per layer (benchmarks/README.md, "GPU").
    FASTSERVE_PACKED_ATTENTION overrides the choice (benchmarks, tests)."""
    half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    flash_ok = half and _flash_varlen() is not None
    varlen_ok = half and head_dim % 8 == 0 and head_dim <= 256 and _torch_flash_varlen(device) is not None
    forced = os.environ.get("FASTSERVE_PACKED_ATTENTION", "")
    kernel_ok = kernel and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    if forced:
        if forced not in ATTENTION_METHODS:
            raise ValueError(f"FASTSERVE_PACKED_ATTENTION must be one of {ATTENTION_METHODS}, got {forced!r}")
        if forced == "flash" and not flash_ok:
            raise ValueError("FASTSERVE_PACKED_ATTENTION=flash needs the flash-attn package, a CUDA device "
                             "and a float16 or bfloat16 model")
        if forced == "varlen" and not varlen_ok:
            raise ValueError("FASTSERVE_PACKED_ATTENTION=varlen needs a torch with flash attention on a CUDA "
                             "device, a float16 or bfloat16 model and head widths a multiple of 8, up to 256")
        if forced == "kernel" and not kernel_ok:
            raise ValueError("FASTSERVE_PACKED_ATTENTION=kernel needs a float32 or bfloat16 model on the CPU, the "
                             "BERT-family packed runner, fastserve's CPU kernels (not FASTSERVE_KERNELS=torch) "
                             "with their AVX2 path, and head widths that are multiples of 8")
        return forced
    if device.type != "cuda":
        return "kernel" if kernel_ok else "runs"
    return "flash" if flash_ok else "varlen" if varlen_ok else "pad"


class _PaddedAttention:
    """Exact attention per sequence for one packed batch through a padded
    copy [B, L] with a key mask (plus a family's bias or mask: families.py):
    qkv rows are unpacked into [B, L] (zeros past each length), SDPA runs
    once, and the real rows are packed back, through the packing kernels
    with cu_seqlens on the device (no host work per layer). With torch's
    stand-in kernels (a build without them for the device), an index
    made once per batch does the same, as those would read cu_seqlens on the
    host at every call."""

    def __init__(self, lengths: np.ndarray, cu: torch.Tensor, kern: kernels.Kernels) -> None:
        self.B, self.L = len(lengths), int(lengths.max())
        self.cu, self.kernels = cu, kern
        self.index: Optional[torch.Tensor] = None
        if kern.name == "torch":
            rows = np.repeat(np.arange(self.B, dtype=np.int64) * self.L, lengths) + \
                (np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths))
            self.index = torch.from_numpy(rows).to(cu.device)
        keep = np.arange(self.L)[None, :] < lengths[:, None]  # [B, L]: real tokens
        self.keep = torch.from_numpy(keep).to(cu.device)[:, None, None, :]

    def __call__(self, qkv: torch.Tensor, mask: Any = None, scale: Optional[float] = None) -> torch.Tensor:
        T, three, nh, hd = qkv.shape
        if self.keep.device != qkv.device:  # a pipeline stage on another device
            self.cu, self.keep = self.cu.to(qkv.device), self.keep.to(qkv.device)
            self.index = None if self.index is None else self.index.to(qkv.device)
            self.kernels = kernels.for_device(qkv.device)
        if self.index is None:
            padded = self.kernels.unpack(qkv.reshape(T, three * nh * hd), self.cu, self.L)
        else:
            padded = qkv.new_zeros(self.B * self.L, three, nh, hd).index_copy_(0, self.index, qkv)
        q, k, v = padded.view(self.B, self.L, three, nh, hd).permute(2, 0, 3, 1, 4)  # each [B, nh, L, hd]
        if mask is None:
            full: Any = self.keep
        elif mask.dtype == torch.bool:
            full = self.keep & mask
        else:
            full = mask.to(q.dtype).masked_fill(~self.keep, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=scale).transpose(1, 2)
        if self.index is None:
            return self.kernels.pack(out.reshape(self.B, self.L, nh * hd), self.cu, total=T).view(T, nh, hd)
        return out.reshape(self.B * self.L, nh, hd).index_select(0, self.index)


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_flash_varlen(device: Optional[torch.device] = None):
    """The flash-attention kernel torch ships, over cu_seqlens: called as
    flash-attn's flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k),
    q/k/v [T, heads, head_dim] in float16 or bfloat16. None where this torch
    has none (a CPU build) or `device` cannot run it (a GPU older than sm_80:
    the kernel refuses V100s and T4s; a build with it says nothing of the
    card). torch's public
    torch.nn.attention.varlen.varlen_attn calls the same kernel, but picks
    cuDNN's instead on Hopper in some versions, which builds a plan per new
    shape (benchmarks/README.md, "GPU": 70 ms per online batch), so the op is
    called here directly. Its schema has kept these ten leading arguments
    since torch 2.2."""
    if not torch.backends.cuda.is_flash_attention_available():
        return None
    try:
        if device is not None and torch.cuda.get_device_capability(device)[0] < 8:
            return None
    except (RuntimeError, AssertionError, ValueError):  # no such device
        return None
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None:
        return None

    def attend(q, k, v, cu_q, cu_k, max_q, max_k):
        return op(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False)[0]

    return attend
