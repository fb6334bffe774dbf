"""The torch implementations of the packing kernels (fastserve.kernels.torch_*),
which stand in where the extension has no kernels for the device: equal to
the extension's kernels, the same argument checks, and the engine served
through them. A CUDA device without CUDA kernels is simulated on the CPU by
patching the capability check (kernels._compiled_for)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import tiny_models as tm
from fastserve import Engine
from fastserve import kernels as K

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, L, H), empty sequences allowed: edge cases and a few random shapes.
SHAPES = [(1, 1, 1), (5, 1, 8), (3, 40, 13), (9, 20, 64), (16, 33, 32), (2, 7, 0)]


def _batch(shape: tuple[int, int, int], dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    b, length, h = shape
    x = torch.randn((b, length, h), generator=gen).to(dtype)
    lengths = torch.randint(0, length + 1, (b,), generator=gen)
    lengths[0] = length
    return x, lengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_pack_and_unpack_equal_the_extension(dtype, shape):
    x, lengths = _batch(shape, dtype, seed=sum(shape))
    packed = K.pack(x, lengths)
    assert torch.equal(K.torch_pack(x, lengths), packed)
    cu = K.cu_seqlens_from_lengths(lengths)
    assert torch.equal(K.torch_pack(x, cu), packed)
    assert torch.equal(K.torch_pack(x, lengths, total=packed.shape[0]), packed)
    assert torch.equal(K.torch_unpack(packed, cu), K.unpack(packed, cu))
    assert torch.equal(K.torch_unpack(packed, cu, shape[1] + 3), K.unpack(packed, cu, shape[1] + 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
@pytest.mark.parametrize("normalize", [False, True])
def test_torch_segment_pool_equals_the_extension(dtype, shape, mode, normalize):
    x, lengths = _batch(shape, dtype, seed=7 + sum(shape))
    lengths[-1] = 0  # an empty sequence pools to zeros
    packed, cu = K.pack(x, lengths), K.cu_seqlens_from_lengths(lengths)
    got = K.torch_segment_pool(packed, cu, mode, normalize)
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[2])
    torch.testing.assert_close(got, K.segment_pool(packed, cu, mode, normalize), rtol=1e-5, atol=1e-6)
    assert not got[-1].any()


@pytest.mark.parametrize("dtype", DTYPES + [torch.int32, torch.int64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_torch_gather_equals_the_extension(dtype, index_dtype):
    x = (torch.arange(60).reshape(10, 3, 2) * 3 - 7).to(dtype)
    index = torch.tensor([9, 0, 0, 4, 2], dtype=index_dtype)
    assert torch.equal(K.torch_gather(x, index), K.gather(x, index))
    assert K.torch_gather(x, index[:0]).shape == (0, 3, 2)


def test_torch_kernels_take_non_contiguous_inputs():
    x = torch.randn(3, 6, 8).transpose(0, 1)  # [6, 3, 8], not contiguous
    lengths = torch.tensor([3, 1, 0, 2, 3, 3])
    assert torch.equal(K.torch_pack(x, lengths), K.pack(x.contiguous(), lengths))
    rows = torch.randn(8, 12)[:, ::2]
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    torch.testing.assert_close(K.torch_segment_pool(rows, cu), K.segment_pool(rows.contiguous(), cu))


X = torch.zeros((2, 3, 4))
LENGTHS = torch.tensor([2, 3], dtype=torch.int32)
# (call, message): the same ValueError from the extension and from torch.
BAD_CALLS = [
    (lambda k: k.pack(X.double(), LENGTHS), "float32, float16 or bfloat16, got float64"),
    (lambda k: k.pack(X, LENGTHS.float()), "lengths must be int32 or int64, got float32"),
    (lambda k: k.pack(X, torch.tensor([2, 4])), r"lengths\[1\] = 4 is outside \[0, L = 3\]"),
    (lambda k: k.pack(X, torch.tensor([1, 1, 1, 1])), "lengths must have B = 2 entries"),
    (lambda k: k.unpack(torch.zeros(5, 4), torch.tensor([1, 5])), r"cu_seqlens\[0\] must be 0, got 1"),
    (lambda k: k.unpack(torch.zeros(5, 4), torch.tensor([0, 3, 2, 5])), "must be non-decreasing"),
    (lambda k: k.unpack(torch.zeros(5, 4), torch.tensor([0, 4])), r"cu_seqlens\[-1\] must equal .* 5, got 4"),
    (lambda k: k.unpack(torch.zeros(5, 4), torch.tensor([0, 5]), 3), "sequence 0 has length 5 > max length 3"),
    (lambda k: k.unpack(torch.zeros(5, 4), torch.tensor([0, 5]), -1), "max_len must be >= 0"),
    (lambda k: k.segment_pool(torch.zeros(3, 4), torch.tensor([0, 3]), "sum"), "mode must be 'mean', 'cls' or 'max'"),
    (lambda k: k.segment_pool(torch.zeros(3, 4), torch.tensor([0.0, 3.0])), "cu_seqlens must be int32 or int64"),
    (lambda k: k.gather(torch.zeros(3, 4), torch.tensor([0, 3])), r"index\[1\] = 3 is out of range for 3 rows"),
    (lambda k: k.gather(torch.zeros(3, 4), torch.tensor([-1])), r"index\[0\] = -1 is out of range"),
    (lambda k: k.gather(torch.zeros(3, 4, dtype=torch.uint8), torch.tensor([0])), "got uint8"),
]
EXTENSION = K.for_device("cpu")
TORCH = K._TORCH


@pytest.mark.parametrize("call,message", BAD_CALLS)
@pytest.mark.parametrize("impl", [EXTENSION, TORCH], ids=["extension", "torch"])
def test_torch_kernels_check_arguments_like_the_extension(impl, call, message):
    with pytest.raises(ValueError, match=message):
        call(impl)


# ---------------------------------------------------------------- selection


def test_the_extension_serves_the_cpu_unless_torch_is_forced(monkeypatch):
    assert K.for_device("cpu").name == "cpu" and K.for_device("cpu").pack is K.pack
    assert K.fallback_reason("cpu") is None
    monkeypatch.setenv("FASTSERVE_KERNELS", "torch")
    assert K.for_device("cpu") == TORCH
    assert K.fallback_reason("cpu") is None  # asked for: nothing to warn about
    monkeypatch.setenv("FASTSERVE_KERNELS", "triton")
    with pytest.raises(ValueError, match="FASTSERVE_KERNELS must be 'auto' or 'torch', got 'triton'"):
        K.for_device("cpu")


def test_a_cuda_device_without_cuda_kernels_gets_torch_and_a_reason_with_the_fix(monkeypatch):
    monkeypatch.setattr(K, "_compiled_for", lambda device_type: device_type == "cpu")
    assert K.for_device(torch.device("cuda", 0)) == TORCH
    reason = K.fallback_reason("cuda:0")
    assert "built without CUDA" in reason and "nvcc was not found" in reason  # the reason
    assert "reinstall fastserve with the CUDA toolkit's nvcc on PATH" in reason  # the fix
    assert "FASTSERVE_CUDA=ON" in reason
    monkeypatch.setattr(K, "_compiled_for", lambda device_type: True)
    assert K.for_device("cuda:0").name == "cuda" and K.fallback_reason("cuda:0") is None


# ------------------------------------------------------------------- engine


@pytest.mark.parametrize("arch", tm.ARCHS)
@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", False)])
def test_the_engine_through_torch_kernels_equals_it_through_the_extension(monkeypatch, arch, pooling, normalize):
    m = tm.model(arch)
    texts = tm.mixed_texts(40, seed=11)
    with Engine(m, tm.tokenizer(), execution="packed", pooling=pooling, normalize=normalize) as engine:
        want = engine.embed(texts)
        assert engine.stats()["kernels"] == "cpu"
    monkeypatch.setenv("FASTSERVE_KERNELS", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forced: no warning
        engine = Engine(m, tm.tokenizer(), execution="packed", pooling=pooling, normalize=normalize)
    with engine:
        got = engine.embed(texts)
        assert engine.stats()["kernels"] == "torch"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_without_kernels_for_its_device_the_engine_warns_once_and_serves_through_torch(monkeypatch):
    monkeypatch.setattr(K, "_compiled_for", lambda device_type: False)
    m = tm.model("bert")
    texts = tm.mixed_texts(30, seed=12)
    with pytest.warns(RuntimeWarning) as caught:
        engine = Engine(m, tm.tokenizer())
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "has no cpu kernels" in message and "torch operations on cpu" in message  # the reason
    assert "To fix: reinstall fastserve" in message  # the fix
    assert caught[0].filename == __file__  # attributed to the Engine(...) call
    with engine:
        got = engine.embed(texts)
        s = engine.stats()
    assert s["kernels"] == "torch" and s["health"]["healthy"] and s["completed"] == len(texts)
    np.testing.assert_allclose(got, np.stack([tm.reference(m, t) for t in texts]), atol=1e-5, rtol=0)


def test_padded_execution_runs_no_packing_kernels_and_needs_no_warning(monkeypatch):
    monkeypatch.setattr(K, "_compiled_for", lambda device_type: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = Engine(tm.model("bert"), tm.tokenizer(), execution="padded")
    with engine:
        assert engine.embed("padded").shape == (32,)
        s = engine.stats()
    assert s["kernels"] is None and s["attention"] is None and s["attention_batches"] is None
