"""Tests of the pybind11 bindings, fastserve._core.

Time is simulated with _core.ManualClock: nothing here sleeps to let time
pass, and no assertion depends on how fast the machine is. The only real-time
waits are bounded joins of helper threads.
"""

from __future__ import annotations

import gc
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from fastserve import _core

# A budget far above anything a test submits, so that every queued request
# fits in one batch unless max_batch_size says otherwise.
BIG = 1 << 20


def make_scheduler(
    clock: _core.ManualClock | None = None,
    *,
    budget: int = BIG,
    policy: str = "static",
    **scheduler_kwargs,
) -> tuple[_core.Scheduler, _core.ManualClock]:
    clock = clock if clock is not None else _core.ManualClock(0.0)
    ctl = _core.ControllerConfig(
        policy=policy, min_tokens=1, max_tokens=max(budget, 1), initial_tokens=budget
    )
    # These tests are about ordering and bookkeeping: no padding floor
    # unless a test sets one.
    scheduler_kwargs.setdefault("min_fill", 0.0)
    sched = _core.Scheduler(_core.SchedulerConfig(**scheduler_kwargs), ctl, clock)
    return sched, clock


def drain(sched: _core.Scheduler) -> list[_core.Batch]:
    """Every batch currently available (next_batch with a zero timeout)."""
    out = []
    while (b := sched.next_batch(0.0)) is not None:
        out.append(b)
    return out


def served_ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b.ids]


# ------------------------------------------------------------------ submit


@pytest.mark.parametrize(
    "make_tokens",
    [
        pytest.param(lambda t: list(t), id="list"),
        pytest.param(lambda t: tuple(t), id="tuple"),
        pytest.param(lambda t: np.asarray(t, dtype=np.int32), id="int32"),
        pytest.param(lambda t: np.asarray(t, dtype=np.int64), id="int64"),
        pytest.param(lambda t: np.asarray(t, dtype=np.int64)[::2], id="int64-strided"),
    ],
)
def test_submit_accepts_sequences_and_integer_arrays(make_tokens):
    sched, _ = make_scheduler()
    base = [101, 2023, 2003, 2**31 - 1, 0, 102]
    tokens = make_tokens(base)
    expected = list(np.asarray(tokens, dtype=np.int64))
    rid = sched.submit(tokens)
    assert isinstance(rid, int) and rid != 0
    assert sched.depth == 1
    assert sched.queued_tokens == len(expected)
    (batch,) = drain(sched)
    assert batch.ids.tolist() == [rid]
    assert batch.packed_input_ids.tolist() == expected
    assert batch.input_ids.tolist() == [expected]


@pytest.mark.parametrize(
    "tokens",
    [
        pytest.param([5, 6, 2**31 - 1], id="plain"),
        pytest.param([5, True, 7], id="a-bool"),
        pytest.param([5, np.int64(6), 7], id="a-numpy-int"),
        pytest.param((5, np.uint8(200)), id="a-numpy-uint8-tuple"),
        pytest.param([5, 6.0], id="a-float"),
        pytest.param([5, -1], id="negative"),
        pytest.param([5, 2**31], id="2^31"),
        pytest.param([5, 2**70], id="2^70"),
        pytest.param([5, "6"], id="a-str"),
        pytest.param([], id="empty"),
    ],
)
def test_a_list_of_ids_is_read_as_its_array_would_be(tokens):
    """A list or tuple of plain ints is read without numpy (tokens_from);
    any other item sends it down the array path: either way the outcome is
    the array's, the same ids or the same error."""
    def outcome(value):
        sched, _ = make_scheduler()
        try:
            sched.submit(value)
        except (TypeError, ValueError) as e:
            return type(e), str(e)
        (batch,) = drain(sched)
        return batch.packed_input_ids.tolist()

    try:
        as_array = np.asarray(tokens)
    except (TypeError, ValueError, OverflowError):
        as_array = np.asarray(tokens, dtype=object)
    assert outcome(tokens) == outcome(as_array)


def test_submit_returns_distinct_nonzero_ids():
    sched, _ = make_scheduler()
    ids = [sched.submit([i + 1]) for i in range(100)]
    assert 0 not in ids
    assert len(set(ids)) == 100


@pytest.mark.parametrize(
    "tokens",
    [
        pytest.param([], id="empty-list"),
        pytest.param(np.array([], dtype=np.int64), id="empty-array"),
        pytest.param(np.zeros((2, 3), dtype=np.int64), id="2d-array"),
        pytest.param([[1, 2], [3, 4]], id="nested-list"),
        pytest.param(7, id="scalar"),
        pytest.param([1, -1, 2], id="negative"),
        pytest.param(np.array([-5], dtype=np.int32), id="negative-int32"),
        pytest.param([2**31], id="2^31"),
        pytest.param(np.array([3, 2**31], dtype=np.int64), id="2^31-int64"),
        pytest.param([2**40], id="2^40"),
        pytest.param([2**63], id="2^63"),
        pytest.param([2**64], id="2^64"),
        pytest.param([[1], [2, 3]], id="ragged"),
    ],
)
def test_submit_rejects_invalid_tokens(tokens):
    sched, _ = make_scheduler()
    with pytest.raises(ValueError):
        sched.submit(tokens)
    assert sched.depth == 0
    assert sched.stats()["submitted"] == 0


def test_submit_rejects_timeout_and_deadline_together():
    sched, clock = make_scheduler()
    with pytest.raises(ValueError, match="timeout or deadline"):
        sched.submit([1, 2], timeout=1.0, deadline=clock.now() + 1.0)
    assert sched.depth == 0


