"""Rerank and token classification tokenize through transformers'
tokenizer(...), which sets the truncation of the Rust tokenizer behind it on
every call (none for the first pass, the cut for long inputs). The engine's
encoders hold a copy of their own, used under a lock: callers on several
threads, and the caller's own uses of the tokenizer it passed in, never
change what another call gets."""

from __future__ import annotations

import functools
import threading

import pytest

import tiny_models as tm
from fastserve import Engine

SHORT = [("what is a gpu", "a graphics processor " * 3)] * 4
LONG = [("what is a gpu", "a graphics processor " * 100)] * 4  # past 128 tokens: cut
SHORT_TEXTS = ["Arnold visited Tübingen on Tuesday."] * 4
LONG_TEXTS = [" ".join(["Schwarzenegger"] * 60)] * 4  # 3 word pieces each: cut


def rerank_engine(tokenizer):
    return Engine(tm.model("bert", classify=True, num_labels=1), tokenizer, task="rerank", replicas=1,
                  warmup=False)


def tagger_engine(tokenizer):
    from test_extract import token_model

    return Engine(token_model("bert"), tokenizer, task="token-classify", replicas=1, warmup=False)


def pair_ids(engine, pairs):
    lists = engine.tokenize_pairs(pairs)
    return [list(x) for x in lists], list(lists.infos)


def token_ids(engine, texts):
    _, lists = engine.prepare_extract(texts)
    return [list(x) for x in lists], list(lists.infos)


CASES = [(rerank_engine, pair_ids, SHORT, LONG), (tagger_engine, token_ids, SHORT_TEXTS, LONG_TEXTS)]


def race(engine, tokenize, work: dict, others=()) -> list[str]:
    """Two threads per kind in `work` ({kind: inputs}), 200 calls each, every
    result checked against the kind's result alone; `others` run beside them."""
    want = {kind: tokenize(engine, inputs) for kind, inputs in work.items()}
    wrong: list[str] = []

    def run(kind: str) -> None:
        for _ in range(200):
            try:
                got = tokenize(engine, work[kind])
            except Exception as e:  # noqa: BLE001 - every outcome but the right one is a failure
                wrong.append(f"{kind}: {e!r}")
                continue
            if got != want[kind]:
                wrong.append(f"{kind}: lengths {[len(x) for x in got[0]]}, infos {got[1]}")

    race_fns([functools.partial(run, k) for k in work for _ in range(2)], others)
    return wrong


@pytest.mark.parametrize("make,tokenize,short,long", CASES, ids=["rerank", "token-classify"])
def test_callers_on_several_threads_get_their_own_tokenization(make, tokenize, short, long):
    with make(tm.tokenizer()) as engine:
        assert tokenize(engine, long)[1][0].truncated and not tokenize(engine, short)[1][0].truncated
        assert race(engine, tokenize, {"short": short, "long": long}) == []


@pytest.mark.parametrize("make,tokenize,short,long", CASES, ids=["rerank", "token-classify"])
def test_the_callers_own_use_of_its_tokenizer_meanwhile_changes_nothing(make, tokenize, short, long):
    tok = tm.tokenizer()

    def callers_use() -> None:  # leaves the tokenizer's backend cutting at 8, then not cutting
        tok("a caller's text " * 50, truncation=True, max_length=8)
        tok("another text " * 50, truncation=False)

    with make(tok) as engine:
        assert race(engine, tokenize, {"long": long}, others=[callers_use, callers_use]) == []


# Embeddings: the engine calls tokenizer(...) for a prompt's length (a model
# whose pooling leaves the prompt out), a chunked text's prompt, and texts
# when the tokenizer's Rust backend cannot be called directly.

def test_prompt_lengths_and_the_callers_use_meanwhile_see_nothing_of_each_other(tmp_path):
    import st_models
    from transformers import AutoTokenizer

    from fastserve.st_spec import prompt_length

    folder = st_models.save("bert", "prompts-excluded", tmp_path)
    tok, ref = AutoTokenizer.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    cut: list[int] = []

    def callers_use() -> None:
        tok("a caller's text " * 50, truncation=True, max_length=8)
        n = len(tok("another text " * 50, truncation=False)["input_ids"])
        if n != 102:
            cut.append(n)

    prompts = [f"prompt {i} of many, each with its own tokens " * 3 for i in range(300)]  # past 48: cut
    with Engine(str(folder), tok, replicas=1, warmup=False) as engine:
        def run(mine: list[str]) -> None:
            for p in mine:
                engine._prompt_tokens.clear()  # every call counts its prompt afresh
                if engine._prompt_length(p) != prompt_length(ref, p, engine.max_length):
                    wrong.append(p)

        wrong: list[str] = []
        race_fns([lambda: run(prompts)], others=[callers_use])
    assert wrong == [] and cut == []


@pytest.mark.parametrize("truncate", ["right", "left"])
def test_texts_tokenized_through_transformers_leave_the_callers_tokenizer_alone(monkeypatch, truncate):
    """Where the Rust backend cannot be called directly, texts go through
    tokenizer(...) on the engine's copy: the caller's object keeps the
    truncation its own last call set, and the engine's results do not take it."""
    from fastserve.inputs import Template
    from fastserve.models import TextEncoder

    monkeypatch.setattr(TextEncoder, "_direct_backend", lambda self: None)  # as a tokenizer failing the probe
    monkeypatch.setattr(Template, "detect", classmethod(lambda cls, tok: None))  # texts cut by retokenizing
    tok = tm.tokenizer()
    texts = [" ".join(["Schwarzenegger"] * 60), "a short text"]  # 180 tokens (cut to 128) and 5
    with Engine(tm.model("bert"), tok, replicas=1, warmup=False, truncate=truncate) as engine:
        assert not engine._encode.direct
        want = [list(x) for x in engine.tokenize(texts)]
        assert [len(x) for x in want] == [128, 5]
        for _ in range(3):
            tok("a caller's text " * 50, truncation=True, max_length=8)  # the caller's backend cuts at 8
            assert [list(x) for x in engine.tokenize(texts)] == want
            assert tok.backend_tokenizer.truncation["max_length"] == 8
            engine._prompt_length("a prompt of its own")  # no prompt cache to hit: a new prompt each time
            engine._prompt_tokens.clear()
            assert tok.backend_tokenizer.truncation["max_length"] == 8


def race_fns(fns, others=()) -> None:
    """Each of `fns` on its own thread, started together, with `others`
    looping beside them until all of `fns` have returned."""
    start = threading.Barrier(len(fns) + len(others))
    done = threading.Event()

    def once(fn) -> None:
        start.wait()
        fn()

    def loop(fn) -> None:
        start.wait()
        while not done.is_set():
            fn()

    threads = [threading.Thread(target=once, args=(fn,)) for fn in fns]
    helpers = [threading.Thread(target=loop, args=(fn,)) for fn in others]
    for t in threads + helpers:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in helpers:
        t.join()
