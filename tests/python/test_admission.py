"""The public admission API: Engine.submit_many / asubmit_many /
validate_token_ids and fastserve.wait_all. Tests that need a full queue hold
the worker inside its first batch (tm.Gate), so nothing completes until the
test says: no outcome depends on the machine's speed."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import gc
import threading
import warnings

import numpy as np
import pytest

import fastserve
import tiny_models as tm
from fastserve import Engine

TEXTS = ["a first text", "and a second, somewhat longer one", "third"]


@pytest.fixture(scope="module")
def bert():
    return tm.model("bert")


@pytest.fixture(scope="module")
def engine(bert):
    with Engine(bert, tm.tokenizer()) as e:
        yield e


@contextlib.contextmanager
def held(bert, **kwargs):
    """(engine, gate): one request per batch, a queue of 4, and the worker
    held inside the batch of the request that holds it until gate.release
    (tm.held)."""
    with Engine(bert, tm.tokenizer(), max_batch_size=1, max_queue=4, **kwargs) as engine, \
            tm.held(engine) as gate:
        yield engine, gate


# ------------------------------------------------------------- inputs


def test_texts_and_their_token_ids_give_the_same_results(engine):
    expected = engine.embed(TEXTS)
    ids = engine.tokenize(TEXTS)
    for inputs in (TEXTS, ids, [tuple(x) for x in ids]):
        futures = engine.submit_many(inputs)
        assert len(futures) == len(TEXTS)
        np.testing.assert_allclose(np.stack([f.result(timeout=30) for f in futures]), expected, atol=1e-6)
    np.testing.assert_allclose(engine.embed(ids), expected, atol=1e-6)
    assert engine.submit_many([]) == []


def test_submit_many_futures_carry_timing_like_submit(engine):
    f = engine.submit_many(["timed"])[0]
    f.result(timeout=30)
    assert set(f.timing) == {"queue_s", "inference_s"}


def test_numpy_token_ids_are_taken_as_ints(engine):
    """Token ids as tokenizers return them with return_tensors="np" (a 1-D
    integer array, or numpy integers in a list) are taken as the same ids in
    plain ints; numpy bools and floats are refused as Python's are."""
    ids = engine.tokenize(["numpy ids", "a second text"])
    expected = engine.embed(ids)
    as_arrays = [np.asarray(t, dtype=np.int64) for t in ids]
    as_scalars = [[np.int32(t) for t in ids[0]], list(np.asarray(ids[1], dtype=np.uint16))]
    for inputs in (as_arrays, as_scalars, [list(ids[0]), as_arrays[1]]):
        np.testing.assert_array_equal(engine.embed(inputs), expected)
        assert engine.validate_token_ids(inputs) == ids
    np.testing.assert_array_equal(engine.submit_tokens(as_arrays[1]).result(timeout=30), expected[1])
    for bad in ([np.bool_(True), 102], [101.0, 102], np.asarray([101.0, 102.0]), np.zeros((1, 2), dtype=np.int64)):
        with pytest.raises(fastserve.InvalidInputError, match="token ids at index 1 must"):
            engine.submit_many([ids[0], bad])
    with pytest.raises(fastserve.InvalidInputError, match=r"token id 30522 at index 1 is outside"):
        engine.submit_many([ids[0], np.asarray([101, 30522])])


@pytest.mark.parametrize(
    "inputs, match",
    [
        ([[]], "must not be empty"),
        ([[101, True, 102]], "must all be int"),
        ([[101, 2.0, 102]], "must all be int"),
        ([[101, -1]], r"token id -1 is outside the vocabulary \[0, 30522\)"),
        ([[101, 10**9]], "outside the vocabulary.*the model's own.*tiktoken"),
        ([[101, 102], "text"], "index 1"),
        (["text", [101, 102]], "index 1"),
        ([[101, 102], [101, 102], []], "index 2"),
        ([None], "must be a str or a sequence of int"),
        ([b"bytes"], "must be a str or a sequence of int"),
        ("one text", "submit"),
        (None, "got NoneType"),
        ({"a": 1}, "got dict"),
    ],
)
def test_invalid_inputs_raise_invalid_input_error_and_queue_nothing(engine, inputs, match):
    before = engine.stats()["submitted"]
    with pytest.raises(fastserve.InvalidInputError, match=match):
        engine.submit_many(inputs)
    with pytest.raises(fastserve.InvalidInputError, match=match):
        asyncio.run(engine.asubmit_many(inputs))
    assert engine.stats()["submitted"] == before
    assert isinstance(fastserve.InvalidInputError("x"), ValueError)