@pytest.mark.parametrize("timeout", [-1.0, -1e-9, math.nan])
def test_submit_rejects_negative_or_nan_timeout(timeout):
    sched, _ = make_scheduler()
    with pytest.raises(ValueError, match="timeout"):
        sched.submit([1], timeout=timeout)
    assert sched.depth == 0


def test_submit_rejects_nan_deadline():
    sched, _ = make_scheduler()
    with pytest.raises(ValueError):
        sched.submit([1], deadline=math.nan)


def test_submit_rejects_request_longer_than_max_request_tokens():
    sched, _ = make_scheduler(max_request_tokens=4)
    sched.submit([1, 2, 3, 4])
    with pytest.raises(ValueError, match="max_request_tokens"):
        sched.submit([1, 2, 3, 4, 5])
    assert sched.depth == 1


@pytest.mark.parametrize(
    "tokens", [[1.5, 2.0], np.array([7.9, 3.0])], ids=["float-list", "float64-array"]
)
def test_submit_rejects_non_integer_tokens(tokens):
    sched, _ = make_scheduler()
    with pytest.raises((TypeError, ValueError)):
        sched.submit(tokens)


# ----------------------------------------------------------------- configs

CONTROLLER_FIELDS = {
    "policy": "aimd",
    "target_latency_s": 0.123,
    "min_tokens": 7,
    "max_tokens": 777,
    "initial_tokens": 70,
    "aimd_step_tokens": 9,
    "aimd_backoff": 0.5,
    "seed_lambda": 0.3,
    "seed_smoothing": 0.05,
    "max_step": 0.2,
    "model_headroom": 0.8,
    "fit_forgetting": 0.75,
}

SCHEDULER_FIELDS = {
    "max_queue_requests": 11,
    "max_queue_tokens": 1111,
    "max_batch_size": 3,
    "max_request_tokens": 99,
    "pad_token_id": 5,
    "aging_s": 2.5,
    "lookahead": 17,
    "cost": "packed",
}


@pytest.mark.parametrize(
    "cls, fields",
    [(_core.ControllerConfig, CONTROLLER_FIELDS), (_core.SchedulerConfig, SCHEDULER_FIELDS)],
    ids=["ControllerConfig", "SchedulerConfig"],
)
def test_config_kwargs_set_fields(cls, fields):
    cfg = cls(**fields)
    for name, value in fields.items():
        assert getattr(cfg, name) == value, name
    cfg.validate()
    # Fields are also writable one by one.
    other = cls()
    for name, value in fields.items():
        setattr(other, name, value)
        assert getattr(other, name) == value


def test_config_defaults():
    c = _core.ControllerConfig()
    assert (c.policy, c.min_tokens, c.max_tokens, c.initial_tokens) == ("model", 32, 16384, 0)
    s = _core.SchedulerConfig()
    assert (s.max_batch_size, s.pad_token_id, s.cost) == (256, 0, "padded")
    assert s.max_queue_requests == 65536 and s.max_queue_tokens == 1 << 24


@pytest.mark.parametrize("cls", [_core.ControllerConfig, _core.SchedulerConfig])
def test_config_unknown_kwarg_is_type_error(cls):
    with pytest.raises(TypeError, match="no_such_option"):
        cls(no_such_option=1)
    with pytest.raises(TypeError):
        cls(min_tokens=1, max_batch_size=1)  # one of these belongs to the other config


def test_scheduler_config_bad_cost_is_value_error():
    with pytest.raises(ValueError, match="cost"):
        _core.SchedulerConfig(cost="nope")
    cfg = _core.SchedulerConfig()
    with pytest.raises(ValueError):
        cfg.cost = "sideways"
    assert cfg.cost == "padded"


@pytest.mark.parametrize(
    "sched_kwargs, ctl_kwargs",
    [
        ({}, {"policy": "nope"}),
        ({}, {"policy": ""}),
        ({}, {"target_latency_s": 0.0}),
        ({}, {"min_tokens": 0}),
        ({}, {"min_tokens": 100, "max_tokens": 10}),
        ({}, {"initial_tokens": -1}),
        ({}, {"aimd_backoff": 1.0}),
        ({}, {"seed_lambda": 0.0}),
        ({}, {"model_headroom": 1.5}),
        ({}, {"fit_forgetting": 1.0}),
        ({"max_batch_size": 0}, {}),
        ({"max_queue_requests": 0}, {}),
        ({"max_queue_tokens": 0}, {}),
        ({"max_request_tokens": 0}, {}),
        ({"aging_s": 0.0}, {}),
        ({"lookahead": 0}, {}),
    ],
)
def test_bad_config_values_raise_value_error_at_scheduler_construction(sched_kwargs, ctl_kwargs):
    # Building the config objects is fine; the Scheduler validates them.
    scfg = _core.SchedulerConfig(**sched_kwargs)
    ccfg = _core.ControllerConfig(**ctl_kwargs)
    with pytest.raises(ValueError):
        _core.Scheduler(scfg, ccfg, _core.ManualClock())
    with pytest.raises(ValueError):
        (scfg if sched_kwargs else ccfg).validate()


def test_scheduler_default_arguments():
    sched = _core.Scheduler()  # steady clock, default configs
    assert not sched.closed
    assert sched.depth == 0
    assert sched.stats()["controller"]["policy"] == "model"
    assert sched.close() == []


# ------------------------------------------------------------- queue limits


def test_queue_full_past_max_queue_requests_then_recovers():
    sched, _ = make_scheduler(max_queue_requests=3)
    ids = [sched.submit([1, 2]) for _ in range(3)]
    with pytest.raises(_core.QueueFullError) as info:
        sched.submit([3])
    assert isinstance(info.value, _core.FastServeError)
    assert sched.depth == 3
    assert sched.stats()["rejected"] == 1
    assert sched.stats()["submitted"] == 3

    assert sorted(served_ids(drain(sched))) == sorted(ids)
    assert sched.depth == 0
    # Room again: the queue works as before.
    more = [sched.submit([4]) for _ in range(3)]
    assert sorted(served_ids(drain(sched))) == sorted(more)


