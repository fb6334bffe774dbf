"""Tasks beyond one vector per text: reranking with cross-encoders (one
score per query-document pair) and token classification (entities).

Both run through the same scheduler as embeddings: a pair, or a text, is one
request, batched with other callers' requests. A pair's token types travel
with its request (the index where its second segment starts, on the
request's future) to the runner, which builds the batch's token types from
them. The work per result that is not the model's (activations, sorting,
merging sub-words into entities) runs in the caller's thread, never in the
engine's worker.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import importlib
import threading
import warnings
from dataclasses import dataclass
from collections.abc import Set
from typing import Any, Awaitable, Callable, Optional, Sequence

import numpy as np

from . import admission
from .admission import TokenLists, all_results, indexed, not_unicode, reindexed, results_of, where
from .errors import InvalidInputError, ModelLoadError
from .inputs import InputInfo
from .st_spec import st_config

PAIR_TRUNCATIONS = ("longest_first", "only_second")
PAIR_ACTIVATIONS = ("sigmoid", "softmax", "tanh", "none")
AGGREGATIONS = ("none", "simple", "first", "average", "max")

# sentence-transformers' names for the activations a CrossEncoder saves.
_TORCH_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.Softmax": "softmax",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.linear.Identity": "none",
}


# ------------------------------------------------------------------ rerank


@dataclass(frozen=True)
class RerankResult:
    """One document's place in a ranking: its index in the documents given,
    its score, and (return_documents=True) the document itself."""

    index: int
    score: float
    document: Optional[str] = None


def distinct(docs: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct documents in first-seen order, and for each document the
    index of its copy among them: a document given twice is scored once, so
    its copies get one score (and rank in index order, as CrossEncoder.rank's
    equal scores do), whatever batches the pairs would have run in."""
    first: dict[str, int] = {}
    where = np.fromiter((first.setdefault(d, len(first)) for d in docs), dtype=np.int64, count=len(docs))
    return list(first), where


def first_places(where: np.ndarray) -> list[int]:
    """For each distinct document (distinct()'s `where`), the index of its
    first copy among the documents given."""
    first: dict[int, int] = {}
    for i, u in enumerate(where.tolist()):
        first.setdefault(u, i)
    return [first[u] for u in range(len(first))]


def cross_encoder_activation(source: Any, config: Any, activation: str = "auto") -> str:
    """What a rerank engine applies to the logits: `activation` unless
    "auto", else what CrossEncoder.predict applies: the activation the
    sentence-transformers folder (source: a local folder or a hub id, or
    None) saved (config_sentence_transformers.json
    from 5.x on, config.json's "sentence_transformers" in 4.x,
    "sbert_ce_default_activation_function" before), else sigmoid for a
    one-logit head and none for several."""
    if activation != "auto":
        if activation not in PAIR_ACTIVATIONS:
            raise ValueError(f"activation must be 'auto' or one of {PAIR_ACTIVATIONS}, got {activation!r}")
        return activation
    saved = None
    if source:  # a local folder or a hub id (its cache), as the spec is read
        saved = st_config(source).get("activation_fn")
    if saved is None:
        saved = (getattr(config, "sentence_transformers", None) or {}).get("activation_fn")
    if saved is None:
        saved = getattr(config, "sbert_ce_default_activation_function", None)
    if saved is not None:
        found = _saved_activation(saved)
        if found is not None:
            return found
    return "sigmoid" if config.num_labels == 1 else "none"


def _saved_activation(saved: Any) -> Optional[str]:
    """The activation a saved class path names, as CrossEncoder loads it:
    a torch class by any of its paths ("torch.nn.Sigmoid" or
    "torch.nn.modules.activation.Sigmoid"); another path is not imported
    (sentence-transformers imports it only with trust_remote_code): warned
    about, and the default applies (None)."""
    if not isinstance(saved, str):
        raise ModelLoadError(f"the cross-encoder's saved activation must be a class path, got {saved!r}")
    if not saved.startswith("torch."):
        warnings.warn(f"fastserve: the cross-encoder's saved activation {saved!r} is not a torch class; it is not "
                      "imported (sentence-transformers would need trust_remote_code): the default applies "
                      "(pass activation= to choose one)", RuntimeWarning, stacklevel=2)
        return None
    module, _, name = saved.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"the cross-encoder's saved activation {saved!r} cannot be found: {e}") from None
    ours = _TORCH_ACTIVATIONS.get(f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}")
    if ours is None:
        raise ModelLoadError(f"the cross-encoder's activation {saved!r} is not supported (fastserve applies "
                             f"{', '.join(sorted(_TORCH_ACTIVATIONS))}); pass activation= to choose one")
    return ours


