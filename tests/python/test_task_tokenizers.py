"""Rerank and token classification tokenize through transformers'
tokenizer(...), which sets the truncation of the Rust tokenizer behind it on
every call (none for the first pass, the cut for long inputs). The engine's
encoders hold a copy of their own, used under a lock: callers on several
threads, and the caller's own uses of the tokenizer it passed in, never
change what another call gets."""

from __future__ import annotations

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
    return Engine(tm.model("bert", classify=True, num_labels=3), tokenizer, task="token-classify", replicas=1,
                  warmup=False)


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
    kinds = [k for k in work for _ in range(2)]
    start = threading.Barrier(len(kinds) + len(others))
    wrong: list[str] = []
    done = threading.Event()

    def run(kind: str) -> None:
        start.wait()
        for _ in range(200):
            try:
                got = tokenize(engine, work[kind])
            except Exception as e:  # noqa: BLE001 - every outcome but the right one is a failure
                wrong.append(f"{kind}: {e!r}")
                continue
            if got != want[kind]:
                wrong.append(f"{kind}: lengths {[len(x) for x in got[0]]}, infos {got[1]}")

    def other(fn) -> None:
        start.wait()
        while not done.is_set():
            fn()

    threads = [threading.Thread(target=run, args=(k,)) for k in kinds]
    helpers = [threading.Thread(target=other, args=(fn,)) for fn in others]
    for t in threads + helpers:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in helpers:
        t.join()
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
