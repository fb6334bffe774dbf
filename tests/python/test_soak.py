"""Soak: minutes of mixed load on the default model, after which resident
memory has not grown. Marked slow (not in CI: how far RSS climbs during a
short warm-up depends on which batches the machine's speed happens to form);
run it on demand:

    FASTSERVE_SOAK_S=600 python -m pytest tests/python/test_soak.py -m slow -s

The load: four threads of single texts (some with deadlines too short to
make, some cancelled at once), a thread of lists, and a thread of bad inputs.
RSS is sampled once a second; after the warm-up (a fifth of the run, at least
30 s) it must stay within 5% of its value at the warm-up's end. Throughout,
fixed probe texts must keep their embeddings (within 1e-5), every future must end, and
the engine must stay healthy.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import threading
import time

import numpy as np
import pytest

from fastserve import Engine, InvalidInputError, OverloadedError, QueueFullError, RequestTimeoutError, process
from fastserve.corpus import texts as corpus_texts

pytestmark = pytest.mark.slow


def test_rss_holds_under_minutes_of_mixed_load():
    seconds = float(os.environ.get("FASTSERVE_SOAK_S", "600"))
    warmup = max(30.0, seconds / 5)
    corpus = list(corpus_texts())
    probes = corpus[:8]
    stop = threading.Event()
    counts = {"ok": 0, "timeout": 0, "shed": 0, "cancelled": 0, "refused": 0, "bad": 0, "full": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def count(key: str, n: int = 1) -> None:
        with lock:
            counts[key] += n

    with Engine() as engine:
        expected = engine.embed(probes)

        def singles(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                text = rng.choice(corpus)
                if rng.random() < 0.1:
                    text = " ".join([text] * rng.randint(2, 20))  # long: truncated
                r = rng.random()
                try:
                    fut = engine.submit(text, timeout=0.0005 if r < 0.1 else None)
                except QueueFullError:
                    count("full")
                    continue
                if 0.1 <= r < 0.2 and fut.cancel():
                    count("cancelled")
                    continue
                try:
                    fut.result(timeout=120)
                    count("ok")
                except RequestTimeoutError:
                    count("timeout")
                except OverloadedError:  # a 0.5 ms deadline the scheduler saw it would miss
                    count("shed")
                except cf.CancelledError:
                    count("cancelled")

        def lists() -> None:
            rng = random.Random(99)
            while not stop.is_set():
                got = engine.embed(rng.sample(corpus, rng.randint(2, 64)) + probes)
                np.testing.assert_allclose(got[-len(probes):], expected, atol=1e-5, rtol=0)
                count("ok")

        def bad() -> None:
            rng = random.Random(7)
            inputs = [[], [-1], [10**9], None, 42, [1.5], ["x"]]
            while not stop.is_set():
                x = rng.choice(inputs)
                try:
                    if isinstance(x, list):
                        engine.submit_tokens(x)
                    else:
                        engine.submit(x)  # type: ignore[arg-type]
                except InvalidInputError:
                    count("bad")
                else:
                    count("refused")  # an input that should have been refused was taken
                time.sleep(0.01)

        def guarded(fn, *args):
            def run():
                try:
                    fn(*args)
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    stop.set()
            return threading.Thread(target=run, daemon=True)

        threads = [guarded(singles, i) for i in range(4)] + [guarded(lists), guarded(bad)]
        for t in threads:
            t.start()
        samples: list[tuple[float, int]] = []
        start = time.monotonic()
        while not stop.is_set() and time.monotonic() - start < seconds:
            samples.append((time.monotonic() - start, process.rss_bytes()[0]))
            stop.wait(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "a load thread never finished"
        assert not errors, errors
        assert engine.health()["healthy"]
        np.testing.assert_allclose(engine.embed(probes), expected, atol=1e-5, rtol=0)

    mib = 1 << 20
    base = next(rss for t, rss in samples if t >= warmup)
    after = [rss for t, rss in samples if t >= warmup]
    print(f"\nsoak {seconds:.0f} s: {counts}; RSS at warm-up end {base / mib:.0f} MiB, "
          f"max after {max(after) / mib:.0f} MiB, last {after[-1] / mib:.0f} MiB")
    assert counts["refused"] == 0
    assert counts["ok"] > 0 and counts["bad"] > 0 and counts["timeout"] + counts["shed"] + counts["cancelled"] > 0
    assert max(after) <= 1.05 * base