def test_submit_tokens_uses_the_same_validator(engine):
    with pytest.raises(fastserve.InvalidInputError, match="must not be empty"):
        engine.submit_tokens([])
    with pytest.raises(fastserve.InvalidInputError, match="sequence of int"):
        engine.submit_tokens("101 102")
    with pytest.raises(fastserve.InvalidInputError, match="outside the vocabulary"):
        engine.submit_tokens([101, engine.vocab_size])


def test_long_token_lists_are_truncated_or_refused(bert):
    long_ids = [101] + [2000] * 300 + [102]
    with Engine(bert, tm.tokenizer()) as e:
        (cut,) = e.validate_token_ids([long_ids])
        # cut as the tokenizer cuts a text: the content, with [CLS] and [SEP] kept
        assert list(cut) == long_ids[: e.max_length - 1] + [102]
        got = e.submit_many([long_ids])[0].result(timeout=30)
        np.testing.assert_allclose(got, e.submit_tokens(cut).result(timeout=30), atol=1e-6)
        # ids without the template are cut as they are
        assert list(e.validate_token_ids([[2000] * 300])[0]) == [2000] * e.max_length
        assert e.validate_token_ids([[101, 102]]) == [[101, 102]]
    with Engine(bert, tm.tokenizer(), truncate=False) as e:
        with pytest.raises(fastserve.InvalidInputError, match=r"index 1 is 302 tokens long; the model's limit is 128"):
            e.submit_many([[101, 102], long_ids])
        with pytest.raises(fastserve.InvalidInputError, match="302 tokens long"):
            e.submit_tokens(long_ids)
        assert e.stats()["submitted"] == 0


def test_a_negative_timeout_is_refused(engine):
    with pytest.raises(ValueError, match="timeout"):
        engine.submit_many(TEXTS, timeout=-1)


# -------------------------------------------------------- backpressure


def test_a_full_queue_refuses_a_call_whole_when_nothing_of_it_is_queued(bert):
    with held(bert) as (engine, gate):
        fillers = engine.submit_many(["fill"] * 4)
        with pytest.raises(fastserve.QueueFullError):
            engine.submit_many(TEXTS)
        assert engine.stats()["queue_depth"] == 4
        gate.release.set()
        assert all(f.result(timeout=30).shape == (32,) for f in fillers)
    assert len(gate.seen) == 5  # the holder and the fillers; nothing of the refused call


def test_a_call_that_made_progress_waits_its_turn_instead_of_failing(bert):
    with held(bert) as (engine, gate):
        texts = [f"text number {i}" for i in range(10)]
        pool = cf.ThreadPoolExecutor(1)
        try:
            call = pool.submit(engine.submit_many, texts)
            tm.until(lambda: engine.stats()["queue_depth"] == 4, "the call's first inputs to fill the queue")
            assert not call.done()  # waiting for room, not failed half served
            with pytest.raises(fastserve.QueueFullError):  # another caller, with nothing queued: refused
                engine.submit_many(["another caller"])
            gate.release.set()
            futures = call.result(timeout=60)
        finally:
            gate.release.set()  # on a failure, lets the waiting call end so the pool can shut down
            pool.shutdown()
        got = np.stack([f.result(timeout=30) for f in futures])
    with Engine(bert, tm.tokenizer()) as e:
        np.testing.assert_allclose(got, e.embed(texts), atol=1e-5)
    assert len(gate.seen) == 11


def test_a_call_waiting_for_room_is_not_counted_as_refused(bert):
    """Waiting for room re-offers the rest of a list until it fits: those
    tries are not refusals. Only a caller that gets QueueFullError counts."""
    with Engine(bert, tm.tokenizer(), max_queue=2, replicas=1) as engine:
        before = engine.stats()
        assert engine.embed([f"text number {i}" for i in range(40)]).shape == (40, 32)
        assert asyncio.run(engine.aembed([f"text {i}" for i in range(40)])).shape == (40, 32)
        after = engine.stats()
    assert after["rejected"] == before["rejected"] and after["refused"] == before["refused"]
    assert after["completed"] == before["completed"] + 80


