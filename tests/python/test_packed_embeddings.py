"""The packed runner's embeddings on every supported transformers version:
one packed batch carries more tokens than the model's position table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm
from fastserve import Engine


@pytest.mark.parametrize("arch", tm.ARCHS)
@pytest.mark.parametrize("task", ["embed", "classify"])
def test_a_packed_batch_longer_than_the_position_table_is_exact(arch, task):
    # The tiny models have 128 positions; the batch below packs several
    # hundred tokens. Nothing may be sized by the batch's total token count
    # (transformers 4.x slices its zero token-type buffer, and DistilBERT its
    # position ids, to the input's length).
    m = tm.model(arch, classify=task == "classify")
    texts = tm.mixed_texts(40, seed=9)
    with Engine(m, tm.tokenizer(), task=task, execution="packed", policy="static") as engine:
        # Hold the worker in a first batch while the rest queue, so the next
        # batch takes them together whatever the machine's speed.
        gate = tm.Gate(engine)
        totals: list[int] = []

        def record(batch):
            totals.append(len(batch.packed_input_ids))
            return gate(batch)

        engine.runner.run = record
        first = engine.submit("hold the worker")
        assert gate.entered.wait(30)
        futures = [engine.submit(t) for t in texts]
        gate.release.set()
        got = [f.result(timeout=60) for f in [first, *futures]]
    assert max(totals) > m.config.max_position_embeddings
    for text, r in zip(["hold the worker", *texts], got):
        row = list(r.scores.values()) if task == "classify" else r
        np.testing.assert_allclose(row, tm.reference(m, text), atol=1e-5, rtol=0)


def test_the_mask_cache_keeps_the_recently_used_within_its_bytes():
    """A T5 bias is [1, heads, L, L] per length (per layer for UMT5): the
    packed runners keep them within a byte bound, least recently used out."""
    from fastserve.families import _MaskCache

    made: list = []

    def make(n):
        def f():
            made.append(n)
            return torch.full((n,), float(n))  # n * 4 bytes
        return f

    cache = _MaskCache(limit=100)
    assert cache.get((0, 10), make(10))[0] == 10 and cache.get((0, 10), make(10))[0] == 10
    cache.get((0, 5), make(5))
    cache.get((0, 10), make(10))  # used again: (0, 5) is now the oldest
    cache.get((0, 12), make(12))  # 40 + 20 + 48 bytes > 100: (0, 5) goes
    assert made == [10, 5, 12] and cache.bytes == 88 and len(cache) == 2
    cache.get((0, 5), make(5))
    assert made[-1] == 5
    assert cache.get((1, 50), make(50)).numel() == 50 and len(cache) == 2 and cache.bytes <= 100  # too big: not kept
    assert cache.get((0, 3), lambda: None) is None and cache.get((0, 3), make(3)) is None  # None is kept too
