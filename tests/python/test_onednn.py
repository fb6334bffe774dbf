"""oneDNN's shape cache on the CPU (process.onednn_for, shapes.py): float32
batches run with torch's oneDNN switch off and restore it; bf16/fp16 batches
keep oneDNN and are rounded up to a bucket of tokens with ghost sequences
whose rows never reach a caller. The ghost path is checked exactly in
float32 (forced on) for every task, and in bf16 against float32."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

import tiny_models as tm
from fastserve import Engine, gemm, process, shapes

TEXTS = ["a short one", "the quick brown fox jumps over the lazy dog", "x", "a somewhat longer sentence " * 4,
         "word " * 70]


def test_fitting_is_the_most_tokens_whose_target_fits():
    for buckets in (False, True):
        for room in range(0, 3000):
            want = max((t for t in range(1, room + 1) if shapes.target(t, buckets) <= room), default=0)
            assert shapes.fitting(room, buckets) == want, (buckets, room)


def test_buckets_are_few_and_waste_at_most_an_eighth_from_128_tokens():
    sizes = [shapes.bucket(t) for t in range(1, 8193)]
    assert all(b >= t for t, b in zip(range(1, 8193), sizes))
    assert sizes == sorted(sizes)  # monotone
    assert len(set(sizes[:2048])) == 40 and len(set(sizes)) == 56
    assert max((b - t) / t for t, b in zip(range(128, 8193), sizes[127:])) <= 1 / 8
    assert all(shapes.bucket(b) == b for b in set(sizes))  # a bucket is its own bucket
    with pytest.raises(ValueError):
        shapes.bucket(0)


def ghosts_forced(engine: Engine) -> list[int]:
    """Run engine's packed batches through the ghost path (as bf16 does),
    recording how many ghost sequences each batch carried."""
    engine._ghost_pad, engine._ghost_buckets = 0, True
    seen: list[int] = []
    inner = engine.runner.run

    def run(batch, **extra):
        seen.append(getattr(batch, "ghosts", 0))
        return inner(batch, **extra)

    engine.runner.run = run
    return seen


def test_ghost_sequences_change_no_result_embed_and_classify():
    m = tm.model("bert")
    kw = dict(max_length=16, policy="static", max_batch_tokens=4096)  # one batch; ghosts of at most 16 tokens
    with Engine(m, tm.tokenizer(), **kw) as plain, Engine(m, tm.tokenizer(), **kw) as ghosted:
        texts = list(TEXTS)
        lengths = [len(ids) for ids in plain.tokenize(texts)]
        while shapes.bucket(sum(lengths)) - sum(lengths) <= 16:  # until the ghost needs two pieces
            texts.append("another text " * (len(texts) % 5 + 1))
            lengths = [len(ids) for ids in plain.tokenize(texts)]
        seen = ghosts_forced(ghosted)
        want = plain.embed(texts)
        got = ghosted.embed(texts)
    assert seen == [2]
    np.testing.assert_allclose(got, want, atol=1e-6)
    c = tm.model("bert", classify=True)
    with Engine(c, tm.tokenizer(), task="classify") as plain, Engine(c, tm.tokenizer(), task="classify") as ghosted:
        seen = ghosts_forced(ghosted)
        want, got = plain.classify(TEXTS), ghosted.classify(TEXTS)
    assert any(seen) and [g.label for g in got] == [w.label for w in want]
    for g, w in zip(got, want):
        assert g.scores == pytest.approx(w.scores, abs=1e-6)


def test_ghost_sequences_change_no_result_rerank_and_token_classify():
    c = tm.model("bert", classify=True, num_labels=1)
    docs = TEXTS
    with Engine(c, tm.tokenizer(), task="rerank") as plain, Engine(c, tm.tokenizer(), task="rerank") as ghosted:
        seen = ghosts_forced(ghosted)
        want = plain.score([("a query", d) for d in docs])
        got = ghosted.score([("a query", d) for d in docs])
    assert any(seen)
    np.testing.assert_allclose(got, want, atol=1e-6)
    from transformers import AutoModelForTokenClassification

    t = AutoModelForTokenClassification.from_config(tm.config("bert", num_labels=5)).eval()
    with Engine(t, tm.tokenizer(), task="token-classify") as plain, \
            Engine(t, tm.tokenizer(), task="token-classify") as ghosted:
        seen = ghosts_forced(ghosted)
        want, got = plain.extract(TEXTS), ghosted.extract(TEXTS)
    assert any(seen) and got == want


def test_float32_batches_run_with_onednn_off_and_restore_it():
    before = torch._C._get_mkldnn_enabled()
    seen = []
    with Engine(tm.model("bert"), tm.tokenizer()) as eng:
        inner = eng.runner.run
        eng.runner.run = lambda batch, **kw: (seen.append(torch._C._get_mkldnn_enabled()), inner(batch, **kw))[1]
        eng.embed(TEXTS)
        assert eng.stats()["process"]["onednn"] == "off per batch"
    assert seen and not any(seen)
    assert torch._C._get_mkldnn_enabled() == before
    with Engine(tm.model("bert"), tm.tokenizer(), tune_onednn=False) as eng:
        assert eng.stats()["process"]["onednn"] == "left alone"


def test_a_half_precision_engine_left_alone_still_keeps_onednn_on_under_its_batches():
    # tune_onednn=False: the engine changes nothing itself, no token buckets,
    # but a float32 engine's batch must not turn oneDNN off under its
    # products (the switch is process-wide).
    users = process._onednn_users
    m = tm.model("bert")
    seen = []
    with Engine(m, tm.tokenizer()) as fp32, \
            Engine(m, tm.tokenizer(), dtype="bfloat16", tune_onednn=False, replicas=1) as half:
        assert half.stats()["process"]["onednn"] == "left alone, kept on"
        assert process._onednn_users == users + 1
        inner = fp32.runner.run
        fp32.runner.run = lambda batch, **kw: (seen.append(torch._C._get_mkldnn_enabled()), inner(batch, **kw))[1]
        fp32.embed(TEXTS)
        half.embed(TEXTS)
    assert seen and all(seen)  # the float32 engine left it on while the bf16 engine lived
    assert process._onednn_users == users


def _products(monkeypatch, products: str) -> None:
    """The CPU layers' products forced to `products` (gemm.py); "onednn"
    skipped where oneDNN cannot run bfloat16 ones."""
    if products == "onednn" and gemm.onednn_cannot(torch.bfloat16):
        pytest.skip(f"oneDNN cannot run bfloat16 products here: {gemm.onednn_cannot(torch.bfloat16)}")
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", products)


@pytest.mark.parametrize("dtype", ["bfloat16", "autocast"])
def test_half_precision_keeps_onednn_for_every_engine_and_pads_to_buckets(dtype, monkeypatch):
    # Products through torch.mm: oneDNN's shape cache is bounded by the buckets.
    _products(monkeypatch, "mm")
    m = tm.model("bert")
    seen = []
    with Engine(m, tm.tokenizer()) as fp32, Engine(m, tm.tokenizer(), dtype=dtype) as half:
        assert half.stats()["process"]["onednn"] == "on, token buckets"
        tokens = []
        inner = half.runner.run
        half.runner.run = lambda batch, **kw: (tokens.append(int(np.asarray(batch.cu_seqlens)[-1])),
                                               inner(batch, **kw))[1]
        inner32 = fp32.runner.run
        fp32.runner.run = lambda batch, **kw: (seen.append(torch._C._get_mkldnn_enabled()), inner32(batch, **kw))[1]
        want, got = fp32.embed(TEXTS), half.embed(TEXTS)
    # while a half-precision engine lives, a float32 engine leaves oneDNN on (it is process-wide)
    assert seen and all(seen)
    assert tokens and all(shapes.bucket(t) == t for t in tokens)
    assert (got * want).sum(1).min() > 0.99
    assert process._onednn_users == 0  # released at close


@pytest.mark.parametrize("dtype", ["bfloat16", "autocast"])
def test_half_precision_products_in_onednn_pieces_keep_onednn_on_without_buckets(dtype, monkeypatch):
    # gemm.py's pieces bound oneDNN's shape cache themselves: the batches run
    # at their own token counts (at least MIN_ROWS), and nothing is padded.
    _products(monkeypatch, "onednn")
    m = tm.model("bert")
    seen = []
    with Engine(m, tm.tokenizer()) as fp32, Engine(m, tm.tokenizer(), dtype=dtype, replicas=1) as half:
        assert half.stats()["process"]["onednn"] == "on" and half.stats()["gemm"] == "onednn"
        inner32 = fp32.runner.run
        fp32.runner.run = lambda batch, **kw: (seen.append(torch._C._get_mkldnn_enabled()), inner32(batch, **kw))[1]
        want = fp32.embed(TEXTS)
        lengths = [len(ids) for ids in half.tokenize(TEXTS)]
        got = np.stack([half.embed(text) for text in TEXTS])  # one batch each
        stats = half.stats()
    assert seen and all(seen)
    assert stats["real_tokens"] == sum(lengths) and sorted(lengths)[1] >= shapes.MIN_ROWS > min(lengths)
    assert stats["padded_tokens"] == sum(max(n, shapes.MIN_ROWS) for n in lengths)  # no bucket, the floor only
    assert (got * want).sum(1).min() > 0.99
    assert process._onednn_users == 0


def test_token_classify_keeps_the_buckets_with_its_products_in_onednn_pieces(monkeypatch):
    # Its head is a torch product over every token: a new oneDNN shape per
    # token count without the buckets.
    from test_extract import token_model

    _products(monkeypatch, "onednn")
    with Engine(token_model("bert"), tm.tokenizer(), task="token-classify", dtype="bfloat16", replicas=1,
                warmup=False) as engine:
        assert engine.stats()["process"]["onednn"] == "on, token buckets" and engine.stats()["gemm"] == "onednn"
        lengths = [len(ids) for ids in engine.tokenize(TEXTS[:3])]
        for text in TEXTS[:3]:  # one batch each
            engine.extract([text])
        assert engine.stats()["padded_tokens"] == sum(shapes.bucket(n) for n in lengths)


def test_a_layer_that_runs_its_modules_without_buckets_warns_once(monkeypatch):
    # A hook added after the engine was built: that layer's products give
    # oneDNN a shape per token count, which the engine did not plan for.
    _products(monkeypatch, "onednn")
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), dtype="bfloat16", replicas=1, warmup=False) as engine:
        assert engine.stats()["process"]["onednn"] == "on"
        engine.embed(TEXTS)  # the fused layers: no warning
        handle = engine.model.encoder.layer[0].attention.register_forward_hook(lambda mod, inp, out: None)
        try:
            with pytest.warns(RuntimeWarning, match="now runs through its modules"):
                engine.embed(TEXTS)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                engine.embed(TEXTS)  # once
        finally:
            handle.remove()


def test_the_ghost_tokens_a_batch_is_rounded_up_with_count_as_computed_padding(monkeypatch):
    _products(monkeypatch, "mm")
    with Engine(tm.model("bert"), tm.tokenizer(), dtype="bfloat16", replicas=1) as half:
        lengths = [len(ids) for ids in half.tokenize(TEXTS[:3])]
        before = half.stats()
        for text in TEXTS[:3]:  # one batch each
            half.embed(text)
        after = half.stats()
    real = after["real_tokens"] - before["real_tokens"]
    computed = after["padded_tokens"] - before["padded_tokens"]
    assert real == sum(lengths)
    assert computed == sum(shapes.bucket(n) for n in lengths) > real
    assert after["padding_ratio"] > 0


def _child_onednn_state(out) -> None:
    """In a forked child: the switch and registrations as a fresh process has
    them; a float32 batch's context turns oneDNN off and restores it, and a
    bf16 engine can register (it waited for the parent's batch for ever).
    No model runs here: a forked child of a threaded parent is no place for
    OpenMP or the tokenizers' threads."""
    import threading

    try:
        cpu = torch.device("cpu")
        state = [torch._C._get_mkldnn_enabled(), process._onednn_users, process._onednn_off]
        context, what = process.onednn_for(cpu, torch.float32, True)
        with context():
            during = torch._C._get_mkldnn_enabled()
        after = torch._C._get_mkldnn_enabled()
        registered: list[str] = []
        t = threading.Thread(target=lambda: registered.append(process.onednn_for(cpu, torch.bfloat16, True)[1]),
                             daemon=True)
        t.start()
        t.join(30)
        for w in registered:
            process.onednn_release(w)
        out.put((state, what, during, after, registered, process._onednn_users))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put(repr(e))


@pytest.mark.parametrize("during", ["a float32 batch", "a bf16 engine"])
def test_a_forked_child_starts_with_onednn_as_a_fresh_process(during):
    # Forked during a parent's float32 batch, a child kept oneDNN off and a
    # count of batches no thread of it would end (a bf16 engine built there
    # waited for ever); forked while a bf16 engine lived, its registration
    # could never be released (float32 batches ran with oneDNN on).
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    ctx = multiprocessing.get_context("fork")
    before = torch._C._get_mkldnn_enabled()
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, dtype="float32" if during == "a float32 batch"
                else "bfloat16") as engine:
        with tm.held(engine) if during == "a float32 batch" else contextlib.nullcontext():
            out = ctx.Queue()
            child = ctx.Process(target=_child_onednn_state, args=(out,))
            child.start()
            answer = out.get(timeout=120)
            child.join(60)
    assert child.exitcode == 0
    assert answer == ([before, 0, 0], "off per batch", False, before, ["on, token buckets"], 0), answer
    assert torch._C._get_mkldnn_enabled() == before