def test_queue_full_past_max_queue_tokens_then_recovers():
    sched, _ = make_scheduler(max_queue_tokens=10)
    a = sched.submit(list(range(1, 7)))  # 6 tokens
    with pytest.raises(_core.QueueFullError):
        sched.submit(list(range(1, 6)))  # 6 + 5 > 10
    assert sched.queued_tokens == 6
    b = sched.submit(list(range(1, 5)))  # exactly 10
    assert sched.queued_tokens == 10
    with pytest.raises(_core.QueueFullError):
        sched.submit([1])
    assert sched.stats()["rejected"] == 2

    assert sorted(served_ids(drain(sched))) == sorted([a, b])
    assert sched.queued_tokens == 0
    c = sched.submit(list(range(1, 11)))  # a full queue's worth fits again
    assert served_ids(drain(sched)) == [c]


def test_queue_full_error_hierarchy():
    assert issubclass(_core.QueueFullError, _core.FastServeError)
    assert issubclass(_core.EngineClosedError, _core.FastServeError)
    assert issubclass(_core.EngineClosedError, RuntimeError)
    assert issubclass(_core.FastServeError, Exception)
    assert not issubclass(_core.QueueFullError, RuntimeError)
    from fastserve import errors

    assert errors.QueueFullError is _core.QueueFullError
    assert errors.EngineClosedError is _core.EngineClosedError
    assert errors.FastServeError is _core.FastServeError


# ---------------------------------------------------------------- ordering


def test_priorities_order_service():
    sched, _ = make_scheduler(max_batch_size=1)
    low = sched.submit([1], priority=0)
    high = sched.submit([2], priority=5)
    mid = sched.submit([3], priority=2)
    neg = sched.submit([4], priority=-3)
    low2 = sched.submit([5], priority=0)
    batches = drain(sched)
    assert all(b.size == 1 for b in batches)
    assert served_ids(batches) == [high, mid, low, low2, neg]


def test_equal_priority_is_fifo():
    sched, clock = make_scheduler(max_batch_size=1)
    ids = []
    for i in range(10):
        ids.append(sched.submit([i + 1]))
        clock.advance(0.001)
    assert served_ids(drain(sched)) == ids


def test_aging_lets_old_low_priority_requests_overtake():
    sched, clock = make_scheduler(max_batch_size=1, aging_s=0.5)
    old = sched.submit([1], priority=0)
    clock.advance(10.0)  # 20 priority levels of waiting
    new = sched.submit([2], priority=3)
    assert served_ids(drain(sched)) == [old, new]


# ------------------------------------------------------ deadlines, cancel


def test_deadline_expiry_reported_in_batch_and_stats():
    sched, clock = make_scheduler(clock=_core.ManualClock(100.0))
    short = sched.submit([1, 2], timeout=1.0)  # deadline 101
    absolute = sched.submit([3], deadline=103.0)
    forever = sched.submit([4, 5, 6])
    clock.advance(2.0)  # t = 102: only `short` has expired
    batch = sched.next_batch(0.0)
    assert batch is not None
    assert batch.expired == [short]
    assert sorted(batch.ids.tolist()) == sorted([absolute, forever])
    st = sched.stats()
    assert st["expired"] == 1
    assert st["queue_depth"] == 0


def test_deadline_expiry_only_batch():
    sched, clock = make_scheduler()
    a = sched.submit([1], timeout=0.5)
    b = sched.submit([2], deadline=clock.now() + 0.25)
    clock.advance(0.5)  # deadline <= now counts as expired
    batch = sched.next_batch(0.0)
    assert batch is not None
    assert batch.size == 0 and len(batch) == 0
    assert batch.ids.shape == (0,)
    assert batch.cu_seqlens.tolist() == [0]
    assert sorted(batch.expired) == sorted([a, b])
    assert sched.stats()["expired"] == 2
    assert sched.next_batch(0.0) is None


def test_request_before_its_deadline_is_served():
    sched, clock = make_scheduler()
    a = sched.submit([1], timeout=5.0)
    clock.advance(4.999)
    batch = sched.next_batch(0.0)
    assert batch is not None
    assert batch.ids.tolist() == [a] and batch.expired == []
    assert sched.stats()["expired"] == 0


def test_cancel():
    sched, _ = make_scheduler()
    a = sched.submit([1, 2, 3])
    b = sched.submit([4])
    assert sched.cancel(a) is True
    assert sched.cancel(a) is False  # already cancelled
    assert sched.cancel(123456) is False  # unknown
    assert sched.depth == 1 and sched.queued_tokens == 1
    (batch,) = drain(sched)
    assert batch.ids.tolist() == [b]
    assert sched.cancel(b) is False  # already handed to a worker
    st = sched.stats()
    assert st["cancelled"] == 1
    assert st["submitted"] == 2


# ------------------------------------------------------------ batch layout