def test_asubmit_many_waits_for_room_without_blocking_the_loop(bert):
    with held(bert) as (engine, gate):
        # Should the call block the loop, the test would stall until this
        # releases the worker, then find the call done: it fails, not hangs.
        safety = threading.Timer(30, gate.release.set)
        safety.start()

        async def scenario():
            texts = [f"text number {i}" for i in range(10)]
            call = asyncio.create_task(engine.asubmit_many(texts))
            # The call's first 4 inputs fill the queue; the other 6 can only
            # get in once the held worker is released.
            await tm.until_async(lambda: call.done() or engine.stats()["queue_depth"] == 4,
                                 "the call's first inputs to fill the queue")
            assert not call.done(), "the call ended while the worker was held: it blocked the event loop"
            for _ in range(20):  # the loop keeps running this coroutine while the call waits
                await asyncio.sleep(0)
                assert not call.done(), "the call ended while the queue was held full"
            assert engine.stats()["queue_depth"] == 4
            gate.release.set()
            futures = await asyncio.wait_for(call, 60)
            return await asyncio.wait_for(fastserve.wait_all(futures), 60)

        try:
            results = asyncio.run(scenario())
        finally:
            safety.cancel()
    assert len(results) == 10 and all(r.shape == (32,) for r in results)


def test_a_failed_wait_fails_the_call_and_cancels_what_it_queued(bert):
    class GaveUp(Exception):
        pass

    handed = []

    async def give_up(awaitable):  # neither awaits nor cancels what it is handed
        handed.append(awaitable)
        raise GaveUp()

    async def call(engine):
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: logged.append(ctx["message"]))
        return await engine.asubmit_many(["x"] * 10, wait=give_up)

    logged: list[str] = []
    with held(bert) as (engine, gate):
        before = engine.stats()["cancelled"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(GaveUp):
                asyncio.run(call(engine))
            handed.clear()
            gc.collect()
        stats = engine.stats()
    # What the hook dropped was this call's own future, cancelled: no "coroutine
    # was never awaited" nor "Future exception was never retrieved" after it.
    assert not [w for w in caught if "never awaited" in str(w.message)] and not logged
    assert stats["queue_depth"] == 0
    assert stats["cancelled"] - before == 4
    assert len(gate.seen) == 1  # only the holder reached the model


@pytest.mark.parametrize("given", ["a pause", "a running request that then fails"])
def test_a_wait_hook_that_gives_up_leaves_nothing_unawaited_or_unretrieved(given):
    """The hook was handed asyncio.sleep(...) (a coroutine: "never awaited"
    once dropped) or a wrapped future whose later failure asyncio logged as
    "never retrieved"; each is now the call's own future, settled when it
    fails. No model: a fake scheduler answers each chunk."""
    class GaveUp(Exception):
        pass

    first = cf.Future()
    first.set_result("done")
    box = {"running": cf.Future()}  # dropped by the test before it looks for the logs
    box["running"].set_running_or_notify_cancel()  # taken by a worker: cancel() cannot stop it
    replies = [[first], []] if given == "a pause" else [[box["running"]], []]

    def submit(requests, priority, timeout, waiting=False):
        return replies.pop(0) if replies else []

    handed = []

    async def hook(aw):
        handed.append(aw)
        if aw is not None and len(handed) == 1 and given == "a pause":
            return await aw  # the first input, done: the next wait is a pause
        raise GaveUp()

    logged: list[str] = []
    gave_up: list[bool] = []

    async def call():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: logged.append(ctx["message"]))
        try:
            await fastserve.admission.asubmit_all(submit, [[1], [2], [3]], 0, lambda: None, hook)
        except GaveUp:  # not kept (pytest.raises would keep its frames, and the dropped awaitable)
            gave_up.append(True)
        box.pop("running").set_exception(RuntimeError("its batch failed"))  # after the call gave up on it
        await asyncio.sleep(0.05)
        handed.clear()
        gc.collect()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(call())
        gc.collect()
    assert gave_up == [True]
    assert not [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert not logged


def test_a_timeout_callable_is_asked_per_chunk_and_may_stop_the_call(bert, monkeypatch):
    monkeypatch.setattr(fastserve.admission, "CHUNK", 2)  # so a few inputs make several chunks

    def expired():
        raise fastserve.RequestTimeoutError("the caller's deadline passed")

    asked = []

    def expires_after_the_first_chunk():
        asked.append("stop")
        if len(asked) > 1:
            expired()
        return None

    with held(bert) as (engine, gate):
        with pytest.raises(fastserve.RequestTimeoutError):
            engine.submit_many(TEXTS, timeout=expired)
        assert engine.stats()["submitted"] == 1  # the holder only
        # Stopped at its second chunk: the first chunk's inputs are cancelled.
        before = engine.stats()["cancelled"]
        with pytest.raises(fastserve.RequestTimeoutError):
            engine.submit_many(TEXTS, timeout=expires_after_the_first_chunk)
        stats = engine.stats()
        assert asked == ["stop", "stop"]
        assert stats["submitted"] == 3 and stats["cancelled"] - before == 2 and stats["queue_depth"] == 0
        # Seconds left, as the scheduler's timeout, asked once per chunk (4
        # inputs: 2 chunks, and room for all in the queue): 0 has passed by
        # the time the held worker gets to them.
        asked.clear()
        futures = engine.submit_many(TEXTS + ["fourth"], timeout=lambda: asked.append("zero") or 0.0)
        assert asked == ["zero", "zero"]
        gate.release.set()
        for f in futures:
            with pytest.raises(fastserve.RequestTimeoutError):
                f.result(timeout=30)
    assert len(gate.seen) == 1  # only the holder reached the model


# ------------------------------------------------------------ wait_all


def test_wait_all_gives_the_results_in_order_once_all_are_done_from_any_thread():
    async def go():
        futures = [cf.Future() for _ in range(3)]
        group = fastserve.wait_all(futures)
        for i in (2, 0):
            threading.Thread(target=futures[i].set_result, args=(i,)).start()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not group.done()
        threading.Thread(target=futures[1].set_result, args=(1,)).start()
        return await group, await fastserve.wait_all([])

    assert asyncio.run(go()) == ([0, 1, 2], [])


def test_wait_all_fails_with_the_first_failure_at_once():
    async def go():
        futures = [cf.Future() for _ in range(3)]
        group = fastserve.wait_all(futures)
        threading.Thread(target=futures[1].set_exception, args=(fastserve.InferenceError("boom"),)).start()
        with pytest.raises(fastserve.InferenceError, match="boom"):
            await group
        return futures

    futures = asyncio.run(go())
    assert not futures[0].done() and not futures[2].done()  # failed before the others completed


def test_cancelling_wait_all_cancels_the_futures_and_a_cancelled_future_cancels_it():
    async def go():
        futures = [cf.Future() for _ in range(2)]
        group = fastserve.wait_all(futures)
        group.cancel()
        await asyncio.sleep(0)
        cancelled = [f.cancelled() for f in futures]
        other = [cf.Future() for _ in range(2)]
        group2 = fastserve.wait_all(other)
        other[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await group2
        return cancelled, other[1].cancelled()

    assert asyncio.run(go()) == ([True, True], True)


def test_cancelling_an_aembed_task_cancels_its_queued_requests(bert):
    with held(bert) as (engine, gate):
        async def scenario():
            task = asyncio.create_task(engine.aembed(["x"] * 3))
            await tm.until_async(lambda: task.done() or engine.stats()["queue_depth"] == 3,
                                 "the task's inputs to be queued")
            assert not task.done(), "aembed ended while the worker was held"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(scenario())
        assert engine.stats()["queue_depth"] == 0
    assert len(gate.seen) == 1


def test_a_list_waiting_for_room_takes_more_than_the_futures_it_made_ahead_when_room_opens(bert):
    # While a list waits for room it makes engine.WAITING_FUTURES futures
    # ahead of each try; when more room opens at once, the rest are made
    # under the lock, each input still with its own future and row.
    from fastserve import engine as engine_mod

    n = engine_mod.WAITING_FUTURES * 3
    texts = tm.mixed_texts(n + 20, seed=17)
    with Engine(bert, tm.tokenizer(), max_queue=n, replicas=1, warmup=False) as engine:
        want = np.stack([engine.embed(t) for t in texts])
        with tm.held(engine) as gate:
            blockers = engine.submit_many(texts[: n - 10])  # room for 10
            result = {}
            caller = threading.Thread(target=lambda: result.update(rows=engine.embed(texts)))
            caller.start()
            # The list's first 10 queued, the rest waiting for room.
            tm.until(lambda: engine.stats()["queue_depth"] == n, "the list waiting for room")
            gate.release.set()  # the blockers run: room for more than WAITING_FUTURES at once
            caller.join(60)
        assert not caller.is_alive()
        np.testing.assert_array_equal(result["rows"], want)
        np.testing.assert_array_equal(np.stack([f.result() for f in blockers]), want[: n - 10])