def apply_activation(logits: np.ndarray, activation: str) -> np.ndarray:
    """[n, labels] float32 scores from logits (as torch computes them in float32)."""
    x = np.asarray(logits, dtype=np.float32)
    if activation == "sigmoid":
        with np.errstate(over="ignore"):  # exp(-x) is inf below -88.7: 1 / inf = 0, as torch.sigmoid gives
            return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    if activation == "tanh":
        return np.tanh(x)
    if activation == "softmax":
        e = np.exp(x - x.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)
    return x


class PrivateTokenizer:
    """A copy of the caller's tokenizer, called under a lock. transformers'
    tokenizer(...) sets the truncation of the Rust tokenizer behind it on
    every call: calls from several threads with different truncation (a first
    pass without, a cut for the long inputs) would otherwise see each other's
    setting, and so would the caller's own uses of the object it passed in.

    The copy (a deep copy: 0.1-0.2 s for a 30k-word vocabulary) is made on
    the first call, or at once by `ready()` where every request needs it;
    `truncation_side` sets the copy's side, leaving the caller's as it is."""

    def __init__(self, tokenizer: Any, truncation_side: Optional[str] = None) -> None:
        self.source = tokenizer
        self.truncation_side = truncation_side
        self._copy: Any = None
        self._lock = threading.Lock()

    def ready(self) -> "PrivateTokenizer":
        with self._lock:
            self._made()
        return self

    def _made(self) -> Any:
        if self._copy is None:
            try:
                tok = copy.deepcopy(self.source)
            except Exception:  # noqa: BLE001 - a tokenizer that cannot be copied: the lock still holds within the engine
                tok = copy.copy(self.source)
            if self.truncation_side is not None:
                tok.truncation_side = self.truncation_side
            # The engine's first pass counts every input whole before cutting
            # the long ones itself: transformers' "longer than the specified
            # maximum ... will result in indexing errors" does not apply.
            warned = getattr(tok, "deprecation_warnings", None)
            if isinstance(warned, dict):
                warned["sequence-length-is-longer-than-the-specified-maximum"] = True
            self._copy = tok
        return self._copy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._made()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # other reads (special tokens, is_fast): the caller's tokenizer
        source = self.__dict__.get("source")
        if source is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(source, name)


def private(tokenizer: Any) -> PrivateTokenizer:
    """`tokenizer` as a PrivateTokenizer, copied now: a given one is shared."""
    return (tokenizer if isinstance(tokenizer, PrivateTokenizer) else PrivateTokenizer(tokenizer)).ready()


class PairIds(list):
    """One pair's token ids; `segment` is where its second sequence (token
    type 1) starts."""

    segment: int