def _reference_layouts(rows: list[list[int]], pad: int):
    B = len(rows)
    L = max(len(r) for r in rows)
    input_ids = np.full((B, L), pad, dtype=np.int64)
    mask = np.zeros((B, L), dtype=np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    packed = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    positions = np.concatenate([np.arange(len(r), dtype=np.int64) for r in rows])
    cu = np.zeros(B + 1, dtype=np.int32)
    cu[1:] = np.cumsum([len(r) for r in rows])
    return input_ids, mask, packed, positions, cu


@pytest.mark.parametrize("cost", ["padded", "packed"])
def test_batch_arrays_match_numpy_reference(cost):
    pad = 7
    rng = np.random.default_rng(1234)
    sched, clock = make_scheduler(clock=_core.ManualClock(5.0), pad_token_id=pad, cost=cost)
    by_id = {}
    for n in rng.integers(1, 40, size=25):
        toks = rng.integers(10, 30000, size=int(n)).tolist()
        by_id[sched.submit(toks)] = toks
    clock.advance(0.5)
    batch = sched.next_batch(0.0)
    assert batch is not None and sched.depth == 0
    assert batch.size == len(batch) == 25
    assert sorted(batch.ids.tolist()) == sorted(by_id)
    assert batch.expired == []
    assert batch.seq >= 1
    assert batch.budget == BIG
    assert batch.assembled_at == pytest.approx(5.5)

    rows = [by_id[i] for i in batch.ids.tolist()]
    lengths = [len(r) for r in rows]
    ref_ids, ref_mask, ref_packed, ref_pos, ref_cu = _reference_layouts(rows, pad)

    assert batch.ids.dtype == np.uint64
    assert batch.lengths.dtype == np.int32
    for name in ("input_ids", "attention_mask", "packed_input_ids", "position_ids"):
        assert getattr(batch, name).dtype == np.int64, name
    assert batch.cu_seqlens.dtype == np.int32

    np.testing.assert_array_equal(batch.lengths, lengths)
    np.testing.assert_array_equal(batch.input_ids, ref_ids)
    np.testing.assert_array_equal(batch.attention_mask, ref_mask)
    np.testing.assert_array_equal(batch.packed_input_ids, ref_packed)
    np.testing.assert_array_equal(batch.position_ids, ref_pos)
    np.testing.assert_array_equal(batch.cu_seqlens, ref_cu)
    assert batch.input_ids.shape == (25, max(lengths))
    assert batch.input_ids.flags.c_contiguous

    total = sum(lengths)
    assert batch.total_tokens == total
    assert batch.max_seqlen == max(lengths)
    assert batch.padded_tokens == 25 * max(lengths)
    assert batch.padding_ratio == pytest.approx(1 - total / (25 * max(lengths)))


def test_batch_respects_max_batch_size():
    sched, _ = make_scheduler(max_batch_size=4)
    ids = [sched.submit([i + 1] * 3) for i in range(10)]
    batches = drain(sched)
    assert [b.size for b in batches] == [4, 4, 2]
    assert sorted(served_ids(batches)) == sorted(ids)
    assert len({b.seq for b in batches}) == 3


def test_batch_respects_token_budget():
    sched, _ = make_scheduler(budget=8)  # padded cost: size * max_len <= 8
    for _ in range(6):
        sched.submit([1, 2])
    batches = drain(sched)
    assert [b.size for b in batches] == [4, 2]
    assert all(b.padded_tokens <= 8 for b in batches)


ARRAY_PROPERTIES = [
    "ids",
    "lengths",
    "input_ids",
    "attention_mask",
    "packed_input_ids",
    "position_ids",
    "cu_seqlens",
]


def _one_batch(pad: int = 0) -> _core.Batch:
    sched, _ = make_scheduler(pad_token_id=pad)
    for toks in ([11, 12, 13], [21], [31, 32], [41, 42, 43, 44, 45]):
        sched.submit(toks)
    batch = sched.next_batch(0.0)
    assert batch is not None and batch.size == 4
    return batch


@pytest.mark.parametrize("name", ARRAY_PROPERTIES)
def test_batch_arrays_are_zero_copy(name):
    batch = _one_batch()
    first = getattr(batch, name)
    second = getattr(batch, name)
    assert first.base is not None
    assert np.shares_memory(first, second)
    assert first.ctypes.data == second.ctypes.data


@pytest.mark.parametrize("name", ARRAY_PROPERTIES)
def test_batch_arrays_outlive_the_batch_reference(name):
    sched, _ = make_scheduler(pad_token_id=9)
    for toks in ([11, 12, 13], [21], [31, 32]):
        sched.submit(toks)
    batch = sched.next_batch(0.0)
    arr = getattr(batch, name)
    expected = arr.copy()
    del batch
    del sched
    gc.collect()
    # Churn the allocator so that freed memory would likely be reused.
    junk = [np.full(64, -1, dtype=np.int64) for _ in range(1000)]
    np.testing.assert_array_equal(arr, expected)
    del junk


def test_torch_from_numpy_is_zero_copy_and_warning_free():
    torch = pytest.importorskip("torch")
    batch = _one_batch(pad=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = batch.input_ids
        t = torch.from_numpy(ids)
        mask = torch.from_numpy(batch.attention_mask)
        cu = torch.from_numpy(batch.cu_seqlens)
        packed = torch.from_numpy(batch.packed_input_ids)
    assert t.dtype == torch.int64 and tuple(t.shape) == ids.shape
    assert t.data_ptr() == ids.ctypes.data
    assert mask.dtype == torch.int64 and cu.dtype == torch.int32
    assert t.tolist() == ids.tolist()
    assert int(mask.sum()) == batch.total_tokens == packed.numel()


# ------------------------------------------------------------------- close


def test_close_returns_queued_ids_and_refuses_new_work():
    sched, _ = make_scheduler()
    a = sched.submit([1], priority=0)
    b = sched.submit([2], priority=4)
    c = sched.submit([3], priority=0)
    left = sched.close()
    assert left == [b, a, c]  # queue order
    assert sched.closed
    assert sched.depth == 0 and sched.queued_tokens == 0
    with pytest.raises(_core.EngineClosedError) as info:
        sched.submit([4])
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, _core.FastServeError)
    assert sched.close() == []  # idempotent
    assert sched.next_batch(0.0) is None
    assert sched.next_batch(5.0) is None  # closed and empty: no wait
    st = sched.stats()
    assert st["closed_unserved"] == 3
    assert st["submitted"] == 3
    assert st["rejected"] == 0


def test_close_wakes_a_blocked_next_batch():
    sched, _ = make_scheduler()
    started = threading.Event()
    result: list[object] = []

    def worker():
        started.set()
        result.append(sched.next_batch(timeout=30.0))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    assert started.wait(timeout=10)
    sched.close()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert result == [None]


@pytest.mark.parametrize("timeout", [math.inf, 1e10], ids=["inf", "1e10"])
def test_next_batch_with_huge_timeout_waits_for_work(timeout):
    sched, _ = make_scheduler()
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(sched.next_batch(timeout)), daemon=True)
    thread.start()
    thread.join(timeout=1.0)
    still_waiting = thread.is_alive()
    sched.close()  # wake it either way
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert still_waiting, f"next_batch({timeout}) on an empty queue returned {result!r} at once"


