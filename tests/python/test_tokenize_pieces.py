"""A long list of texts is tokenized in pieces, each queued once tokenized
(engine.TOKENIZE_PIECE_TEXTS): the model runs the first piece while the rest
tokenize, with the same results, the same InputInfos and the same refusals as
a list tokenized whole; where a refusal needs the tokens, the list is
tokenized whole first. The pieces are made small here; no outcome depends on
the machine's speed (the overlap is shown by ordering, not timing)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time

import numpy as np
import pytest

import fastserve
import tiny_models as tm
from fastserve import Engine
from fastserve import engine as engine_mod

PIECE = 4


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(engine_mod, "TOKENIZE_PIECE_TEXTS", PIECE)


@pytest.fixture(scope="module")
def engine():
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False, max_length=16) as e:
        yield e


def encodes(engine, monkeypatch) -> list[int]:
    """The number of texts of each tokenizer call the engine makes from now on."""
    sizes: list[int] = []
    real = engine._encode

    def counted(texts):
        sizes.append(len(texts))
        return real(texts)

    monkeypatch.setattr(engine, "_encode", counted)
    return sizes


def test_a_long_list_is_tokenized_in_pieces_with_the_results_and_infos_of_a_whole_one(engine, small_pieces,
                                                                                      monkeypatch):
    texts = tm.mixed_texts(11, seed=3) + ["a text long enough to be cut at sixteen tokens, " * 3]
    whole = engine.embed(texts[:PIECE])  # a list of PIECE texts or fewer: one call
    sizes = encodes(engine, monkeypatch)
    futures = engine.submit_many(texts)
    assert sizes == [4, 4, 4]
    got = np.stack([f.result(timeout=60) for f in futures])
    np.testing.assert_array_equal(got[:PIECE], whole)
    monkeypatch.setattr(engine_mod, "TOKENIZE_PIECE_TEXTS", 10**6)
    np.testing.assert_array_equal(engine.embed(texts), got)  # tokenized whole: the same rows
    info = futures[-1].info
    assert info.truncated and info.computed_tokens == 16 and info.tokens > 16
    assert [f.info for f in futures[:-1]] == [f.info for f in engine.submit_many(texts[:-1])]


def test_the_model_starts_on_the_first_piece_before_the_last_is_tokenized(engine, small_pieces, monkeypatch):
    first_done = threading.Event()
    real = engine._encode
    calls = []

    def encode(texts):
        calls.append(len(texts))
        if len(calls) == 3:  # the last piece waits for a row of the first
            assert first_done.wait(60), "the first piece never ran while the rest tokenized"
        return real(texts)

    monkeypatch.setattr(engine, "_encode", encode)
    texts = [f"text number {i}" for i in range(10)]
    orig_submit = engine._submit_prefix

    def submit(lists, *args, **kwargs):
        futures = orig_submit(lists, *args, **kwargs)
        if len(calls) == 1:
            futures[0].add_done_callback(lambda f: first_done.set())
        return futures

    monkeypatch.setattr(engine, "_submit_prefix", submit)
    out = engine.embed(texts)
    assert out.shape == (10, 32) and calls == [4, 4, 2] and first_done.is_set()


@pytest.mark.parametrize("bad, message", [(None, r"text at index 9 must be a str, got NoneType"),
                                          ("\ud800", r"text at index 9 is not valid Unicode")])
def test_a_bad_text_late_in_a_long_list_is_refused_before_anything_is_queued(engine, small_pieces, monkeypatch,
                                                                              bad, message):
    before = engine.stats()["submitted"]
    sizes = encodes(engine, monkeypatch)
    texts = [f"text {i}" for i in range(12)]
    texts[9] = bad
    with pytest.raises(fastserve.InvalidInputError, match=message):
        engine.submit_many(texts)
    assert engine.stats()["submitted"] == before and sizes == []


def test_where_a_refusal_needs_the_tokens_a_long_list_is_tokenized_whole_first(small_pieces, monkeypatch):
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False, max_length=16,
                truncate="error") as engine:
        sizes = encodes(engine, monkeypatch)
        texts = [f"text {i}" for i in range(12)]
        texts[10] = "far too long for sixteen tokens, " * 4
        with pytest.raises(fastserve.InvalidInputError, match=r"text at index 10 is \d+ tokens long"):
            engine.submit_many(texts)
        assert sizes == [12] and engine.stats()["submitted"] == 0


def test_a_tokenizer_failure_in_a_later_piece_cancels_what_the_call_queued(engine, small_pieces, monkeypatch):
    real = engine._encode
    calls = []

    def encode(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise ValueError("the tokenizer broke")
        return real(texts)

    with tm.held(engine):  # the first piece stays queued
        monkeypatch.setattr(engine, "_encode", encode)
        before = engine.stats()["cancelled"]
        with pytest.raises(fastserve.InvalidInputError, match="could not be tokenized: the tokenizer broke"):
            engine.submit_many([f"text {i}" for i in range(10)])
        assert engine.stats()["cancelled"] == before + PIECE and engine.stats()["queue_depth"] == 0
    monkeypatch.setattr(engine, "_encode", real)
    assert engine.embed([f"text {i}" for i in range(10)]).shape == (10, 32)  # the engine serves on


def test_a_long_list_on_a_closed_engine_is_refused_as_closed(small_pieces):
    engine = Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False)
    engine.close()
    with pytest.raises(fastserve.EngineClosedError):
        engine.submit_many([f"text {i}" for i in range(10)])


def test_a_long_list_through_a_small_queue_waits_for_room_piece_by_piece(small_pieces, monkeypatch):
    texts = tm.mixed_texts(22, seed=5)
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False, max_queue=6) as engine:
        whole = np.stack([engine.embed(t) for t in texts])
        sizes = encodes(engine, monkeypatch)
        np.testing.assert_array_equal(engine.embed(texts), whole)
        # Whole pieces, even where the queue took part of one at a time.
        assert sizes == [4, 4, 4, 4, 4, 2]
        monkeypatch.undo()
        with tm.held(engine):
            queued = [engine.submit(t) for t in texts[:6]]
            with pytest.raises(fastserve.QueueFullError):  # a full queue refuses a list that queued nothing
                engine.submit_many(texts)
            assert engine.stats()["queue_depth"] == 6
        np.testing.assert_array_equal(np.stack([f.result(timeout=60) for f in queued]), whole[:6])
        assert engine.embed(texts).shape == (22, 32)


def test_callers_sending_long_lists_at_once_each_get_their_own_rows(engine, small_pieces, monkeypatch):
    lists = [tm.mixed_texts(13, seed=s) for s in range(4)]
    want = [np.stack([engine.embed(t) for t in texts]) for texts in lists]
    sizes = encodes(engine, monkeypatch)
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(engine.embed, lists))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)
    assert sorted(sizes) == [1] * 4 + [4] * 12


def test_a_prompt_goes_in_front_of_every_piece(engine, small_pieces, monkeypatch):
    texts = tm.mixed_texts(10, seed=7)
    sizes = encodes(engine, monkeypatch)
    got = engine.embed(texts, prompt="query: ")
    assert sizes == [4, 4, 2]
    monkeypatch.setattr(engine_mod, "TOKENIZE_PIECE_TEXTS", 10**6)
    np.testing.assert_array_equal(got, engine.embed(texts, prompt="query: "))
    assert not np.allclose(got, engine.embed(texts))


def test_classify_of_a_long_list_is_tokenized_in_pieces_with_the_same_answers(small_pieces, monkeypatch):
    with Engine(tm.model("bert", classify=True), tm.tokenizer(), task="classify", replicas=1,
                warmup=False) as engine:
        texts = tm.mixed_texts(9, seed=11)
        sizes = encodes(engine, monkeypatch)
        got = engine.classify(texts)
        assert sizes == [4, 4, 1]
        monkeypatch.setattr(engine_mod, "TOKENIZE_PIECE_TEXTS", 10**6)
        assert got == engine.classify(texts) and sizes[-1] == 9


def test_an_awaited_long_list_is_tokenized_off_the_event_loop_which_goes_on_meanwhile(engine, small_pieces,
                                                                                      monkeypatch):
    texts = tm.mixed_texts(10, seed=13)
    want = engine.embed(texts)
    real = engine._encode
    threads, calls = [], []
    loop_ran = threading.Event()

    def encode(batch):
        threads.append(threading.get_ident())
        calls.append(len(batch))
        if len(calls) == 2:  # the loop must run a coroutine while this piece tokenizes
            assert loop_ran.wait(60), "the event loop was blocked while a piece tokenized"
        return real(batch)

    monkeypatch.setattr(engine, "_encode", encode)

    async def main():
        async def beside():
            end = time.monotonic() + 60
            while len(calls) < 2:  # (tokenized whole, on the loop: never two calls)
                assert time.monotonic() < end, "the list was not tokenized in pieces"
                await asyncio.sleep(0.001)
            loop_ran.set()

        other = asyncio.ensure_future(beside())
        got = await engine.aembed(texts)
        await other
        return got, threading.get_ident()

    got, loop_thread = asyncio.run(main())
    np.testing.assert_array_equal(got, want)
    assert calls == [4, 4, 2] and loop_thread not in threads


def test_cancelling_an_awaited_long_list_while_it_tokenizes_cancels_what_it_queued(engine, small_pieces,
                                                                                  monkeypatch):
    real = engine._encode
    second = threading.Event()
    go_on = threading.Event()

    def encode(batch):
        if second.is_set():
            assert go_on.wait(60)
        second.set()
        return real(batch)

    async def main():
        with tm.held(engine):  # the first piece stays queued
            monkeypatch.setattr(engine, "_encode", encode)
            before = engine.stats()["cancelled"]
            call = asyncio.ensure_future(engine.asubmit_many([f"text {i}" for i in range(10)]))
            end = time.monotonic() + 60
            while not (second.is_set() and engine.stats()["queue_depth"] == PIECE):
                assert time.monotonic() < end, "the first piece was never queued"
                await asyncio.sleep(0.001)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            go_on.set()
            assert engine.stats()["cancelled"] == before + PIECE and engine.stats()["queue_depth"] == 0

    asyncio.run(main())


@pytest.mark.parametrize("timeout", [30.0, lambda: 30.0])
def test_a_long_list_with_a_timeout_is_tokenized_whole_so_its_deadline_is_judged_whole(engine, small_pieces,
                                                                                      monkeypatch, timeout):
    # The scheduler refuses a list whose own work misses its deadline only
    # when it sees the whole list at once.
    sizes = encodes(engine, monkeypatch)
    texts = tm.mixed_texts(10, seed=19)
    assert engine.embed(texts, timeout=timeout).shape == (10, 32)
    assert sizes == [10]


def test_where_the_queue_could_refuse_a_text_a_long_list_is_tokenized_whole(small_pieces, monkeypatch):
    # max_queue_tokens below max_length: a long text is refused by the
    # scheduler, naming its index, before anything of the list is queued.
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False, max_length=16,
                max_queue_tokens=9) as engine:
        sizes = encodes(engine, monkeypatch)
        texts = ["short"] * 12
        texts[9] = "a text of more than nine tokens, cut at sixteen"
        with pytest.raises(fastserve.InvalidInputError, match="request 9"):
            engine.submit_many(texts)
        assert sizes == [12] and engine.stats()["submitted"] == 0


def test_a_tokenizer_giving_an_empty_text_no_tokens_has_long_lists_tokenized_whole(engine, small_pieces,
                                                                                    monkeypatch):
    monkeypatch.setattr(engine, "_empty_text_has_tokens", lambda: False)  # as a tokenizer adding no special tokens
    sizes = encodes(engine, monkeypatch)
    engine.embed(tm.mixed_texts(10, seed=23))
    assert sizes == [10]


def test_an_awaited_long_list_is_the_list_as_it_was_when_called(engine, small_pieces):
    texts = tm.mixed_texts(10, seed=29)
    want = engine.embed(texts)

    async def main():
        buf = list(texts)
        call = asyncio.ensure_future(engine.aembed(buf))
        await asyncio.sleep(0)
        buf.clear()  # the caller's list changed once the call yielded
        return await call

    np.testing.assert_array_equal(asyncio.run(main()), want)


def test_the_pieces_index_like_the_list_they_stand_for():
    pieces = engine_mod._TokenizedPieces([f"t{i}" for i in range(10)], lambda texts: [[len(t)] for t in texts], 4)
    assert pieces[0:2] == [[2], [2]] and len(pieces.lists) == 4  # a whole piece at least
    assert pieces[-1] == [2] and pieces[3:-5] == [[2], [2]] and len(pieces.lists) == 10
    assert pieces.ready(10) and list(pieces) == [[2]] * 10