class PairEncoder:
    """(query, document) pairs -> token ids and the start of each second
    segment, as the tokenizer makes them for a pair: special tokens added,
    a pair past max_length cut by `strategy` (longest_first: the longer of
    the two loses a token at a time, as CrossEncoder.predict does;
    only_second: the document alone) on the tokenizer's truncation side, or
    refused (mode "error")."""

    def __init__(self, tokenizer: Any, max_length: int, mode: str, strategy: str, token_types: bool) -> None:
        if strategy not in PAIR_TRUNCATIONS:
            raise ValueError(f"pair_truncation must be one of {PAIR_TRUNCATIONS}, got {strategy!r}")
        if mode == "chunk":
            raise ValueError("truncate='chunk' is for embeddings; a rerank engine cuts pairs "
                             "(truncate='right' or 'left') or refuses them ('error')")
        self.tokenizer = private(tokenizer)
        self.max_length = max_length
        self.mode = mode
        self.strategy = strategy
        self.token_types = token_types

    def __call__(self, pairs: Sequence[Any], prompt: str = "") -> TokenLists:
        """The pairs' token lists; `prompt` goes in front of each query (as
        CrossEncoder.predict puts its prompt in front of a pair's first text)."""
        queries, docs = check_pairs(pairs)
        if prompt:
            queries = [prompt + q for q in queries]
        if not queries:
            out = TokenLists()
            out.infos = []
            return out
        try:
            enc = self._encode(queries, docs, truncation=False)
        except (UnicodeError, TypeError, ValueError) as e:
            raise admission.untokenizable("pair", list(zip(queries, docs)), e) from e
        n = len(queries)
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        infos = [InputInfo(k, k, False, 1) for k in map(len, ids)]
        long = [i for i, info in enumerate(infos) if info.tokens > self.max_length]
        if long and self.mode == "error":
            i = long[0]
            raise indexed(InvalidInputError(f"pair{where(i, n)} is {infos[i].tokens} tokens long; the model's "
                                            f"limit is {self.max_length} (truncate='right' or 'left' cuts it)"), i, n)
        if long:
            try:
                cut = self._encode([queries[i] for i in long], [docs[i] for i in long], truncation=self.strategy,
                                   max_length=self.max_length)
            except Exception as e:  # the tokenizer cannot cut one (only_second with a query past the limit)
                raise self._uncuttable(queries, docs, long, e) from e
            for j, i in enumerate(long):
                ids[i] = cut["input_ids"][j]
                if types is not None:
                    types[i] = cut["token_type_ids"][j]
                if len(ids[i]) > self.max_length:
                    raise indexed(InvalidInputError(
                        f"pair{where(i, n)} cannot be cut to {self.max_length} tokens with "
                        f"pair_truncation={self.strategy!r} (its query alone is too long)"), i, n)
                infos[i] = InputInfo(infos[i].tokens, len(ids[i]), True, 1)
        out = TokenLists()
        for i, row in enumerate(ids):
            p = PairIds(row)
            t = types[i] if types is not None and self.token_types else None
            p.segment = t.index(1) if t is not None and 1 in t else len(row)
            out.append(p)
        out.infos = infos
        return out

    def _encode(self, queries: list[str], docs: list[str], **kw: Any) -> Any:
        return self.tokenizer(queries, docs, add_special_tokens=True, return_attention_mask=False,
                              return_token_type_ids=self.token_types, **kw)

    def _uncuttable(self, queries: list[str], docs: list[str], long: list[int], error: Exception) -> InvalidInputError:
        """The error for long pairs the tokenizer could not cut together:
        the first that it cannot cut alone named (a call over them all
        fails on any one)."""
        n = len(queries)
        first = long[0]
        for i in long:
            try:
                self._encode([queries[i]], [docs[i]], truncation=self.strategy, max_length=self.max_length)
            except Exception as e:  # noqa: BLE001 - this one
                first, error = i, e
                break
        return indexed(InvalidInputError(f"pair{where(first, n)} cannot be cut to {self.max_length} tokens with "
                                         f"pair_truncation={self.strategy!r}: {error}"), first, n)


def check_pairs(pairs: Any) -> tuple[list[str], list[str]]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise InvalidInputError(f"pairs must be a list of (query, document) pairs, got {type(pairs).__name__}")
    queries, docs = [], []
    for i, p in enumerate(pairs):
        if (isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2
                or not isinstance(p[0], str) or not isinstance(p[1], str)):
            raise InvalidInputError(f"pair{where(i, len(pairs))} must be two strings (query, document)")
        queries.append(p[0])
        docs.append(p[1])
    return queries, docs


def check_documents(query: Any, documents: Any) -> list[str]:
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a str, got {type(query).__name__}")
    bad = not_unicode("query", query)
    if bad is not None:
        raise bad
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise InvalidInputError(f"documents must be a list of str, got {type(documents).__name__}")
    for i, d in enumerate(documents):
        if not isinstance(d, str):
            raise InvalidInputError(f"document{where(i, len(documents))} must be a str, got {type(d).__name__}")
    return list(documents)


def mark_segments(futures: Sequence[cf.Future], token_lists: Sequence[Any]) -> None:
    """Each pair's segment start, carried on its request's future to the worker."""
    for f, ids in zip(futures, token_lists):
        f.segment = getattr(ids, "segment", len(ids))


def segments_of(futures: Sequence[Optional[cf.Future]], lengths: np.ndarray) -> np.ndarray:
    """[B] int64: where each request's token type 1 starts (its length: none;
    also for a request whose caller left, whose row nobody reads)."""
    return np.array([getattr(f, "segment", n) if f is not None else n for f, n in zip(futures, lengths.tolist())],
                    dtype=np.int64)


