"""The packed runner's embeddings on every supported transformers version:
one packed batch carries more tokens than the model's position table."""

from __future__ import annotations

import numpy as np
import pytest

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