# ------------------------------------------------------------- concurrency


def test_concurrent_submitters_every_id_served_exactly_once():
    n_threads, per_thread = 8, 2000
    total = n_threads * per_thread
    sched, _ = make_scheduler(max_batch_size=64)
    submitted: list[list[int]] = [[] for _ in range(n_threads)]
    served: list[int] = []
    consumer_waiting = threading.Event()
    go = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def producer(k: int) -> None:
        try:
            go.wait(timeout=30)
            for i in range(per_thread):
                submitted[k].append(sched.submit([k + 1, i % 1000 + 1, 7]))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def consumer() -> None:
        try:
            consumer_waiting.set()
            while len(served) < total:
                # A long timeout: if the binding kept the GIL while waiting,
                # no producer could submit and this would stall for 30 s per
                # call, failing the join below.
                batch = sched.next_batch(timeout=30.0)
                if batch is None:
                    break
                served.extend(batch.ids.tolist())
                sched.complete(batch, 0.001)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    cons = threading.Thread(target=consumer, daemon=True)
    cons.start()
    assert consumer_waiting.wait(timeout=10)
    prods = [threading.Thread(target=producer, args=(k,), daemon=True) for k in range(n_threads)]
    for t in prods:
        t.start()
    for t in prods:
        t.join(timeout=120)
        assert not t.is_alive()
    cons.join(timeout=120)
    if cons.is_alive():
        sched.close()
        cons.join(timeout=10)
        pytest.fail(f"consumer stalled after {len(served)} of {total} requests")
    assert not errors, errors

    all_submitted = [i for ids in submitted for i in ids]
    assert len(all_submitted) == total
    assert len(set(all_submitted)) == total
    assert len(served) == total
    assert sorted(served) == sorted(all_submitted)
    st = sched.stats()
    assert st["submitted"] == st["completed"] == total
    assert st["queue_depth"] == 0
    assert sched.close() == []


# ----------------------------------------------------- sharing a short queue


@pytest.mark.parametrize("balance", [True, False])
def test_two_workers_share_a_short_queue_through_the_bindings(balance):
    """With its compute fit measured, a worker leaves an idle worker its share
    of a queue shorter than their budgets (balance_workers, on by default);
    off, it takes its whole budget. Simulated time (the C++ SchedulerBalance
    tests cover the arithmetic)."""
    clock = _core.ManualClock(0.0)
    ctl = _core.ControllerConfig(policy="static", min_tokens=1, max_tokens=1000, initial_tokens=1000)
    cfg = _core.SchedulerConfig(cost="packed", min_fill=0.0, balance_workers=balance)
    assert _core.SchedulerConfig().balance_workers is True
    sched = _core.Scheduler(cfg, ctl, clock, workers=2)
    for k, n in enumerate((100, 400, 800, 200, 600, 1000)):  # measured: 2 ms + 20 us per token
        sched.submit(np.arange(1, n + 1))
        b = sched.next_batch(0.0, k % 2)
        clock.advance(0.002 + 20e-6 * n)
        sched.complete(b, 0.002 + 20e-6 * n)
    assert sched.next_batch(0.0, 1) is None  # worker 1 idle, asking for work
    for _ in range(10):
        sched.submit(np.arange(1, 101))
    first = sched.next_batch(0.0, 0)
    assert first.total_tokens == (500 if balance else 1000)
    assert sched.stats()["balanced"] == (1 if balance else 0)
    if balance:
        assert sched.next_batch(0.0, 1).total_tokens == 500


# ------------------------------------------------------------------- stats

STATS_KEYS = {
    "submitted",
    "admitted",
    "rejected",
    "refused",
    "shed",
    "preempted",
    "balanced",
    "completed",
    "failed",
    "expired",
    "cancelled",
    "closed_unserved",
    "batches",
    "failed_batches",
    "queue_depth",
    "queued_tokens",
    "latency_s",
    "queue_s",
    "batch_compute_s",
    "batch_size",
    "batch_tokens",
    "real_tokens",
    "padded_tokens",
    "padding_ratio",
    "throughput_rps",
    "throughput_tokens_per_s",
    "controller",
    "controllers",
}
SUMMARY_KEYS = {"count", "mean", "p50", "p95", "p99", "max"}