def ranking(scores: np.ndarray, documents: Sequence[str], top_n: Optional[int],
            return_documents: bool) -> list[RerankResult]:
    """Documents by score, best first (ties: the earlier document first)."""
    order = np.argsort(-scores, kind="stable")
    if top_n is not None:
        order = order[:top_n]
    return [RerankResult(int(i), float(scores[i]), documents[i] if return_documents else None) for i in order]


def check_top_n(top_n: Any) -> Optional[int]:
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InvalidInputError(f"top_n must be a positive int or None, got {top_n!r}")
    return top_n


# ------------------------------------------------------ token classification


@dataclass(frozen=True)
class Entity:
    """A labelled span of the text: `text[start:end]` is `text`, `word` the
    tokenizer's reconstruction of its tokens (what transformers' pipeline
    calls "word"). `index` is the token's position for aggregation "none"
    (None for merged entities)."""

    label: str
    score: float
    start: int
    end: int
    text: str
    word: str
    index: Optional[int] = None


@dataclass
class TokenInput:
    """One text's tokens and what merging needs of them (offsets, special
    tokens); `ids` is what is queued."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[int]


class TokenEncoder:
    """Texts -> token ids with offsets and special-token masks, cut at
    max_length on the tokenizer's side (mode right/left) or refused (error)."""

    def __init__(self, tokenizer: Any, max_length: int, mode: str) -> None:
        if mode == "chunk":
            raise ValueError("truncate='chunk' is for embeddings; a token-classify engine cuts texts "
                             "(truncate='right' or 'left') or refuses them ('error')")
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError("token classification needs a fast tokenizer (character offsets)")
        self.tokenizer = private(tokenizer)
        self.max_length = max_length
        self.mode = mode
        model = getattr(getattr(tokenizer, "_tokenizer", None), "model", None)
        # As transformers' pipeline: a word-aware tokenizer (one with a
        # continuing-subword prefix) says which tokens continue a word.
        self.word_aware = bool(getattr(model, "continuing_subword_prefix", None))

    def __call__(self, texts: Sequence[Any]) -> tuple[list[TokenInput], TokenLists]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"text{where(i, len(texts))} must be a str, got {type(t).__name__}")
        texts = list(texts)
        inputs: list[TokenInput] = []
        infos: list[InputInfo] = []
        if texts:
            try:
                enc = self._encode(texts, truncation=False)
            except (UnicodeError, TypeError, ValueError) as e:
                raise admission.untokenizable("text", texts, e) from e
            long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > self.max_length]
            if long and self.mode == "error":
                i = long[0]
                raise InvalidInputError(
                    f"text{where(i, len(texts))} is {len(enc['input_ids'][i])} tokens long; the model's limit is "
                    f"{self.max_length} (truncate='right' or 'left' cuts it)")
            cut = self._encode([texts[i] for i in long], truncation=True, max_length=self.max_length) if long else None
            at = {i: j for j, i in enumerate(long)}
            for i, text in enumerate(texts):
                full = len(enc["input_ids"][i])
                src, k = (cut, at[i]) if i in at else (enc, i)
                inputs.append(TokenInput(text, src["input_ids"][k], src["offset_mapping"][k],
                                         src["special_tokens_mask"][k]))
                infos.append(InputInfo(full, len(inputs[-1].ids), i in at, 1))
        lists = TokenLists(t.ids for t in inputs)
        lists.infos = infos
        return inputs, lists

    def _encode(self, texts: list[str], **kw: Any) -> Any:
        return self.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True,
                              return_special_tokens_mask=True, return_attention_mask=False,
                              return_token_type_ids=False, **kw)


def _softmax(logits: np.ndarray) -> np.ndarray:
    maxes = np.max(logits, axis=-1, keepdims=True)
    e = np.exp(logits - maxes)
    return e / e.sum(axis=-1, keepdims=True)


