"""What the engine makes of its callers' inputs before they reach a batch:
token ids past the model's vocabulary (a token added to the tokenizer the
model was not resized for, or a TokenLists edited after tokenize) are refused
with a typed error for that caller alone, never failing another caller's
request in the same batch; arguments of the wrong type get InvalidInputError."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import fastserve
import tiny_models as tm
from fastserve import Engine


@pytest.fixture(scope="module")
def grown_tokenizer():
    """The tiny models' tokenizer with one token more than the model has embeddings for."""
    tok = copy.deepcopy(tm.tokenizer())
    tok.add_tokens(["<newtok>"])
    assert tok.convert_tokens_to_ids("<newtok>") == tm.model("bert").config.vocab_size
    return tok


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_a_text_with_a_token_the_model_lacks_is_refused_and_its_batch_neighbour_served(grown_tokenizer, execution):
    with pytest.warns(UserWarning, match="tokenizer has 30523 tokens") as caught:
        engine = Engine(tm.model("bert"), grown_tokenizer, execution=execution, replicas=1, warmup=False)
    assert caught[0].filename == __file__  # attributed to the Engine(...) call
    with engine, tm.held(engine) as gate:
        neighbour = engine.submit("an innocent caller's text")
        with pytest.raises(fastserve.InvalidInputError, match=r"token id 30522 .*outside the model's vocabulary"):
            engine.submit("text with <newtok> inside")
        with pytest.raises(fastserve.InvalidInputError, match="index 1"):
            engine.submit_many(["fine", "a <newtok>"])
        with pytest.raises(fastserve.InvalidInputError, match="token id 30522"):
            engine.tokenize(["a <newtok>"])
        gate.release.set()
        assert neighbour.result(timeout=60).shape == (32,)
        assert engine.stats()["failed"] == 0


def test_token_lists_edited_after_tokenize_are_checked_again():
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False) as engine:
        lists = engine.tokenize(["hello world", "a second text"])
        lists[1][1] = 10**6
        with tm.held(engine) as gate:
            neighbour = engine.submit("an innocent caller's text")
            with pytest.raises(fastserve.InvalidInputError, match=r"token id 1000000 at index 1"):
                engine.submit_many(lists)
            gate.release.set()
            assert neighbour.result(timeout=60).shape == (32,)
        assert engine.stats()["failed"] == 0
        # edited into something other than ints: a typed error too, not min()'s TypeError
        for edit in ("a text", ["101", 102], [101, None], np.array([101, 7592, 102])):
            lists = engine.tokenize(["hello world", "a second text"])
            lists[1] = edit
            with pytest.raises(fastserve.InvalidInputError, match="token ids at index 1 must"):
                engine.submit_many(lists)
        assert engine.stats()["submitted"] == 2


def test_pairs_and_extract_inputs_with_a_token_the_model_lacks_are_refused(grown_tokenizer):
    m = tm.model("bert", classify=True, num_labels=1)
    with pytest.warns(UserWarning), Engine(m, grown_tokenizer, task="rerank", replicas=1, warmup=False) as engine:
        with pytest.raises(fastserve.InvalidInputError, match="token id 30522"):
            engine.score([("query", "fine"), ("query", "a <newtok>")])
        assert engine.score([("query", "fine")]).shape == (1,)
    from test_extract import token_model

    m = token_model("bert")
    with pytest.warns(UserWarning), \
            Engine(m, grown_tokenizer, task="token-classify", replicas=1, warmup=False) as engine:
        with pytest.raises(fastserve.InvalidInputError, match="token id 30522"):
            engine.extract(["a <newtok>"])
        assert len(engine.extract(["fine"])) == 1


@pytest.mark.parametrize("truncate", ["right", "left", "error", "chunk"])
def test_a_max_length_with_no_room_for_text_is_refused_and_a_numpy_int_is_taken(truncate):
    # BERT's [CLS] and [SEP] take 2: max_length=2 accepted every engine, whose
    # every text was then refused (or cut to more than max_length).
    for max_length in (1, 2):
        with pytest.raises(ValueError, match=f"max_length={max_length} leaves no room for text"):
            Engine(tm.model("bert"), tm.tokenizer(), max_length=max_length, truncate=truncate)
    overlap = {"chunk_overlap": np.int64(0)} if truncate == "chunk" else {}
    with Engine(tm.model("bert"), tm.tokenizer(), max_length=np.int64(3), truncate=truncate, replicas=1,
                **overlap) as engine:
        assert engine.embed("a").shape == (32,)
        if truncate != "error":
            assert engine.embed("a longer text").shape == (32,)
        json.dumps(engine.stats())  # a numpy int stored as it came was not JSON


