"""The epilogues (kernels.bias_gelu_, kernels.add_layer_norm_) on every device:
their torch implementations against the CPU kernels, the per-device choice,
the CUDA path's argument checks (which read no device memory, so they run
here without a GPU), and, marked gpu, the CUDA kernels against torch's own
ops in float32, float16 and bfloat16, on the vector and the scalar path,
and inside a captured CUDA graph. The CUDA kernels' per-thread code is
also tested without a GPU in tests/cpp/test_epilogue_cuda.cpp."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastserve import _core
from fastserve import kernels as K

_k = _core._kernels  # type: ignore[attr-defined]


def _layer_inputs(rows: int, n: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen)
    r = torch.randn(rows, n, generator=gen)
    b = 0.1 * torch.randn(n, generator=gen)
    w = 1 + 0.1 * torch.randn(n, generator=gen)
    beta = 0.1 * torch.randn(n, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (x, b, r, w, beta)]


# ------------------------------------------------------ torch implementations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [8, 13, 384])
def test_torch_epilogues_equal_the_cpu_kernels(dtype, n: int) -> None:
    x, b, r, w, beta = _layer_inputs(37, n, dtype, seed=n)
    tol = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    y = x.clone()
    assert K.torch_bias_gelu_(y, b) is y
    torch.testing.assert_close(y, K.bias_gelu_(x.clone(), b), **tol)
    y = x.clone()
    assert K.torch_add_layer_norm_(y, b, r, w, beta, 1e-12) is y
    torch.testing.assert_close(y, K.add_layer_norm_(x.clone(), b, r, w, beta, 1e-12), **tol)


def test_torch_epilogues_take_float16_and_compute_in_float32() -> None:
    x, b, r, w, beta = _layer_inputs(5, 24, torch.float16)
    want = F.gelu(x.float() + b.float()).half()
    assert torch.equal(K.torch_bias_gelu_(x.clone(), b), want)
    s = (x.float() + b.float() + r.float()).half().float()  # the sum rounded once, to x's dtype
    want = F.layer_norm(s, (24,), w.float(), beta.float(), 1e-5).half()
    assert torch.equal(K.torch_add_layer_norm_(x.clone(), b, r, w, beta, 1e-5), want)


def test_each_device_gets_the_extensions_epilogues_or_torchs(monkeypatch) -> None:
    cpu = K.for_device("cpu")
    assert cpu.bias_gelu_ is K.bias_gelu_ and cpu.add_layer_norm_ is K.add_layer_norm_
    monkeypatch.setattr(K, "_compiled_for", lambda device_type: device_type == "cpu")
    cuda = K.for_device("cuda:0")
    assert cuda.bias_gelu_ is K.torch_bias_gelu_ and cuda.add_layer_norm_ is K.torch_add_layer_norm_
    monkeypatch.setattr(K, "_compiled_for", lambda device_type: True)
    assert K.for_device("cuda:0").bias_gelu_ is K.bias_gelu_
    monkeypatch.setenv("FASTSERVE_KERNELS", "torch")
    assert K.for_device("cpu").add_layer_norm_ is K.torch_add_layer_norm_


# -------------------------------------------- the CUDA path's argument checks


def _cuda_arg(shape: list[int], dtype: str = "float16", strides: list[int] | None = None, device: str = "cuda"):
    """A CUDA (or CPU) tensor as the extension sees it, at an address never
    read: the calls below fail their checks of shapes, dtypes and devices,
    which come before anything is read or launched."""
    if strides is None:
        strides = [shape[1], 1] if len(shape) == 2 else [1]
    return _k.TensorArg(0x10000, shape, strides, dtype, device, 0)


BAD_CUDA_CALLS = [
    (lambda: _k.bias_gelu(_cuda_arg([4, 8]), _cuda_arg([7]), 1), r"bias must have shape \[8\], got \[7\]"),
    (lambda: _k.bias_gelu(_cuda_arg([4, 8]), _cuda_arg([8], "float32"), 1),
     r"bias must have the dtype of x \(float16\), got float32"),
    (lambda: _k.bias_gelu(_cuda_arg([4, 8], "float64"), _cuda_arg([8], "float64"), 1),
     "x must be float32, float16 or bfloat16, got float64"),
    (lambda: _k.bias_gelu(_cuda_arg([4, 8], strides=[16, 1]), _cuda_arg([8]), 1), "x must be contiguous"),
    (lambda: _k.bias_gelu(_cuda_arg([4, 8]), _cuda_arg([8], device="cpu"), 1),
     "all tensors must be on one device: x is on cuda:0, bias is on cpu"),
    (lambda: _k.bias_gelu(_cuda_arg([4, 8], device="cpu"), _cuda_arg([8]), 1),
     "all tensors must be on one device: x is on cpu, bias is on cuda:0"),
    (lambda: _k.add_layer_norm(_cuda_arg([4, 8], device="cpu"), _cuda_arg([8], device="cpu"), _cuda_arg([4, 8]),
                               _cuda_arg([8], device="cpu"), _cuda_arg([8], device="cpu"), 1e-5, 1),
     "all tensors must be on one device: x is on cpu, residual is on cuda:0"),
    (lambda: _k.add_layer_norm(_cuda_arg([4, 8]), _cuda_arg([8]), _cuda_arg([3, 8]), _cuda_arg([8]),
                               _cuda_arg([8]), 1e-5, 1), r"residual must have shape \[4, 8\], got \[3, 8\]"),
    (lambda: _k.add_layer_norm(_cuda_arg([4, 8]), _cuda_arg([8]), _cuda_arg([4, 8]), _cuda_arg([8], "bfloat16"),
                               _cuda_arg([8]), 1e-5, 1), r"weight must have the dtype of x \(float16\), got bfloat16"),
    (lambda: _k.add_layer_norm(_cuda_arg([4, 8]), _cuda_arg([8]), _cuda_arg([4, 8]), _cuda_arg([8]),
                               _cuda_arg([9]), 1e-5, 1), r"beta must have shape \[8\], got \[9\]"),
    (lambda: _k.add_layer_norm(_cuda_arg([4, 8]), _cuda_arg([8]), _cuda_arg([4, 8]), _cuda_arg([8]),
                               _cuda_arg([8]), -1.0, 1), "eps must be finite and >= 0 as a float32"),
]


@pytest.mark.parametrize("call,message", BAD_CUDA_CALLS)
def test_the_cuda_path_rejects_bad_arguments_from_their_shapes_alone(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_valid_cuda_arguments_reach_the_device_check() -> None:
    # Without CUDA compiled in, or without a device, the call stops there.
    if _core.cuda_compiled() and _core.cuda_device_count() > 0:
        pytest.skip("a CUDA device is visible: the GPU tests below launch for real")
    message = "CUDA tensors need fastserve built with CUDA|no CUDA device is visible"
    with pytest.raises(ValueError, match=message):
        _k.bias_gelu(_cuda_arg([4, 8]), _cuda_arg([8]), 1)
    with pytest.raises(ValueError, match=message):
        _k.add_layer_norm(_cuda_arg([4, 8]), _cuda_arg([8]), _cuda_arg([4, 8]), _cuda_arg([8]), _cuda_arg([8]),
                          1e-5, 1)
    # Empty inputs are checked as fully, and then launch nothing.
    with pytest.raises(ValueError, match=message):
        _k.bias_gelu(_cuda_arg([0, 8]), _cuda_arg([8]), 1)


BAD_TORCH_CALLS = [
    (lambda x, v: K.torch_bias_gelu_(x, v[:7]), r"bias must have shape \[8\], got \[7\]"),
    (lambda x, v: K.torch_bias_gelu_(x, v.float()), r"bias must have the dtype of x \(float16\), got float32"),
    (lambda x, v: K.torch_bias_gelu_(x.double(), v.double()), "x must be float32, float16 or bfloat16, got float64"),
    (lambda x, v: K.torch_add_layer_norm_(x, v, x[:3], v, v, 1e-5), r"residual must have shape \[4, 8\], got \[3, 8\]"),
    (lambda x, v: K.torch_add_layer_norm_(x, v, x, v.bfloat16(), v, 1e-5),
     r"weight must have the dtype of x \(float16\), got bfloat16"),
    (lambda x, v: K.torch_add_layer_norm_(x, v, x, v, v, -1.0), "eps must be finite and >= 0 as a float32"),
    (lambda x, v: K.torch_add_layer_norm_(x, v, x, v, v, 3.5e38), "eps must be finite and >= 0 as a float32"),
]


@pytest.mark.parametrize("call,message", BAD_TORCH_CALLS)
def test_the_torch_epilogues_check_arguments_with_the_cuda_paths_messages(call, message: str) -> None:
    x = torch.ones(4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=message):
        call(x, torch.ones(8, dtype=torch.float16))
    assert (x == 1).all()  # nothing written


# ------------------------------------------------------------------ on CUDA

WIDTHS = [383, 384, 768, 1024, 3072, 4096, 4097]  # odd: the scalar path; 4097: more than the registers hold
HALF_TOL = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # one unit in the last place, relative


def _cuda_compiled_or_skip() -> None:
    if not _core.cuda_compiled():
        pytest.skip("fastserve was built without CUDA: no CUDA epilogues to test")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("rows", [1, 5000])
def test_cuda_bias_gelu_equals_torch(dtype, n: int, rows: int) -> None:
    _cuda_compiled_or_skip()
    x, b, *_ = _layer_inputs(rows, n, dtype, "cuda", seed=n + rows)
    x = 3 * x
    got = K.bias_gelu_(x.clone(), b)
    if dtype == torch.float32:
        torch.testing.assert_close(got, F.gelu(x + b), atol=1e-6, rtol=1e-6)
        return
    # The contract: x + b and GELU in float32, rounded once to x's dtype
    # (within one unit in the last place of it: erf's last bits).
    want = F.gelu(x.float() + b.float()).to(dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-5, rtol=HALF_TOL[dtype])
    # torch's 16-bit ops round x + b first: a unit more at most.
    torch.testing.assert_close(got.float(), F.gelu(x + b).float(), atol=1e-4, rtol=3 * HALF_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("rows", [1, 5000])
def test_cuda_add_layer_norm_equals_torch(dtype, n: int, rows: int) -> None:
    _cuda_compiled_or_skip()
    x, b, r, w, beta = _layer_inputs(rows, n, dtype, "cuda", seed=n + rows)
    x = 3 * x + 1  # an offset mean, as residual streams have
    eps = 1e-12
    got = K.add_layer_norm_(x.clone(), b, r, w, beta, eps)
    if dtype == torch.float32:
        torch.testing.assert_close(got, F.layer_norm(x + b + r, (n,), w, beta, eps), atol=1e-5, rtol=1e-5)
        return
    # The contract: the sum rounded once to x's dtype, LayerNorm in float32,
    # rounded once (float32 statistics in another order: a unit at most).
    s = (x.float() + b.float() + r.float()).to(dtype).float()
    want = F.layer_norm(s, (n,), w.float(), beta.float(), eps).to(dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-5, rtol=HALF_TOL[dtype])
    # torch's 16-bit ops round x + b, then + r: the sum a unit apart at most,
    # which LayerNorm scales by rstd |w| (about 1/3 here), then the output's unit.
    native = F.layer_norm(x + b + r, (n,), w, beta, eps).float()
    torch.testing.assert_close(got.float(), native, atol=16 * HALF_TOL[dtype], rtol=2 * HALF_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_epilogues_on_misaligned_views_take_the_scalar_path(dtype) -> None:
    # Contiguous views one element into their storage: no 16-byte vectors,
    # though the width allows them.
    _cuda_compiled_or_skip()
    rows, n = 300, 768
    x, b, r, w, beta = _layer_inputs(rows, n, dtype, "cuda", seed=3)
    def skewed(t: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(t.numel() + 1, dtype=dtype, device="cuda")
        v = buf[1:].view(t.shape)
        v.copy_(t)
        return v
    want_gelu = K.bias_gelu_(x.clone(), b)
    xs = skewed(x)
    assert xs.data_ptr() % 16 != 0
    K.bias_gelu_(xs, skewed(b))
    assert torch.equal(xs, want_gelu)
    want_ln = K.add_layer_norm_(x.clone(), b, r, w, beta, 1e-5)
    xs = skewed(x)
    K.add_layer_norm_(xs, skewed(b), skewed(r), skewed(w), skewed(beta), 1e-5)
    torch.testing.assert_close(xs, want_ln, atol=1e-5, rtol=0 if dtype == torch.float32 else HALF_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_epilogues_replay_in_a_captured_graph(dtype) -> None:
    # Captured once, replayed on new inputs: the kernels launch on torch's
    # current stream (the capture's), never synchronise, and read their
    # inputs at replay.
    _cuda_compiled_or_skip()
    rows, n, inter = 128, 768, 3072
    h_src = torch.empty(rows, inter, dtype=dtype, device="cuda")
    x_src = torch.empty(rows, n, dtype=dtype, device="cuda")
    h = torch.empty_like(h_src)
    y = torch.empty_like(x_src)
    _, b1, *_ = _layer_inputs(1, inter, dtype, "cuda", seed=1)
    _, b2, r, w, beta = _layer_inputs(rows, n, dtype, "cuda", seed=2)

    def step() -> None:
        h.copy_(h_src)
        K.bias_gelu_(h, b1)
        y.copy_(x_src)
        K.add_layer_norm_(y, b2, r, w, beta, 1e-12)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch advises
        h_src.normal_()
        x_src.normal_()
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (5, 6):
        torch.manual_seed(seed)
        h_src.normal_()
        x_src.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(h, K.bias_gelu_(h_src.clone(), b1))
        assert torch.equal(y, K.add_layer_norm_(x_src.clone(), b2, r, w, beta, 1e-12))
        assert not torch.equal(y, x_src)


@pytest.mark.gpu
def test_cuda_epilogues_check_before_launching() -> None:
    _cuda_compiled_or_skip()
    x = torch.ones(4, 16, dtype=torch.float16, device="cuda")
    v = torch.ones(16, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="must be contiguous"):
        K.bias_gelu_(torch.ones(16, 4, dtype=torch.float16, device="cuda").t(), v)
    with pytest.raises(ValueError, match=r"bias must have the dtype of x \(float16\), got float32"):
        K.bias_gelu_(x, v.float())
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        K.add_layer_norm_(x, v, x.cpu(), v, v, 1e-5)
    assert (x == 1).all()
    # Empty inputs launch nothing.
    assert K.bias_gelu_(x[:0], v).shape == (0, 16)
    assert K.add_layer_norm_(x[:0], v, x[:0], v, v, 1e-5).shape == (0, 16)


def test_the_epilogue_ab_refuses_without_cuda_epilogues(monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks" / "python"))
    ab = pytest.importorskip("epilogue_ab")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ab.main([]) == 2
    assert "no CUDA device visible to torch" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ab._core, "cuda_compiled", lambda: False)
    assert ab.main([]) == 2
    assert "built without CUDA" in capsys.readouterr().err