def test_stats_keys_on_a_fresh_scheduler():
    sched, _ = make_scheduler()
    st: dict = dict(sched.stats())
    assert set(st) == STATS_KEYS
    for key in ("latency_s", "queue_s", "batch_compute_s", "batch_size", "batch_tokens"):
        assert set(st[key]) == SUMMARY_KEYS, key
        assert st[key]["count"] == 0 and st[key]["p99"] == 0.0
    for key in STATS_KEYS - {"latency_s", "queue_s", "batch_compute_s", "batch_size",
                             "batch_tokens", "controller", "controllers"}:
        assert st[key] == 0, key
    # The controller's state, and admission's prediction state beside it
    # (nothing measured yet).
    assert st["controller"] == {"policy": "static", "budget_tokens": BIG, "admission_tail_s": 0.0,
                                "admission_fit_intercept_s": 0.0, "admission_fit_slope_s_per_token": 0.0,
                                "admission_cost_factor": 1.0, "admission_arrival_tokens_per_s": 0.0,
                                "admission_pause_share": 0.0}
    assert st["controllers"] == [{"policy": "static", "budget_tokens": BIG}]  # one worker


def test_stats_counters_after_a_known_sequence():
    sched, clock = make_scheduler(max_queue_requests=4)
    # t = 0
    a = sched.submit([1, 2, 3])
    b = sched.submit([4])
    clock.set(0.1)
    c = sched.submit([5, 6], timeout=0.05)  # deadline 0.15
    d = sched.submit([7])
    with pytest.raises(_core.QueueFullError):
        sched.submit([8])
    assert sched.cancel(d)
    clock.set(0.2)
    batch = sched.next_batch(0.0)
    assert batch is not None
    assert sorted(batch.ids.tolist()) == sorted([a, b])
    assert batch.expired == [c]
    assert batch.padding_ratio == 1.0 - 4 / 6
    clock.set(0.5)
    sched.complete(batch, 0.25)

    # A second, failed batch.
    e = sched.submit([9, 9])
    failed = sched.next_batch(0.0)
    assert failed is not None
    assert failed.ids.tolist() == [e]
    sched.fail(failed)

    st = sched.stats()
    assert st["submitted"] == 5
    assert st["rejected"] == 1
    assert st["cancelled"] == 1
    assert st["expired"] == 1
    assert st["completed"] == 2
    assert st["failed"] == 1
    assert st["batches"] == 1
    assert st["failed_batches"] == 1
    assert st["closed_unserved"] == 0
    assert st["queue_depth"] == 0 and st["queued_tokens"] == 0
    assert st["real_tokens"] == 4
    assert st["padded_tokens"] == 6
    assert st["padding_ratio"] == 1.0 - 4 / 6
    lat = st["latency_s"]
    assert lat["count"] == 2
    assert lat["mean"] == pytest.approx(0.5)
    assert lat["max"] == pytest.approx(0.5)
    for q in ("p50", "p95", "p99"):
        assert lat[q] == pytest.approx(0.5, rel=0.05), q
    # queue_s counts every request put into a batch (a, b and e).
    assert st["queue_s"]["count"] == 3
    assert st["batch_compute_s"]["count"] == 1
    assert st["batch_compute_s"]["p50"] == pytest.approx(0.25, rel=0.05)
    assert st["batch_size"]["mean"] == 2
    assert st["batch_tokens"]["mean"] == 4
    # 2 completed requests / 4 real tokens over 0.5 s from first submit to last completion.
    assert st["throughput_rps"] == pytest.approx(4.0)
    assert st["throughput_tokens_per_s"] == pytest.approx(8.0)
    assert st["controller"]["policy"] == "static"
    assert st["controller"]["budget_tokens"] == BIG == sched.budget


def test_stats_latency_percentiles_from_simulated_time():
    sched, clock = make_scheduler(max_batch_size=1)
    latencies = [0.01 * i for i in range(1, 101)]  # 10 ms .. 1 s
    for lat in latencies:
        sched.submit([1, 2])
        clock.advance(lat)
        batch = sched.next_batch(0.0)
        assert batch is not None and batch.size == 1
        sched.complete(batch, lat / 2)
    st = sched.stats()["latency_s"]
    assert st["count"] == 100
    assert st["mean"] == pytest.approx(np.mean(latencies), rel=1e-9)
    assert st["max"] == pytest.approx(1.0)
    assert st["p50"] == pytest.approx(0.50, rel=0.05)
    assert st["p95"] == pytest.approx(0.95, rel=0.05)
    assert st["p99"] == pytest.approx(0.99, rel=0.05)
    compute = sched.stats()["batch_compute_s"]
    assert compute["p50"] == pytest.approx(0.25, rel=0.05)


# -------------------------------------------------------------- controller

ADAPTIVE = ["aimd", "seed", "model"]


def test_static_controller_keeps_its_budget():
    ctl = _core.Controller(_core.ControllerConfig(policy="static", min_tokens=16, max_tokens=4096,
                                                  initial_tokens=512))
    assert ctl.policy == "static"
    assert ctl.budget == 512
    for latency in (10.0, 1e-6, 0.05, 3.0):
        for _ in range(10):
            ctl.observe(tokens=ctl.budget, latency_s=latency)
    assert ctl.budget == 512
    assert ctl.state() == {}


def test_default_initial_budget_is_geometric_mean_of_bounds():
    ctl = _core.Controller(_core.ControllerConfig(policy="static", min_tokens=16, max_tokens=1024))
    assert ctl.budget == 128