def test_one_long_text_on_a_chunking_engine_is_queued_whole_or_refused_at_once():
    # A single text's windows go in together or not at all: submit() and
    # aembed(str) never wait for room (an event loop would stall), as a
    # single text on any other engine.
    import asyncio

    long_text = "word " * 500  # four windows of 128 tokens
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False, truncate="chunk",
                max_queue=5) as engine:
        with tm.held(engine) as gate:  # the holding request leaves the queue
            fillers = [engine.submit("x"), engine.submit("y")]  # 3 places left (4 windows could fit later)
            with pytest.raises(fastserve.QueueFullError, match="queue full"):
                engine.submit(long_text)

            async def one():
                return await engine.aembed(long_text)

            with pytest.raises(fastserve.QueueFullError, match="queue full"):
                asyncio.run(one())
            assert engine.stats()["queue_depth"] == 2  # nothing of them left queued
            short = engine.submit("word " * 200)  # two windows: room for them
            gate.release.set()
            assert short.result(timeout=60).shape == (32,) and short.info.chunks == 2
            assert all(f.result(timeout=60).shape == (32,) for f in fillers)
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False, truncate="chunk") as engine:
        got = engine.submit(long_text)
        assert got.info.chunks == 4
        assert abs(got.result(timeout=60) - engine.embed([long_text])[0]).max() < 1e-6


@pytest.fixture(scope="module")
def embedder():
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False) as engine:
        yield engine


@pytest.mark.parametrize("kwargs,match", [
    ({"priority": "high"}, "priority must be an int, got str"),
    ({"priority": 1.5}, "priority must be an int, got float"),
    ({"priority": None}, "priority must be an int, got NoneType"),
    ({"priority": True}, "priority must be an int, got bool"),
    ({"priority": 2**40}, r"priority must be within \[-2147483648, 2147483647\]"),
    ({"timeout": "1"}, "timeout must be a number of seconds, got str"),
    ({"timeout": float("nan")}, "timeout must be >= 0 seconds, got nan"),
    ({"timeout": -1}, "timeout must be >= 0 seconds, got -1"),
    ({"prompt_name": ["q"]}, "prompt_name must be a str, got list"),
])
@pytest.mark.parametrize("call", ["embed one", "embed list", "submit_tokens"])
def test_arguments_of_the_wrong_type_get_typed_errors(embedder, kwargs, match, call):
    with pytest.raises(fastserve.InvalidInputError, match=match):
        if call == "embed one":
            embedder.embed("a text", **kwargs)
        elif call == "embed list":
            embedder.embed(["a text", "another"], **kwargs)
        else:
            embedder.submit_tokens([101, 102], **kwargs)
    assert embedder.stats()["queue_depth"] == 0
    assert embedder.embed("still serving").shape == (32,)


def test_numpy_integers_are_priorities(embedder):
    import numpy as np

    assert embedder.embed("a text", priority=np.int64(3)).shape == (32,)


@pytest.mark.parametrize("bad", [None, 123])
def test_tokenize_takes_only_a_list_of_texts(embedder, bad):
    with pytest.raises(fastserve.InvalidInputError, match=f"a list of texts, got {type(bad).__name__}"):
        embedder.tokenize(bad)


def test_extract_checks_its_arguments_before_anything_runs():
    from test_extract import token_model

    m = token_model("bert")
    with Engine(m, tm.tokenizer(), task="token-classify", replicas=1, warmup=False) as engine:
        for bad in (None, 123):
            with pytest.raises(fastserve.InvalidInputError, match=f"a list of texts, got {type(bad).__name__}"):
                engine.extract(bad)
        for labels in (None, "O", [1]):
            with pytest.raises(fastserve.InvalidInputError, match="ignore_labels must be a list of labels"):
                engine.extract("a text", ignore_labels=labels)
        assert engine.stats()["submitted"] == 0
        assert engine.extract("a text", ignore_labels=[]) is not None