class EntityMerger:
    """Per-token logits -> entities, as transformers' token-classification
    pipeline post-processes one text: softmax, special tokens dropped,
    sub-words found from the offsets, then the aggregation strategy's merge
    (none: every token; simple: adjacent tokens of one tag grouped, B- starts
    a new group; first / average / max: each word takes one label first)."""

    def __init__(self, tokenizer: Any, labels: Sequence[str], word_aware: bool) -> None:
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.word_aware = word_aware

    def __call__(self, inp: TokenInput, logits: np.ndarray, strategy: str,
                 ignore: frozenset[str]) -> list[Entity]:
        scores = _softmax(np.asarray(logits, dtype=np.float32))
        pre = self._pre_entities(inp, scores, strategy)
        if strategy in ("none", "simple"):
            tokens = []
            for p in pre:
                k = int(p["scores"].argmax())
                tokens.append({"entity": self.labels[k], "score": p["scores"][k], "index": p["index"],
                               "word": p["word"], "start": p["start"], "end": p["end"]})
        else:
            tokens = self._words(pre, strategy)
        if strategy == "none":
            return [Entity(t["entity"], float(t["score"]), t["start"], t["end"], inp.text[t["start"]:t["end"]],
                           t["word"], t["index"]) for t in tokens if t["entity"] not in ignore]
        return [e for e in self._group(tokens, inp.text) if e.label not in ignore]

    def _pre_entities(self, inp: TokenInput, scores: np.ndarray, strategy: str) -> list[dict]:
        tok, text = self.tokenizer, inp.text
        words = tok.convert_ids_to_tokens(inp.ids)
        out = []
        for idx, token_scores in enumerate(scores):
            if inp.special[idx]:
                continue
            word = words[idx]
            start, end = inp.offsets[idx]
            word_ref = text[start:end]
            if self.word_aware:
                is_subword = len(word) != len(word_ref)
            else:  # the pipeline's fallback heuristic for tokenizers that do not mark sub-words
                is_subword = start > 0 and " " not in text[start - 1 : start + 1]
            if inp.ids[idx] == tok.unk_token_id:
                word = word_ref
                is_subword = False
            out.append({"word": word, "scores": token_scores, "start": start, "end": end, "index": idx,
                        "is_subword": is_subword})
        return out

    def _word(self, group: list[dict], strategy: str) -> dict:
        word = self.tokenizer.convert_tokens_to_string([g["word"] for g in group])
        if strategy == "first":
            s = group[0]["scores"]
            k = int(s.argmax())
            score = s[k]
        elif strategy == "max":
            s = max(group, key=lambda g: g["scores"].max())["scores"]
            k = int(s.argmax())
            score = s[k]
        else:  # average
            avg = np.nanmean(np.stack([g["scores"] for g in group]), axis=0)
            k = int(avg.argmax())
            score = avg[k]
        return {"entity": self.labels[k], "score": score, "word": word, "start": group[0]["start"],
                "end": group[-1]["end"]}

    def _words(self, pre: list[dict], strategy: str) -> list[dict]:
        words, group = [], None
        for p in pre:
            if group is None:
                group = [p]
            elif p["is_subword"]:
                group.append(p)
            else:
                words.append(self._word(group, strategy))
                group = [p]
        if group is not None:
            words.append(self._word(group, strategy))
        return words

    @staticmethod
    def _tag(label: str) -> tuple[str, str]:
        if label.startswith("B-"):
            return "B", label[2:]
        if label.startswith("I-"):
            return "I", label[2:]
        return "I", label

    def _group(self, tokens: list[dict], text: str) -> list[Entity]:
        groups, run = [], []
        for t in tokens:
            if run:
                bi, tag = self._tag(t["entity"])
                _, last = self._tag(run[-1]["entity"])
                if tag == last and bi != "B":
                    run.append(t)
                    continue
                groups.append(self._entity(run, text))
            run = [t]
        if run:
            groups.append(self._entity(run, text))
        return groups

    def _entity(self, run: list[dict], text: str) -> Entity:
        label = run[0]["entity"].split("-", 1)[-1]
        score = float(np.mean(np.nanmean([t["score"] for t in run])))
        start, end = run[0]["start"], run[-1]["end"]
        word = self.tokenizer.convert_tokens_to_string([t["word"] for t in run])
        return Entity(label, score, start, end, text[start:end], word)