@pytest.mark.parametrize("policy", ADAPTIVE)
def test_adaptive_controller_backs_off_when_far_over_target(policy):
    cfg = _core.ControllerConfig(policy=policy, target_latency_s=0.05, min_tokens=32,
                                 max_tokens=8192, initial_tokens=2048)
    ctl = _core.Controller(cfg)
    assert ctl.policy == policy
    start = ctl.budget
    assert start == 2048
    budgets = []
    for i in range(200):
        b = ctl.budget
        # 20 ms + 1 ms per token: over the 50 ms target at any budget, even the floor's.
        ctl.observe(tokens=b, latency_s=0.02 + 1e-3 * b, batch_size=max(1, b // 64), now=0.1 * i)
        budgets.append(ctl.budget)
        assert cfg.min_tokens <= ctl.budget <= cfg.max_tokens
    assert budgets[-1] < start / 4
    if policy == "model":
        # Nothing meets the target: model aims at the throughput knee 4a/b = 80
        # tokens rather than starving throughput at the floor.
        assert 40 <= budgets[-1] <= 160
    else:
        assert budgets[-1] == cfg.min_tokens  # nothing ever meets the target: the floor
    assert budgets[2] < start  # it reacts within a few misses (the fits need two points)
    state = ctl.state()
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in state.items())


@pytest.mark.parametrize("policy", ADAPTIVE)
def test_adaptive_controller_stays_within_bounds_when_latency_is_tiny(policy):
    cfg = _core.ControllerConfig(policy=policy, target_latency_s=0.05, min_tokens=32,
                                 max_tokens=1000, initial_tokens=100)
    ctl = _core.Controller(cfg)
    for i in range(200):
        b = ctl.budget
        ctl.observe(tokens=b, latency_s=1e-4 + 1e-7 * b, now=0.01 * i)
        assert cfg.min_tokens <= ctl.budget <= cfg.max_tokens
    assert ctl.budget > 100  # it grew towards the cap


def test_controller_rejects_invalid_config():
    with pytest.raises(ValueError, match="policy"):
        _core.Controller(_core.ControllerConfig(policy="nope"))
    with pytest.raises(ValueError):
        _core.Controller(_core.ControllerConfig(min_tokens=10, max_tokens=5))


@pytest.mark.parametrize("policy", ["aimd", "seed", "model"])
def test_a_latency_not_finite_is_refused_and_leaves_the_fit_as_it_was(policy):
    ctl = _core.Controller(_core.ControllerConfig(policy=policy, min_tokens=32, max_tokens=8192))
    for i in range(30):
        ctl.observe(tokens=100 * (i % 7 + 1), latency_s=0.002 + 1e-5 * 100 * (i % 7 + 1), now=0.1 * i)
    before = ctl.state()
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="latency_s"):
            ctl.observe(tokens=500, latency_s=bad)
    assert ctl.state() == before


def test_the_top_priority_is_never_stretched_by_pauses():
    # A pause measured, then completions predicted per class: the class at
    # INT_MAX has none above it (priority + 1 overflowed to INT_MIN, which
    # charged it every class's pauses).
    top = 2**31 - 1
    clock = _core.ManualClock(0.0)
    s = _core.Scheduler(_core.SchedulerConfig(cost="packed", preempt_layers=4),
                        _core.ControllerConfig(policy="static", initial_tokens=256), clock, workers=1)

    def batch(priority=0, n=20, secs=0.01):
        s.submit([1] * n, priority=priority)
        b = s.next_batch(0.0)
        s.start(b)
        clock.advance(secs)
        s.complete(b, secs)

    for i in range(6):
        batch(n=20 + 10 * i)
    s.submit([1] * 100)
    low = s.next_batch(0.0)
    s.start(low)
    s.submit([1] * 10, priority=5, timeout=0.05)
    urgent = s.preempt(low, 0.25)
    assert urgent is not None
    s.start(urgent)
    clock.advance(0.005)
    s.complete(urgent, 0.005)
    clock.advance(0.01)
    s.complete(low, 0.02)
    for _ in range(2):
        batch(priority=5, n=10, secs=0.005)
    assert s.stats()["controller"]["admission_pause_share"] > 0
    assert s.predict_completion(10, 0) > s.predict_completion(10, top - 1)  # class 0 is stretched
    assert s.predict_completion(10, top) == s.predict_completion(10, top - 1)


def test_scheduler_feeds_its_controller():
    sched, clock = make_scheduler(budget=2048, policy="aimd")
    # aimd's bounds from make_scheduler are [1, 2048]; far-over-target batches shrink it.
    for _ in range(5):
        sched.submit(list(range(1, 101)))
        batch = sched.next_batch(0.0)
        assert batch is not None
        clock.advance(1.0)
        sched.complete(batch, 10.0)
    assert sched.budget < 2048
    assert sched.stats()["controller"]["policy"] == "aimd"
    assert sched.stats()["controller"]["budget_tokens"] == sched.budget


# -------------------------------------------------------------- ManualClock


def test_manual_clock():
    clock = _core.ManualClock(3.0)
    assert clock.now() == 3.0
    clock.advance(0.5)
    assert clock.now() == 3.5
    clock.set(10.0)
    assert clock.now() == 10.0
    assert _core.ManualClock().now() == 0.0
    sched, _ = make_scheduler(clock=clock)
    assert sched.now() == 10.0
    clock.advance(1.0)
    assert sched.now() == 11.0


# -------------------------------------------------------------------- CUDA


def test_cuda_compiled_is_bool_and_matches_nvcc():
    compiled = _core.cuda_compiled()
    assert isinstance(compiled, bool)
    if shutil.which("nvcc") is not None:
        # CMake's FASTSERVE_CUDA=AUTO compiles CUDA whenever nvcc is found.
        assert compiled is True


def test_cuda_runtime_version_format():
    version = _core.cuda_runtime_version()
    assert isinstance(version, str)
    if _core.cuda_compiled():
        assert re.fullmatch(r"\d+\.\d+", version), version
    else:
        assert version == ""


def test_cuda_device_count_without_gpu():
    count = _core.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        pytest.skip("a CUDA device is visible; covered by test_cuda_device_count_matches_torch")
    assert count == 0


