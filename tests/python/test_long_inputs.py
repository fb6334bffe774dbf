"""Inputs past the model's limit: truncate="right" | "left" | "error" |
"chunk". A text five times the limit, chunked, equals its windows embedded
one by one by the plain model and combined by hand; the cut sides equal the
tokenizer's own truncation; a chunked text's windows are requests of their
own, cancelled, failed and timed out with the text."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastserve
import tiny_models as tm
from fastserve import Engine
from fastserve.inputs import InputInfo, truncation_mode

MAX = 128


def long_text(times: float = 5.0) -> str:
    """Corpus prose about `times` the model's limit in tokens."""
    from fastserve.corpus import texts

    tok = tm.tokenizer()
    out, n = [], 0
    for t in texts():
        out.append(t)
        n += len(tok.tokenize(t))
        if n >= times * MAX:
            break
    return " ".join(out)


@torch.inference_mode()
def pooled(m, ids: list[int], pooling: str = "mean") -> np.ndarray:
    h = m(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    h = h.last_hidden_state[0]
    return {"mean": h.mean(0), "cls": h[0], "max": h.amax(0)}[pooling].numpy()


def windows_by_hand(ids: list[int], overlap: int) -> list[list[int]]:
    body, room = ids[1:-1], MAX - 2
    out, start = [], 0
    while True:
        out.append([ids[0], *body[start:start + room], ids[-1]])
        if start + room >= len(body):
            return out
        start += room - overlap


@pytest.fixture(scope="module")
def bert():
    return tm.model("bert")


def test_truncate_aliases_and_bad_values():
    assert truncation_mode(True) == "right" and truncation_mode(False) == "error"
    for bad in ("middle", 1, None):
        with pytest.raises(ValueError, match="truncate"):
            truncation_mode(bad)
    with pytest.raises(ValueError, match="chunk_overlap"):
        Engine(tm.model("bert"), tm.tokenizer(), truncate="chunk", chunk_overlap=MAX - 2)
    with pytest.raises(ValueError, match="task='embed'"):
        Engine(tm.model("bert", classify=True), tm.tokenizer(), task="classify", truncate="chunk")


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("overlap", [0, 32])
@pytest.mark.parametrize("normalize", [True, False])
def test_a_text_five_times_the_limit_equals_its_windows_embedded_one_by_one(bert, execution, overlap, normalize):
    text = long_text(5)
    ids = tm.tokenizer()(text)["input_ids"]
    assert len(ids) >= 5 * MAX
    windows = windows_by_hand(ids, overlap)
    rows = np.stack([pooled(bert, w) for w in windows]).astype(np.float64)
    weights = np.array([len(w) for w in windows], dtype=np.float64)
    expected = (rows * weights[:, None]).sum(0) / weights.sum()
    if normalize:
        expected /= np.linalg.norm(expected)
    with Engine(bert, tm.tokenizer(), truncate="chunk", chunk_overlap=overlap, execution=execution,
                normalize=normalize) as engine:
        fut = engine.submit(text)
        got = fut.result(timeout=60)
        short = engine.embed("a short text")
        assert engine.stats()["completed"] == len(windows) + 1
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert fut.info == InputInfo(len(ids), int(weights.sum()), False, len(windows))
    ref = pooled(bert, tm.tokenizer()("a short text")["input_ids"])
    np.testing.assert_allclose(short, F.normalize(torch.tensor(ref), dim=-1).numpy() if normalize else ref, atol=2e-5)


def test_chunked_texts_in_a_list_each_get_their_own_result(bert):
    texts = [long_text(2.5), "short", long_text(1.2)]
    with Engine(bert, tm.tokenizer(), truncate="chunk") as engine:
        together = engine.embed(texts)
        alone = np.stack([engine.embed(t) for t in texts])
        futures = engine.submit_many(texts)
        assert [f.result().shape for f in futures] == [(32,)] * 3
        assert [f.info.chunks for f in futures] == [3, 1, 2]
        assert engine.validate_token_ids([[101] + [2000] * 300 + [102]]).infos[0].chunks == 3
        tokens = engine.tokenize([texts[0]])
        assert len(tokens[0]) > MAX  # whole: submit splits it
        np.testing.assert_allclose(engine.submit_many(tokens)[0].result(), together[0], atol=1e-6)
        asynced = asyncio.run(engine.aembed(texts))
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(asynced, together, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_left_and_right_truncation_equal_the_tokenizers(bert, side):
    tok = type(tm.tokenizer()).from_pretrained(tm.tokenizer().name_or_path, truncation_side=side)
    texts = [long_text(1.5), "short", long_text(3)]
    expected = tok(texts, truncation=True, max_length=MAX)["input_ids"]
    with Engine(bert, tm.tokenizer(), truncate=side) as engine:
        lists = engine.tokenize(texts)
        assert [list(x) for x in lists] == expected
        full = [len(x) for x in tok(texts)["input_ids"]]
        assert lists.infos == [InputInfo(n, min(n, MAX), n > MAX, 1) for n in full]
        fut = engine.submit(texts[0])
        np.testing.assert_allclose(fut.result(), F.normalize(torch.tensor(pooled(bert, expected[0])), dim=-1),
                                   atol=2e-5)
        assert fut.info.truncated and fut.info.tokens == full[0]


def test_without_a_template_the_tokenizer_itself_cuts(bert, monkeypatch):
    """A tokenizer whose special tokens could not be located: right/left
    cuts are the tokenizer's own (texts tokenized again), chunk is refused."""
    monkeypatch.setattr(fastserve.inputs.Template, "detect", classmethod(lambda cls, tok: None))
    tok = type(tm.tokenizer()).from_pretrained(tm.tokenizer().name_or_path, truncation_side="left")
    with Engine(bert, tm.tokenizer(), truncate="left") as engine:
        assert [list(x) for x in engine.tokenize([long_text(1.5)])] == \
            tok([long_text(1.5)], truncation=True, max_length=MAX)["input_ids"]
    with pytest.raises(ValueError, match="chunk"):
        Engine(bert, tm.tokenizer(), truncate="chunk")


def test_windows_are_weighted_by_the_tokens_their_pooling_averaged(tmp_path):
    # Pooling(include_prompt=False): each window's prompt is not pooled, so
    # it is not counted in the window's weight either.
    import st_models as sm

    folder = sm.save("bert", "prompts-excluded", tmp_path / "excluded")
    text = " ".join(["the river runs to the sea and back again"] * 9)
    kw = dict(max_length=32, policy="static", torch_threads=1, replicas=1)
    with Engine(str(folder), truncate="chunk", **kw) as engine:
        windows = []
        inner = engine.runner.run

        def run(batch, *a, **k):
            ids, cu = list(batch.packed_input_ids), list(batch.cu_seqlens)
            windows.extend([int(t) for t in ids[cu[i]:cu[i + 1]]] for i in range(len(cu) - 1))
            return inner(batch, *a, **k)

        engine.runner.run = run
        got = engine.embed(text)
        skipped = engine._pooled_from(engine._prompt(None, None))
    assert len(windows) > 1 and skipped > 0
    with Engine(str(folder), normalize=False, **kw) as raw:
        rows = np.stack([raw.submit_tokens(w).result(timeout=60) for w in windows]).astype(np.float64)
    weights = np.array([len(w) - skipped for w in windows], np.float64)
    want = (rows * weights[:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-6, rtol=0)


def test_cancelling_a_chunked_text_cancels_its_windows(bert):
    with Engine(bert, tm.tokenizer(), truncate="chunk") as engine:
        with tm.held(engine):
            fut = engine.submit(long_text(5))
            n = fut.info.chunks
            tm.until(lambda: engine.stats()["queue_depth"] == n, "the windows to be queued")
            assert fut.cancel()
            assert engine.stats()["queue_depth"] == 0 and engine.stats()["cancelled"] == n
        # a window cancelled on its own fails its text the same way
        with tm.held(engine):
            fut = engine.submit(long_text(3))
            fut._parts[1].cancel()
            assert fut.cancelled() and all(p.cancelled() for p in fut._parts)


def test_cancelling_a_text_of_thousands_of_windows_cancels_each_window_once():
    # Each cancelled window calls the text's cancel() back: it must not walk
    # the windows again (a recursion as deep as the windows are many).
    import concurrent.futures as cf
    import logging

    from fastserve.inputs import Gathered

    calls = []

    class Part(cf.Future):
        def cancel(self) -> bool:
            calls.append(self)
            return super().cancel()

    parts = [Part() for _ in range(3000)]
    text = Gathered(parts, lambda results: results)
    errors = []
    handler = logging.Handler()
    handler.emit = errors.append  # concurrent.futures logs a callback's exception
    logging.getLogger("concurrent.futures").addHandler(handler)
    try:
        assert text.cancel()
    finally:
        logging.getLogger("concurrent.futures").removeHandler(handler)
    assert errors == []
    assert text.cancelled() and all(p.cancelled() for p in parts)
    assert len(calls) == len(parts)  # once each
    assert cf.wait([text], timeout=0).done == {text}  # notified as done
    assert text.cancel()  # again: still cancelled, nothing walked


def test_a_text_whose_windows_all_run_is_not_cancelled():
    # As a Future's: cancel() is False once nothing can be stopped, and the
    # result still comes; one window still queued is enough to cancel it.
    import concurrent.futures as cf

    from fastserve.inputs import Gathered

    parts = [cf.Future() for _ in range(3)]
    text = Gathered(parts, lambda results: results)
    for p in parts:
        assert p.set_running_or_notify_cancel()
    assert not text.cancel() and not text.cancelled()
    for i, p in enumerate(parts):
        p.set_result(i)
    assert text.result(timeout=0) == [0, 1, 2]
    assert not text.cancel()

    parts = [cf.Future() for _ in range(3)]
    text = Gathered(parts, lambda results: results)
    parts[0].set_running_or_notify_cancel()
    parts[1].set_result(1)
    assert text.cancel() and text.cancelled() and parts[2].cancelled() and not parts[0].cancelled()
    assert cf.wait([text], timeout=0).done == {text}


def test_a_window_failure_fails_the_text_and_cancels_the_other_windows(bert):
    with Engine(bert, tm.tokenizer(), truncate="chunk", max_batch_size=1) as engine:
        inner, calls = engine.runner.run, []

        def failing_second(batch):
            calls.append(batch)
            if len(calls) == 2:
                raise RuntimeError("boom")
            return inner(batch)

        with tm.held(engine) as gate:
            gate.inner = failing_second
            fut = engine.submit(long_text(5))
            other = engine.submit("another caller's text")
        with pytest.raises(fastserve.InferenceError, match="boom"):
            fut.result(timeout=30)
        assert other.result(timeout=30).shape == (32,)  # nothing else lost
        tm.until(lambda: all(p.done() for p in fut._parts), "every window to end")
        assert sum(p.cancelled() for p in fut._parts) >= 1


def test_a_chunked_text_past_its_deadline_fails_whole(bert):
    clock = fastserve._core.ManualClock(0.0)
    with Engine(bert, tm.tokenizer(), truncate="chunk", clock=clock) as engine:
        with tm.held(engine):
            fut = engine.submit(long_text(3), timeout=1.0)
            kept = engine.submit("no deadline")
            clock.advance(2.0)
        with pytest.raises(fastserve.RequestTimeoutError):
            fut.result(timeout=30)
        tm.until(lambda: all(p.done() for p in fut._parts), "every window to end")
        assert not any(p.exception() is None for p in fut._parts if not p.cancelled())  # none computed
        assert engine.stats()["expired"] >= 1
        assert kept.result(timeout=30).shape == (32,)


def test_a_chunked_texts_priority_applies_to_every_window(bert):
    clock = fastserve._core.ManualClock(0.0)  # no aging: order by priority alone
    with Engine(bert, tm.tokenizer(), truncate="chunk", clock=clock, max_batch_size=1) as engine:
        order = []
        with tm.held(engine):
            low = engine.submit("queued first, low priority")
            low.add_done_callback(lambda f: order.append("low"))
            high = engine.submit(long_text(3), priority=5)
            for p in high._parts:
                p.add_done_callback(lambda f: order.append("window"))
        low.result(timeout=30)
        high.result(timeout=30)
    assert order == ["window"] * high.info.chunks + ["low"]


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_every_window_of_a_prompted_text_starts_with_the_prompt(bert, execution):
    """A chunked text with a prompt: each window is [CLS] prompt slice [SEP],
    as each would be if it were embedded alone with the prompt."""
    tok = tm.tokenizer()
    text = long_text(3)
    ids = tok("query: " + text)["input_ids"]
    lead = len(tok("query: ")["input_ids"]) - 2  # the prompt's tokens between [CLS] and [SEP]
    head, body, room = ids[1:1 + lead], ids[1 + lead:-1], MAX - 2 - lead
    windows = [[ids[0], *head, *body[a:a + room], ids[-1]] for a in range(0, len(body), room)]
    rows = np.stack([pooled(bert, w) for w in windows]).astype(np.float64)
    weights = np.array([len(w) for w in windows], dtype=np.float64)
    expected = (rows * weights[:, None]).sum(0) / weights.sum()
    with Engine(bert, tok, truncate="chunk", execution=execution, normalize=False) as engine:
        fut = engine.submit(text, prompt="query: ")
        got = fut.result(timeout=60)
        assert fut.info.chunks == len(windows) and fut.info.computed_tokens == int(weights.sum())
        tokens = engine.tokenize([text], prompt="query: ")
        again = engine.submit_many(tokens, prompt="query: ")[0].result(timeout=60)
        with pytest.raises(fastserve.InvalidInputError, match="no room"):
            engine.embed(text, prompt="word " * MAX)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    np.testing.assert_allclose(again, got, atol=1e-6)


def _windows_run(engine) -> list[list[int]]:
    """The sequences every later batch runs (a spy on the runner)."""
    seen: list[list[int]] = []
    inner = engine.runner.run

    def run(batch, *args, **kwargs):
        ids, cu = list(batch.packed_input_ids), list(batch.cu_seqlens)
        seen.extend(ids[cu[i]:cu[i + 1]] for i in range(len(cu) - 1))
        return inner(batch, *args, **kwargs)

    engine.runner.run = run
    return seen


def test_token_ids_of_a_prompted_text_report_the_windows_the_text_does(bert):
    """Token-id lists (submit_many, submit_tokens, validate_token_ids, the
    HTTP token-id input) with a prompt: every window starts with it, and
    their info counts those windows, as the text's does."""
    text = long_text(3)
    with Engine(bert, tm.tokenizer(), truncate="chunk", replicas=1) as engine:
        want = engine.submit(text, prompt="query: ")
        want.result(timeout=60)
        ids = list(engine.tokenize([text], prompt="query: ")[0])
        seen = _windows_run(engine)
        for fut in (engine.submit_many([ids], prompt="query: ")[0], engine.submit_tokens(ids, prompt="query: ")):
            fut.result(timeout=60)
            assert fut.info == want.info and fut.info.chunks > 1
        assert engine.validate_token_ids([ids], prompt="query: ").infos == [want.info]
    assert len(seen) == 2 * want.info.chunks and sum(map(len, seen)) == 2 * want.info.computed_tokens


def test_bare_token_ids_count_the_special_tokens_each_window_gets(bert):
    tok = tm.tokenizer()
    ids = tok(long_text(3), add_special_tokens=False)["input_ids"]  # no [CLS] / [SEP]
    with Engine(bert, tok, truncate="chunk", replicas=1) as engine:
        seen = _windows_run(engine)
        fut = engine.submit_tokens(ids)
        fut.result(timeout=60)
    assert all(w[0] == tok.cls_token_id and w[-1] == tok.sep_token_id for w in seen)
    assert fut.info.chunks == len(seen) and fut.info.computed_tokens == sum(map(len, seen))


def test_a_prompts_trailing_space_that_joins_the_text_is_not_repeated_in_every_window():
    """Byte-level BPE: "query: " alone ends in a token of its own ("Ġ"),
    which in front of a text joins its first word ("Ġthe"): windows after
    the first start with the prompt's other tokens, not the text's first word."""
    from test_text_encoder import _trained
    from transformers import AutoConfig, AutoModel

    tok = _trained("bpe")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("roberta", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64, max_position_embeddings=34,
                               pad_token_id=tok.pad_token_id)
    model = AutoModel.from_config(cfg).eval()
    text = "the " + " ".join(["a river runs to a sea"] * 20)
    prompt_ids = tok("query: ", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(prompt_ids)[-1] == "Ġ"
    with Engine(model, tok, truncate="chunk", max_length=32, replicas=1) as engine:
        seen = _windows_run(engine)
        engine.submit(text, prompt="query: ").result(timeout=60)
    first_word = tok("query: " + text, add_special_tokens=False)["input_ids"][len(prompt_ids) - 1]
    assert len(seen) > 2
    for w in seen[1:]:
        assert w[1:len(prompt_ids)] == prompt_ids[:-1] and w[len(prompt_ids)] != first_word


def test_a_single_chunked_text_the_queue_cannot_hold_whole_is_refused_leaving_no_trace(bert):
    """A text's windows are queued all or none: refused, nothing of it was
    queued, submitted or cancelled (the reason is the scheduler's: the queue
    here, a predicted miss of the deadline as OverloadedError otherwise)."""
    with Engine(bert, tm.tokenizer(), truncate="chunk", replicas=1, max_queue=12) as engine:
        with tm.held(engine):
            waiting = [engine.submit(f"text {i}") for i in range(6)]  # 6 of the 12 places taken
            before = engine.stats()
            with pytest.raises(fastserve.QueueFullError, match="queue full") as info:
                engine.submit(long_text(8))  # 8 or more windows; the queue has room for 6 now
            assert not isinstance(info.value, fastserve.OverloadedError)
            after = engine.stats()
            assert engine.stats()["queue_depth"] == 6
        assert all(f.result(timeout=60).shape == (32,) for f in waiting)
        assert engine.submit(long_text(8)).result(timeout=60).shape == (32,)  # with the room back: served
    for key in ("submitted", "cancelled", "queue_depth"):
        assert after[key] == before[key], key
    assert after["rejected"] == before["rejected"] + 1


def test_a_single_chunked_text_the_queue_can_never_hold_is_invalid_input_not_queue_full(bert):
    """More windows or window tokens than the queue's bounds: no retry could
    ever succeed, so InvalidInputError (not the retry-later QueueFullError),
    on an idle engine too, and nothing counted as a refusal."""
    for bounds in ({"max_queue": 5}, {"max_queue_tokens": 300}):  # windows of 128 tokens
        with Engine(bert, tm.tokenizer(), truncate="chunk", replicas=1, **bounds) as engine:
            before = engine.stats()
            with pytest.raises(fastserve.InvalidInputError, match="windows.*can never fit the queue"):
                engine.embed(long_text(8))
            after = engine.stats()
            assert after["rejected"] == before["rejected"] and after["submitted"] == before["submitted"]
            assert engine.embed([long_text(8)]).shape == (1, 32), bounds  # a list queues its windows in turn


def test_the_per_prompt_caches_are_bounded_in_entries_and_in_each_prompts_size(bert, monkeypatch):
    """Prompts come from callers (an HTTP body of up to 2 MB): a long one is
    counted afresh on each call rather than kept, and the entries are capped."""
    from fastserve import engine as engine_mod

    monkeypatch.setattr(engine_mod, "PROMPT_CACHE_ENTRIES", 3)
    with Engine(bert, tm.tokenizer(), truncate="chunk", replicas=1) as engine:
        long_prompt = "ab" * 600  # 1,200 characters, few tokens
        first = engine.embed("a text", prompt=long_prompt)
        assert long_prompt not in engine._prompt_leads
        np.testing.assert_array_equal(engine.embed("a text", prompt=long_prompt), first)  # counted again: the same
        for i in range(5):
            engine.embed("a text", prompt=f"prompt {i}: ")
        assert list(engine._prompt_leads) == ["prompt 0: ", "prompt 1: ", "prompt 2: "]