def check_labels(labels: Any) -> frozenset[str]:
    """ignore_labels as a set: a list (any collection) of label names."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (Sequence, Set)) \
            or not all(isinstance(x, str) for x in labels):
        raise InvalidInputError(f"ignore_labels must be a list of labels (str), got {labels!r}")
    return frozenset(labels)


def check_aggregation(strategy: Any) -> str:
    if strategy not in AGGREGATIONS:
        raise InvalidInputError(f"aggregation_strategy must be one of {AGGREGATIONS}, got {strategy!r}")
    return strategy


# ------------------------------------------------------- the engine's calls


class TaskCalls:
    """Engine methods of the rerank and token-classify tasks (the Engine
    class inherits them; they use its admission and its futures)."""

    # Set by Engine.__init__ for these tasks.
    _pairs: Optional[PairEncoder]
    _token_encoder: Optional[TokenEncoder]
    _merger: Optional[EntityMerger]
    activation: Optional[str]
    labels: list[str]
    _may_block: Callable[[str], None]

    # ------------------------------------------------------------ rerank

    def submit_pairs(self, pairs: Sequence[tuple[str, str]], *, priority: int = 0,
                     timeout: admission.Timeout = None, prompt_name: str | None = None,
                     prompt: str | None = None) -> list[cf.Future]:
        """Queue (query, document) pairs, each its own request; each future
        yields the pair's raw logits [labels] and carries `.info`
        (InputInfo). Backpressure as submit_many. The prompt as tokenize_pairs."""
        return self.submit_many(self.tokenize_pairs(pairs, prompt_name=prompt_name, prompt=prompt),
                                priority=priority, timeout=timeout)

    async def asubmit_pairs(self, pairs: Sequence[tuple[str, str]], *, priority: int = 0,
                            timeout: admission.Timeout = None,
                            wait: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
                            prompt_name: str | None = None, prompt: str | None = None) -> list[cf.Future]:
        """submit_pairs for the event loop (as asubmit_many)."""
        return await self.asubmit_many(self.tokenize_pairs(pairs, prompt_name=prompt_name, prompt=prompt),
                                       priority=priority, timeout=timeout, wait=wait)

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]], *, prompt_name: str | None = None,
                       prompt: str | None = None) -> TokenLists:
        """Pairs tokenized as submit_pairs queues them (each list's
        `segment`: where the document starts); passed to submit_many or
        asubmit_many, they are queued as they are. The prompt (one of the
        model's `prompts` by name, or given; by default the model's default
        prompt, "" for none) goes in front of each query, as CrossEncoder.predict
        puts it."""
        self._require_task("rerank")
        return self._within_budget(self._pairs(pairs, self._prompt(prompt_name, prompt)))

    def pair_scores(self, logits: Sequence[np.ndarray], raw: bool = False) -> np.ndarray:
        """Scores from the pairs' logits: [n] for a one-logit head, else
        [n, labels]; the engine's activation applied unless raw."""
        n = len(self.labels)
        x = np.stack(logits).astype(np.float32) if len(logits) else np.empty((0, n), np.float32)
        if not raw:
            x = apply_activation(x, self.activation or "none")
        return x[:, 0] if n == 1 else x

    def score(self, pairs: Sequence[tuple[str, str]], *, raw: bool = False, priority: int = 0,
              timeout: Optional[float] = None, prompt_name: str | None = None,
              prompt: str | None = None) -> np.ndarray:
        """Scores of (query, document) pairs, in order: what
        CrossEncoder.predict returns ([n] for a one-logit head, else
        [n, labels]); raw=True: the logits, no activation. prompt_name /
        prompt: as CrossEncoder.predict's (the model's default prompt when
        neither is given)."""
        self._may_block("score")
        futures = self.submit_pairs(pairs, priority=priority, timeout=timeout, prompt_name=prompt_name, prompt=prompt)
        return self.pair_scores(results_of(futures), raw)

    async def ascore(self, pairs: Sequence[tuple[str, str]], *, raw: bool = False, priority: int = 0,
                     timeout: Optional[float] = None, prompt_name: str | None = None,
                     prompt: str | None = None) -> np.ndarray:
        """score, awaited: cancelling it cancels its pairs."""
        futures = await self.asubmit_pairs(pairs, priority=priority, timeout=timeout, prompt_name=prompt_name,
                                           prompt=prompt)
        return self.pair_scores(await all_results(futures), raw)

    def _rank_args(self, query: Any, documents: Any, top_n: Any) -> list[str]:
        self._require_task("rerank")
        if len(self.labels) != 1:
            raise InvalidInputError(f"rerank needs a one-logit head; this model has {len(self.labels)} labels "
                                    "(score() returns every label's scores)")
        check_top_n(top_n)
        return check_documents(query, documents)

    def rerank(self, query: str, documents: Sequence[str], *, top_n: Optional[int] = None,
               return_documents: bool = False, raw: bool = False, priority: int = 0,
               timeout: Optional[float] = None, prompt_name: str | None = None,
               prompt: str | None = None) -> list[RerankResult]:
        """The documents ranked by their score against the query, best
        first (at most top_n of them), each with its index in `documents`.
        A document given more than once is scored once (equal scores: the
        earlier first). prompt_name / prompt: as score's."""
        docs = self._rank_args(query, documents, top_n)
        unique, where = distinct(docs)
        try:
            scores = self.score([(query, d) for d in unique], raw=raw, priority=priority, timeout=timeout,
                                prompt_name=prompt_name, prompt=prompt)
        except InvalidInputError as e:  # about a distinct document: named by its first place in `documents`
            raise reindexed(e, first_places(where)) from e.__cause__
        return ranking(scores[where], docs, top_n, return_documents)

    async def arerank(self, query: str, documents: Sequence[str], *, top_n: Optional[int] = None,
                      return_documents: bool = False, raw: bool = False, priority: int = 0,
                      timeout: Optional[float] = None, prompt_name: str | None = None,
                      prompt: str | None = None) -> list[RerankResult]:
        """rerank, awaited."""
        docs = self._rank_args(query, documents, top_n)
        unique, where = distinct(docs)
        try:
            scores = await self.ascore([(query, d) for d in unique], raw=raw, priority=priority, timeout=timeout,
                                       prompt_name=prompt_name, prompt=prompt)
        except InvalidInputError as e:
            raise reindexed(e, first_places(where)) from e.__cause__
        return ranking(scores[where], docs, top_n, return_documents)

    # ---------------------------------------------------- token classify

    def prepare_extract(self, texts: Sequence[str]) -> tuple[list[TokenInput], TokenLists]:
        """Texts tokenized for extract (what a server tokenizes before
        queueing): the inputs merging needs, and the token lists to queue."""
        self._require_task("token-classify")
        admission.check_texts(texts, "prepare_extract")
        inputs, lists = self._token_encoder(texts)
        return inputs, self._within_budget(lists)

    def entities(self, inputs: Sequence[TokenInput], logits: Sequence[np.ndarray], *,
                 aggregation_strategy: str = "simple", ignore_labels: Sequence[str] = ("O",)) -> list[list[Entity]]:
        """Each text's entities from its tokens' logits."""
        strategy = check_aggregation(aggregation_strategy)
        ignore = check_labels(ignore_labels)
        if len(inputs) != len(logits):  # zip would drop the texts past the shorter list
            raise ValueError(f"entities needs one logits array per input: {len(inputs)} inputs, "
                             f"{len(logits)} logits")
        return [self._merger(inp, row, strategy, ignore) for inp, row in zip(inputs, logits)]

    def extract(self, texts: str | Sequence[str], *, aggregation_strategy: str = "simple",
                ignore_labels: Sequence[str] = ("O",), priority: int = 0,
                timeout: Optional[float] = None):
        """Entities of one text (a list of Entity), or of each text of a list.
        aggregation_strategy as transformers' token-classification pipeline
        (none, simple, first, average, max); labels in ignore_labels are
        dropped (default "O", as the pipeline)."""
        single = isinstance(texts, str)
        self._may_block("extract")
        check_aggregation(aggregation_strategy)
        check_labels(ignore_labels)
        inputs, lists = self.prepare_extract([texts] if single else texts)
        futures = self.submit_many(lists, priority=priority, timeout=timeout)
        out = self.entities(inputs, results_of(futures), aggregation_strategy=aggregation_strategy,
                            ignore_labels=ignore_labels)
        return out[0] if single else out

    async def aextract(self, texts: str | Sequence[str], *, aggregation_strategy: str = "simple",
                       ignore_labels: Sequence[str] = ("O",), priority: int = 0,
                       timeout: Optional[float] = None):
        """extract, awaited."""
        single = isinstance(texts, str)
        check_aggregation(aggregation_strategy)
        check_labels(ignore_labels)
        inputs, lists = self.prepare_extract([texts] if single else texts)
        futures = await self.asubmit_many(lists, priority=priority, timeout=timeout)
        out = self.entities(inputs, await all_results(futures), aggregation_strategy=aggregation_strategy,
                            ignore_labels=ignore_labels)
        return out[0] if single else out