@pytest.mark.gpu
def test_cuda_device_count_matches_torch():
    torch = pytest.importorskip("torch")
    if not _core.cuda_compiled():
        pytest.skip("extension built without CUDA")
    assert _core.cuda_device_count() == torch.cuda.device_count()


# ------------------------------------------------------------------- stubs


def _stub_init_defaults(class_name: str) -> dict[str, object]:
    """Keyword defaults of `class_name.__init__` in _core.pyi, read with ast."""
    import ast

    import fastserve

    stub = Path(fastserve.__file__).with_name("_core.pyi")
    tree = ast.parse(stub.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = init.args
    out: dict[str, object] = {}
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        assert d is not None, f"{class_name}.__init__: {a.arg} has no default in the stub"
        out[a.arg] = ast.literal_eval(d)
    return out


@pytest.mark.parametrize("cls", [_core.ControllerConfig, _core.SchedulerConfig],
                         ids=lambda c: c.__name__)
def test_stub_config_defaults_match_runtime(cls):
    defaults = _stub_init_defaults(cls.__name__)
    runtime = cls()
    fields = {n for n in dir(runtime) if not n.startswith("_") and n != "validate"}
    assert set(defaults) == fields
    for name, value in defaults.items():
        assert getattr(runtime, name) == value, name



def test_type_stubs_match_the_extension(tmp_path):
    # mypy's stubtest imports the built extension and checks that every name
    # in _core.pyi is there and every public name there is in _core.pyi.
    # follow_imports=skip keeps mypy out of numpy and torch (12 s against 55).
    # It cannot read pybind11 signatures; the next test checks those.
    pytest.importorskip("mypy.stubtest")
    allowlist = Path(__file__).with_name("stubtest_allowlist.txt")
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nfollow_imports = skip\n")
    env = dict(os.environ, MYPY_CACHE_DIR=str(tmp_path / "mypy_cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastserve._core", "--allowlist", str(allowlist),
         "--mypy-config-file", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _docstring_parameters(obj: object, name: str):
    """The parameters pybind11 wrote on the first line of obj's docstring
    (`name(self: ..., tokens: object, priority: int = 0) -> int`), parsed as a
    Python signature; a default pybind11 can only print as `<... object at
    0x...>` becomes `...`."""
    import ast

    first = (getattr(obj, "__doc__", None) or "").splitlines()[0]
    m = re.match(re.escape(name) + r"\((.*)\) -> .*$", first)
    assert m, f"{name}: no pybind11 signature in its docstring: {first!r}"
    params = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>", "...", m.group(1))
    return ast.parse(f"def f({params}): pass").body[0].args


def _stub_functions():
    """(qualified name, stub FunctionDef, runtime object) for every function
    and method _core.pyi gives a signature, properties left out."""
    import ast

    import fastserve

    tree = ast.parse(Path(fastserve.__file__).with_name("_core.pyi").read_text())
    out = []

    def walk(body, owner, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef) and hasattr(owner, node.name):  # TypedDicts exist only in the stub
                walk(node.body, getattr(owner, node.name), f"{prefix}{node.name}.")
            elif isinstance(node, ast.FunctionDef):
                if any(isinstance(d, (ast.Name, ast.Attribute)) and getattr(d, "id", getattr(d, "attr", "")) in
                       ("property", "setter") for d in node.decorator_list):
                    continue
                out.append((prefix + node.name, node, getattr(owner, node.name)))

    walk(tree.body, _core, "")
    return out


def _parameter_names(a) -> list[str]:
    """Positional parameter names, then `*`, then keyword-only ones."""
    return [p.arg for p in a.posonlyargs + a.args] + ["*"] + [p.arg for p in a.kwonlyargs]


def _parameter_defaults(a) -> dict[str, object]:
    """Each defaulted parameter's literal default; Ellipsis where the default
    is not a literal (`...`, a constant's name): present, value unchecked."""
    import ast

    positional = a.posonlyargs + a.args
    pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
    pairs += [(p, d) for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
    out: dict[str, object] = {}
    for p, d in pairs:
        try:
            out[p.arg] = ast.literal_eval(d)
        except ValueError:
            out[p.arg] = Ellipsis
    return out


def test_stub_signatures_match_the_extensions_parameters():
    # Parameter names, their order and kinds, and literal defaults, as the
    # extension declares them. The configs' keyword constructors are stub-only
    # sugar over attribute setters (test_stub_config_defaults_match_runtime).
    functions = _stub_functions()
    assert len(functions) >= 20
    checked = 0
    for qualname, stub, runtime in functions:
        if qualname in ("ControllerConfig.__init__", "SchedulerConfig.__init__"):
            continue
        doc = _docstring_parameters(runtime, stub.name)
        assert _parameter_names(stub.args) == _parameter_names(doc), qualname
        want, got = _parameter_defaults(doc), _parameter_defaults(stub.args)
        assert want.keys() == got.keys(), qualname
        for k in want:
            if Ellipsis not in (want[k], got[k]):
                assert got[k] == want[k], f"{qualname}: {k} defaults to {got[k]!r} in the stub, {want[k]!r} at runtime"
        checked += 1
    assert checked == len(functions) - 2


def test_a_request_larger_than_the_token_capacity_is_invalid_not_queue_full():
    # Retrying could never succeed, so it must not look like backpressure.
    sched, _ = make_scheduler(max_queue_tokens=8)
    with pytest.raises(ValueError, match="can never fit max_queue_tokens=8"):
        sched.submit(list(range(1, 10)))
    assert sched.stats()["rejected"] == 0
    sched.submit(list(range(1, 9)))
    assert sched.depth == 1
