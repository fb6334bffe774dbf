"""Packing kernels (fastserve.kernels) against naive torch references.

CPU kernels are checked on seeded random shapes for every dtype, with the
edge cases called out (length-1 and empty sequences, one sequence, B=1,
L=4096, H not a multiple of 8); every validation error is checked to be a
ValueError naming the problem. CUDA tests (marked gpu) compare the CUDA
kernels with the CPU kernels, the oracle.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from fastserve import _core
from fastserve import kernels as K

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_k = _core._kernels


# ------------------------------------------------------------------ references


def ref_pack(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[b, : int(n)] for b, n in enumerate(lengths)] + [x.new_zeros((0, x.shape[2]))])


def ref_unpack(packed: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    out = packed.new_zeros((cu.numel() - 1, max_len, packed.shape[1]))
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        out[b, : e - s] = packed[s:e]
    return out


def ref_pool(x: torch.Tensor, cu: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    rows = []
    for b in range(cu.numel() - 1):
        seg = x[int(cu[b]) : int(cu[b + 1])].float()
        if seg.shape[0] == 0:
            rows.append(torch.zeros(x.shape[1]))
        elif mode == "mean":
            rows.append(seg.double().mean(0).float())
        elif mode == "cls":
            rows.append(seg[0])
        else:
            rows.append(seg.amax(0))
    out = torch.stack(rows) if rows else torch.zeros((0, x.shape[1]))
    return F.normalize(out, dim=1, eps=1e-12) if normalize else out


def random_lengths(gen: torch.Generator, b: int, max_len: int, allow_empty: bool = False) -> torch.Tensor:
    lo = 0 if allow_empty else 1
    lengths = torch.randint(lo, max_len + 1, (b,), generator=gen)
    # A mixed distribution: some length-1 and some full-length sequences.
    lengths[::5] = 1
    lengths[2::7] = max_len
    return lengths


def randn(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


# Shapes (B, L, H): random ones plus edge cases: B=1, L=1, very long rows, H off the SIMD width.
SHAPES = [
    (1, 1, 1),  # one sequence of length 1
    (1, 17, 384),  # B = 1
    (5, 1, 64),  # every sequence has length 1
    (3, 4096, 8),  # very long sequences
    (7, 33, 13),  # H not a multiple of 8 (scalar tail)
    (9, 20, 771),
    (64, 128, 384),
] + [(1 + s * 3, 2 + s * 11, 1 + s * 37) for s in range(6)]


# ----------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pack_matches_torch_reference(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    b, L, h = shape
    x = randn(gen, shape, dtype)
    lengths = random_lengths(gen, b, L, allow_empty=True).to(torch.int32)
    got = K.pack(x, lengths)
    assert got.dtype == dtype and got.shape == (int(lengths.sum()), h)
    assert torch.equal(got, ref_pack(x, lengths))
    # cu_seqlens instead of lengths, int64 instead of int32: same result.
    assert torch.equal(K.pack(x, K.cu_seqlens_from_lengths(lengths).long()), got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_unpack_inverts_pack_and_zero_fills_padding(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    gen = torch.Generator().manual_seed(1 + hash(shape) % 2**31)
    b, L, h = shape
    lengths = random_lengths(gen, b, L, allow_empty=True)
    cu = K.cu_seqlens_from_lengths(lengths)
    packed = randn(gen, (int(lengths.sum()), h), dtype)
    got = K.unpack(packed, cu, L)
    assert got.shape == (b, L, h) and got.dtype == dtype
    assert torch.equal(got, ref_unpack(packed, cu, L))
    assert torch.equal(K.pack(got, lengths), packed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unpack_defaults_max_len_to_the_longest_sequence(dtype: torch.dtype) -> None:
    packed = torch.arange(12, dtype=dtype).reshape(6, 2)
    cu = torch.tensor([0, 1, 5, 6], dtype=torch.int32)
    got = K.unpack(packed, cu)
    assert got.shape == (3, 4, 2)
    assert torch.equal(got, ref_unpack(packed, cu, 4))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_segment_pool_matches_torch_reference(
    dtype: torch.dtype, shape: tuple[int, int, int], mode: str, normalize: bool
) -> None:
    gen = torch.Generator().manual_seed(2 + hash(shape) % 2**31)
    b, L, h = shape
    lengths = random_lengths(gen, b, L, allow_empty=True)
    cu = K.cu_seqlens_from_lengths(lengths)
    x = randn(gen, (int(lengths.sum()), h), dtype)
    got = K.segment_pool(x, cu, mode=mode, normalize=normalize)
    assert got.dtype == torch.float32 and got.shape == (b, h)
    torch.testing.assert_close(got, ref_pool(x, cu, mode, normalize), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_pooling_keeps_a_nan_in_any_row(dtype: torch.dtype, device: str) -> None:
    # As torch's amax: a NaN in any row of a segment is NaN in its pool (it
    # used to survive only in the first row), on every path: the register
    # blocks of 64 columns, the 8-column vectors and the scalar tail.
    H = 64 + 8 + 3
    lengths = torch.tensor([3, 3, 3, 1, 4])
    x = torch.randn(int(lengths.sum()), H).to(dtype)
    x[0, 0] = x[4, 70] = x[8, 74] = x[9, 5] = float("nan")  # first, middle, last, only row
    x[10:14, 1] = float("nan")
    cu = K.cu_seqlens_from_lengths(lengths)
    want = ref_pool(x, cu, "max", False)
    assert want.isnan().sum() == 5
    paths = ["portable", "avx2"] if device == "cpu" and K.cpu_isa() != "portable" else [None]
    for isa in paths:
        with K.cpu_isa_cap(isa) if isa else contextlib.nullcontext():
            got = K.segment_pool(x.to(device), cu.to(device), "max").cpu()
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalized_pooling_of_a_row_with_a_nan_is_all_nan(dtype: torch.dtype, mode: str, device: str) -> None:
    # As F.normalize: the norm of a row with a NaN is NaN, and so is every
    # value of the row (max(norm, 1e-12) used to pick 1e-12 for a NaN norm
    # and scale the row's other values by 1e12: plausible-looking vectors
    # from a broken model). On every path: the 64-column register blocks,
    # the 8-column vectors and the scalar tail; every ISA level.
    H = 64 + 8 + 3
    lengths = torch.tensor([2, 3, 1])
    x = torch.rand(int(lengths.sum()), H).add(0.5).to(dtype)
    x[0, 70] = float("nan")  # the first row of segment 0: its cls too
    x[5, 2] = float("nan")  # the only row of segment 2
    cu = K.cu_seqlens_from_lengths(lengths)
    want = ref_pool(x, cu, mode, True)
    assert want[[0, 2]].isnan().all() and not want[1].isnan().any()
    order = ["portable", "avx2", "avx512", "avx512_bf16"]
    paths = order[: order.index(K.cpu_isa()) + 1] if device == "cpu" else [None]
    for isa in paths:
        with K.cpu_isa_cap(isa) if isa else contextlib.nullcontext():
            got = K.segment_pool(x.to(device), cu.to(device), mode, normalize=True).cpu()
        torch.testing.assert_close(got, want, equal_nan=True, rtol=2e-5, atol=2e-6, msg=lambda m: f"{isa}: {m}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mean_pooling_of_a_long_segment_is_near_the_exact_mean(dtype: torch.dtype, device: str) -> None:
    # Rows summed one after another drift by a rounding per row: 3.8e-6 from
    # the exact mean at 8192 rows of values near 1.0 (torch's mean: 1.7e-7),
    # a long-context model's mean pooling. In blocks of about sqrt(n) rows,
    # 4.9e-7 here (old: 4.3e-6). Every column path (64-column blocks, 8, tail) and ISA level.
    gen = torch.Generator().manual_seed(8)
    H = 4 * 64 + 8 + 3
    x = (torch.randn(16384, H, generator=gen) + 1.0).to(dtype)
    cu = torch.tensor([0, 16384], dtype=torch.int32)
    want = x.double().mean(0)
    order = ["portable", "avx2", "avx512", "avx512_bf16"]
    paths = order[: order.index(K.cpu_isa()) + 1] if device == "cpu" else [None]
    for isa in paths:
        with K.cpu_isa_cap(isa) if isa else contextlib.nullcontext():
            got = K.segment_pool(x.to(device), cu.to(device), "mean").cpu()[0].double()
        err = (got - want).abs().max().item()
        assert err < 8e-7, f"{isa}: {err:.2e} from the exact mean"


def test_cu_seqlens_refuse_lengths_int32_cannot_hold() -> None:
    assert K.cu_seqlens_from_lengths(torch.tensor([3, 0, 2])).tolist() == [0, 3, 3, 5]
    assert K.cu_seqlens_from_lengths(torch.tensor([2**31 - 2, 1])).tolist() == [0, 2**31 - 2, 2**31 - 1]
    for lengths in ([2**32, 5], [2**31 - 1, 2], [4, -1]):  # wrapped into offsets that looked valid
        with pytest.raises(ValueError, match="sum to at most 2147483647"):
            K.cu_seqlens_from_lengths(torch.tensor(lengths))


def test_segment_pool_of_an_empty_sequence_is_zero_even_normalized() -> None:
    x = torch.ones((2, 3))
    cu = torch.tensor([0, 2, 2], dtype=torch.int32)
    got = K.segment_pool(x, cu, "max", normalize=True)
    assert torch.equal(got[1], torch.zeros(3))
    torch.testing.assert_close(got[0], torch.full((3,), 3**-0.5))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES + [torch.int32, torch.int64], ids=str)
def test_gather_matches_torch_indexing(dtype: torch.dtype, index_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    for n, h in [(1, 1), (10, 13), (300, 384), (50, 7)]:
        x = (torch.randn((n, h), generator=gen) * 100).to(dtype)
        idx = torch.randint(0, n, (2 * n + 1,), generator=gen).to(index_dtype)
        assert torch.equal(K.gather(x, idx), x[idx.long()])
    x3 = torch.randn((6, 2, 5), generator=gen).to(dtype)
    idx = torch.tensor([5, 0, 0], dtype=index_dtype)
    assert torch.equal(K.gather(x3, idx), x3[idx.long()])
    assert K.gather(x3, idx[:0]).shape == (0, 2, 5)


def test_empty_batches_give_empty_outputs() -> None:
    x = torch.zeros((0, 4, 8))
    assert K.pack(x, torch.zeros(0, dtype=torch.int32)).shape == (0, 8)
    cu = torch.zeros(1, dtype=torch.int32)
    assert K.unpack(torch.zeros((0, 8)), cu, 4).shape == (0, 4, 8)
    assert K.segment_pool(torch.zeros((0, 8)), cu).shape == (0, 8)


def test_unaligned_views_use_the_narrow_copy_path() -> None:
    # A view starting one element in is contiguous but not 16-byte aligned.
    base = torch.randn(1 + 4 * 5 * 8).to(torch.float16)
    x = base[1:].view(4, 5, 8)
    lengths = torch.tensor([5, 1, 3, 2], dtype=torch.int32)
    assert torch.equal(K.pack(x, lengths), ref_pack(x, lengths))


def test_cuda_kernels_are_compiled_whenever_nvcc_is_present() -> None:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    assert _core.cuda_compiled() is True


@pytest.mark.skipif("FASTSERVE_KERNEL_THREAD_BYTES" in os.environ,
                    reason="FASTSERVE_KERNEL_THREAD_BYTES is set: the kernels read it once per process, so "
                           "the default 4 MiB per thread these counts assume cannot be restored here")
def test_large_inputs_use_one_thread_per_4_mib_up_to_the_cores() -> None:
    # The kernels' pool has one thread per online CPU (hardware_concurrency,
    # which os.cpu_count() also reports); each thread takes at least 4 MiB.
    cores = os.cpu_count() or 1
    mib = 1 << 20
    assert _k.cpu_threads_for(1 << 10) == 1
    assert _k.cpu_threads_for(8 * mib - 1) == 1
    assert _k.cpu_threads_for(8 * mib) == min(2, cores)
    assert _k.cpu_threads_for(1 << 30) == min(256, cores)
    # Multi-threaded path (size far above the threshold) still matches.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((64, 512, 768), generator=gen)
    lengths = random_lengths(gen, 64, 512)
    packed = K.pack(x, lengths)
    assert torch.equal(packed, ref_pack(x, lengths))
    cu = K.cu_seqlens_from_lengths(lengths)
    assert torch.equal(K.unpack(packed, cu, 512), ref_unpack(packed, cu, 512))
    torch.testing.assert_close(K.segment_pool(packed, cu), ref_pool(packed, cu, "mean", False), rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------ validation


def arg(t: torch.Tensor, device: str | None = None, dtype: str | None = None, shape: list[int] | None = None) -> object:
    """A raw TensorArg, to reach errors the torch-level API cannot produce."""
    return _k.TensorArg(
        t.data_ptr(),
        list(t.shape) if shape is None else shape,
        list(t.stride()) if shape is None else [],
        dtype or str(t.dtype).removeprefix("torch."),
        device or "cpu",
        0,
    )


X = torch.zeros((2, 3, 4))
LENGTHS = torch.tensor([2, 3], dtype=torch.int32)


def test_non_contiguous_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        K.pack(torch.zeros((3, 2, 4)).transpose(0, 1), LENGTHS)
    with pytest.raises(ValueError, match="contiguous"):
        K.segment_pool(torch.zeros((4, 6))[:, ::2], torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        K.gather(torch.zeros((4, 6)).t(), torch.tensor([0]))


def test_wrong_dtypes_are_rejected() -> None:
    with pytest.raises(ValueError, match="float32, float16 or bfloat16, got float64"):
        K.pack(X.double(), LENGTHS)
    with pytest.raises(ValueError, match="lengths must be int32 or int64, got float32"):
        K.pack(X, LENGTHS.float())
    with pytest.raises(ValueError, match="cu_seqlens must be int32 or int64"):
        K.segment_pool(torch.zeros((3, 4)), torch.tensor([0.0, 3.0]))
    with pytest.raises(ValueError, match="index must be int32 or int64, got int16"):
        K.gather(torch.zeros((3, 4)), torch.tensor([0], dtype=torch.int16))
    with pytest.raises(ValueError, match="got uint8"):
        K.gather(torch.zeros((3, 4), dtype=torch.uint8), torch.tensor([0]))


def test_dtype_mismatch_between_input_and_output_is_rejected() -> None:
    out = torch.zeros((5, 4), dtype=torch.float16)
    with pytest.raises(ValueError, match=r"out must have the dtype of x \(float32\), got float16"):
        _k.pack(arg(X), arg(LENGTHS), arg(out))
    with pytest.raises(ValueError, match="out must be float32, got float16"):
        _k.segment_pool(arg(torch.zeros((3, 4))), arg(torch.tensor([0, 3])), arg(torch.zeros((1, 4)).half()), "mean", False)


def test_tensors_on_different_devices_are_rejected() -> None:
    out = torch.zeros((5, 4))
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        _k.pack(arg(X), arg(LENGTHS, device="cuda"), arg(out))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a usable GPU")
def test_cuda_tensors_without_a_gpu_or_cuda_build_are_rejected() -> None:
    out = torch.zeros((5, 4))
    expected = "no CUDA device is visible" if _core.cuda_compiled() else "built with CUDA"
    with pytest.raises(ValueError, match=expected):
        _k.pack(arg(X, "cuda"), arg(LENGTHS, "cuda"), arg(out, "cuda"))


def test_lengths_outside_zero_to_max_len_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"lengths\[1\] = -1 is outside \[0, L = 3\]"):
        K.pack(X, torch.tensor([2, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lengths\[0\] = 4 is outside \[0, L = 3\]"):
        K.pack(X, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="B = 2 entries"):
        K.pack(X, torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="sequence 1 has length 4 > max length 3"):
        K.pack(X, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="sequence 0 has length 4 > max length 3"):
        K.unpack(torch.zeros((4, 4)), torch.tensor([0, 4], dtype=torch.int32), 3)


@pytest.mark.parametrize(
    ("cu", "message"),
    [
        ([1, 2, 4], r"cu_seqlens\[0\] must be 0, got 1"),
        ([0, 3, 2, 4], r"non-decreasing, but cu_seqlens\[2\] = 2 < cu_seqlens\[1\] = 3"),
        ([0, 2, 3], r"cu_seqlens\[-1\] must equal the number of packed rows 4, got 3"),
        ([0, 2, 5], r"cu_seqlens\[-1\] must equal the number of packed rows 4, got 5"),
    ],
)
def test_malformed_cu_seqlens_are_rejected(cu: list[int], message: str) -> None:
    packed = torch.zeros((4, 8))
    for dt in (torch.int32, torch.int64):
        c = torch.tensor(cu, dtype=dt)
        with pytest.raises(ValueError, match=message):
            K.unpack(packed, c, 8)
        with pytest.raises(ValueError, match=message):
            K.segment_pool(packed, c)
    with pytest.raises(ValueError, match="B \\+ 1 >= 1 entries"):
        K.segment_pool(packed, torch.zeros(0, dtype=torch.int32))


@pytest.mark.parametrize(
    ("cu", "message"),
    [
        ([0, 2**62, 4], r"non-decreasing, but cu_seqlens\[2\] = 4 < cu_seqlens\[1\] = 4611686018427387904"),
        ([0, 2**40, 4], r"non-decreasing, but cu_seqlens\[2\] = 4 < cu_seqlens\[1\] = 1099511627776"),
        ([0, 2**40, 2**40], r"cu_seqlens\[-1\] must equal the number of packed rows 4, got 1099511627776"),
        ([2**40, 2**40 + 4], r"cu_seqlens\[0\] must be 0, got 1099511627776"),
        ([0, 1, -(2**40), 4], r"non-decreasing, but cu_seqlens\[2\] = -1099511627776 < cu_seqlens\[1\] = 1"),
        # Every int64 difference wraps to a non-negative one: caught by comparing, not subtracting.
        ([0, 2**62, -(2**63), -(2**62), 4], r"non-decreasing, but cu_seqlens\[2\] = -9223372036854775808"),
    ],
    ids=["huge-middle", "large-middle", "huge-end", "huge-start", "negative-middle", "int64-wrap"],
)
@pytest.mark.parametrize("unpack", [K.unpack, K.torch_unpack], ids=["extension", "torch"])
def test_unpack_checks_cu_seqlens_before_sizing_its_output_by_it(unpack, cu: list[int], message: str) -> None:
    # max_len defaults to the longest sequence: a malformed cu_seqlens must be
    # a ValueError, not an output sized by it (MemoryError, overflow).
    with pytest.raises(ValueError, match=message):
        unpack(torch.zeros((4, 8)), torch.tensor(cu, dtype=torch.int64))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros((4, 8)), torch.tensor([[0, 4]])), r"cu_seqlens must have 1 dimensions, got shape \[1, 2\]"),
        ((torch.zeros((4, 8)), torch.tensor([0.0, 4.0])), "cu_seqlens must be int32 or int64, got float32"),
        ((torch.zeros((4, 8)), torch.zeros(0, dtype=torch.int32)), r"B \+ 1 >= 1 entries, got 0"),
        ((torch.zeros((4, 8), dtype=torch.float64), torch.tensor([0, 2**62, 4])), "packed must be float32"),
        ((torch.zeros((4, 2, 8)), torch.tensor([0, 2**62, 4])), "packed must have 2 dimensions"),
        ((torch.zeros((4, 8)), torch.tensor([0, 2**62, 4], device="meta")), "device must be 'cpu' or 'cuda'"),
    ],
    ids=["cu-2d", "cu-float", "cu-empty", "packed-float64", "packed-3d", "cu-meta"],
)
def test_unpack_without_max_len_leaves_other_bad_arguments_to_the_extension(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        K.unpack(*args)


def test_unpack_without_max_len_still_takes_valid_edge_cases() -> None:
    packed = torch.arange(8.0).view(4, 2)
    for cu, want in (([0, 0, 4, 4], (3, 4, 2)), ([0, 4], (1, 4, 2)), ([0, 1, 2, 3, 4], (4, 1, 2))):
        for dt in (torch.int32, torch.int64):
            c = torch.tensor(cu, dtype=dt)
            out = K.unpack(packed, c)
            assert out.shape == want
            assert torch.equal(out, ref_unpack(packed, c, want[1]))
    assert K.unpack(torch.zeros((0, 8)), torch.zeros(1, dtype=torch.int32)).shape == (0, 0, 8)


NOT_A_TENSOR = [1, 2]
CU = torch.tensor([0, 4], dtype=torch.int32)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: K.attention(NOT_A_TENSOR, CU), "qkv"),
        (lambda: K.attention(torch.zeros((4, 3, 2, 8)), NOT_A_TENSOR), "cu_seqlens"),
        (lambda: K.unpack(NOT_A_TENSOR, CU), "packed"),
        (lambda: K.unpack(torch.zeros((4, 8)), NOT_A_TENSOR), "cu_seqlens"),
        (lambda: K.unpack(torch.zeros((4, 8)), NOT_A_TENSOR, 4), "cu_seqlens"),
        (lambda: K.bias_gelu_(NOT_A_TENSOR, torch.zeros(8)), "x"),
        (lambda: K.pack(NOT_A_TENSOR, torch.tensor([1])), "x"),
        (lambda: K.pack(torch.zeros((1, 4, 8)), NOT_A_TENSOR), "lengths"),
        (lambda: K.segment_pool(NOT_A_TENSOR, CU), "x"),
        (lambda: K.segment_pool(torch.zeros((4, 8)), NOT_A_TENSOR), "cu_seqlens"),
        (lambda: K.gather(NOT_A_TENSOR, torch.tensor([0])), "x"),
        (lambda: K.gather(torch.zeros((4, 8)), NOT_A_TENSOR), "index"),
    ],
    ids=["attention-qkv", "attention-cu", "unpack-packed", "unpack-cu", "unpack-cu-max_len", "bias_gelu-x",
         "pack-x", "pack-lengths", "segment_pool-x", "segment_pool-cu", "gather-x", "gather-index"],
)
def test_a_non_tensor_argument_is_a_type_error(call, name: str) -> None:
    with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor, got list$"):
        call()


def test_out_of_range_indices_are_rejected() -> None:
    x = torch.zeros((3, 4))
    for dt in (torch.int32, torch.int64):
        with pytest.raises(ValueError, match=r"index\[1\] = 3 is out of range for 3 rows"):
            K.gather(x, torch.tensor([0, 3], dtype=dt))
        with pytest.raises(ValueError, match=r"index\[0\] = -1 is out of range"):
            K.gather(x, torch.tensor([-1], dtype=dt))


def test_wrong_output_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"out must have shape \[5, 4\], got \[4, 4\]"):
        _k.pack(arg(X), arg(LENGTHS), arg(torch.zeros((4, 4))))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"out must have shape \[2, 3, 4\], got \[2, 3, 5\]"):
        _k.unpack(arg(torch.zeros((5, 4))), arg(cu), arg(torch.zeros((2, 3, 5))))
    with pytest.raises(ValueError, match=r"out must have shape \[2, 4\]"):
        _k.segment_pool(arg(torch.zeros((5, 4))), arg(cu), arg(torch.zeros((3, 4))), "mean", False)
    with pytest.raises(ValueError, match=r"out must have shape \[1, 4\]"):
        _k.gather(arg(torch.zeros((5, 4))), arg(torch.tensor([0])), arg(torch.zeros((1, 5))))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        K.pack(torch.zeros((2, 3)), LENGTHS)


def test_sizes_that_overflow_are_rejected() -> None:
    t = torch.zeros(4)
    with pytest.raises(ValueError, match="too many elements"):
        _k.pack(arg(t, shape=[2**40, 2**40, 4]), arg(LENGTHS), arg(t, shape=[5, 4]))
    with pytest.raises(ValueError, match="too large"):
        _k.gather(arg(t, shape=[2**62, 1]), arg(torch.tensor([0])), arg(t, shape=[1, 1]))
    with pytest.raises(ValueError, match="negative dimension"):
        _k.gather(arg(t, shape=[-1, 4]), arg(torch.tensor([0])), arg(t, shape=[1, 4]))


def test_unknown_pool_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode must be 'mean', 'cls' or 'max', got 'sum'"):
        K.segment_pool(torch.zeros((2, 4)), torch.tensor([0, 2]), mode="sum")  # type: ignore[arg-type]


def test_float_parameters_are_checked_as_the_float32_the_kernels_use() -> None:
    # attention's scale and add_layer_norm_'s eps arrive as doubles and run
    # as float32: 1e39 is finite as a double but +inf as a float32 (every
    # output NaN), 1e-50 is > 0 as a double but 0 as a float32.
    qkv, cu = torch.randn(6, 3, 1, 16), K.cu_seqlens_from_lengths(torch.tensor([6]))
    for scale, as_float in ((1e39, "inf"), (-1e39, "-inf"), (1e-50, "0"), (-1e-50, "-0")):
        with pytest.raises(ValueError, match=rf"scale must be finite and > 0 as a float32, got .* \({as_float} as a float32\)"):
            K.attention(qkv, cu, scale)
    for scale in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            K.attention(qkv, cu, scale)
    # The largest and smallest positive float32 scales still run.
    assert not K.attention(qkv, cu, 1e-45).isnan().any()
    assert K.attention(qkv, cu, 3.4e38).shape == (6, 1, 16)
    x, v = torch.randn(2, 16), torch.randn(16)
    for eps in (1e39, 3.5e38, float("nan"), float("inf"), -1e-5):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            K.add_layer_norm_(x.clone(), v, x.clone(), v, v, eps)
    # eps = 0 is torch's too, and so is an eps that rounds to 0 as a float32.
    for eps in (0.0, 1e-50):
        y = K.add_layer_norm_(x.clone(), v, x.clone(), v, v, eps)
        torch.testing.assert_close(y, F.layer_norm(2 * x + v, (16,), v, v, 0.0), atol=1e-5, rtol=1e-5)


def test_validation_failures_write_nothing() -> None:
    out = torch.full((5, 4), 7.0)
    with pytest.raises(ValueError):
        _k.pack(arg(torch.ones((2, 3, 4))), arg(torch.tensor([2, 4], dtype=torch.int32)), arg(out))
    assert torch.equal(out, torch.full((5, 4), 7.0))


# --------------------------------------------------------------- CUDA vs CPU


GPU_SHAPES = [(1, 1, 1), (1, 17, 384), (7, 33, 13), (3, 4096, 8), (64, 128, 768), (9, 20, 771)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_cuda_pack_and_unpack_match_cpu_kernels(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    gen = torch.Generator().manual_seed(5)
    b, L, h = shape
    x = randn(gen, shape, dtype)
    lengths = random_lengths(gen, b, L, allow_empty=True).to(torch.int32)
    cu = K.cu_seqlens_from_lengths(lengths)
    want = K.pack(x, lengths)
    got = K.pack(x.cuda(), lengths.cuda())
    assert torch.equal(got.cpu(), want)
    assert torch.equal(K.unpack(got, cu.cuda(), L).cpu(), K.unpack(want, cu, L))


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_cuda_segment_pool_matches_cpu_kernel(
    dtype: torch.dtype, shape: tuple[int, int, int], mode: str, normalize: bool
) -> None:
    gen = torch.Generator().manual_seed(6)
    b, L, h = shape
    lengths = random_lengths(gen, b, L, allow_empty=True)
    cu = K.cu_seqlens_from_lengths(lengths)
    x = randn(gen, (int(lengths.sum()), h), dtype)
    want = K.segment_pool(x, cu, mode, normalize)
    got = K.segment_pool(x.cuda(), cu.cuda(), mode, normalize)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_gather_matches_cpu_kernel_and_zeroes_rows_out_of_range(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    for n, h in [(1, 1), (10, 13), (300, 384), (50, 7), (3000, 768)]:
        x = randn(gen, (n, h), dtype)
        idx = torch.randint(0, n, (2 * n + 1,), generator=gen)
        assert torch.equal(K.gather(x.cuda(), idx.cuda()).cpu(), K.gather(x, idx))
    # CUDA indices are not read on the host: one outside [0, N) gives zeros, never a read outside x.
    x = torch.arange(12.0).view(3, 4)
    got = K.gather(x.cuda(), torch.tensor([3, 1, -1, 2**40, 0], device="cuda")).cpu()
    assert torch.equal(got, torch.stack([torch.zeros(4), x[1], torch.zeros(4), torch.zeros(4), x[0]]))


def test_segment_pool_needs_no_scratch_on_the_cpu() -> None:
    x, cu = torch.zeros((8192, 16)), torch.tensor([0, 8192])
    assert _k.segment_pool_scratch(K._arg(x, "x"), K._arg(cu, "cu"), "mean") == 0
    with pytest.raises(ValueError, match="mode must be"):
        _k.segment_pool_scratch(K._arg(x, "x"), K._arg(cu, "cu"), "sum")


def _cuda_calls(x: torch.Tensor, packed: torch.Tensor, cu: torch.Tensor, L: int, index: torch.Tensor) -> list:
    """Every CUDA kernel once, with every size given (no call needs a host read)."""
    T = packed.shape[0]
    return [
        K.pack(x, cu, total=T),
        K.unpack(packed, cu, L),
        K.segment_pool(packed, cu, "mean", True),
        K.segment_pool(packed, cu, "max", False),
        K.segment_pool(packed, cu, "cls", True),
        K.gather(packed, index),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("offsets", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernels_take_int32_and_int64_device_offsets(dtype: torch.dtype, offsets: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(9)
    B, L, H = 37, 300, 264  # sequences over several copy runs; H / 8 groups not a power of two
    lengths = random_lengths(gen, B, L, allow_empty=True)
    cu = K.cu_seqlens_from_lengths(lengths).to(offsets)
    x = randn(gen, (B, L, H), dtype)
    packed = K.pack(x, lengths)
    index = torch.randint(0, packed.shape[0], (1000,), generator=gen).to(offsets)
    got = _cuda_calls(x.cuda(), packed.cuda(), cu.cuda(), L, index.cuda())
    want = _cuda_calls(x, packed, cu, L, index)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)
    # lengths [B] on CUDA: cu_seqlens made on the device.
    assert torch.equal(K.pack(x.cuda(), lengths.to(offsets).cuda()).cpu(), packed)


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["mean", "max"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[8192], [5000, 0, 7, 3000], [0, 0, 0]], ids=["one-long", "mixed", "all-empty"])
def test_cuda_segment_pool_splits_long_sequences_over_blocks(
    dtype: torch.dtype, mode: str, normalize: bool, lengths: list[int]
) -> None:
    gen = torch.Generator().manual_seed(10)
    cu = K.cu_seqlens_from_lengths(torch.tensor(lengths))
    x = randn(gen, (sum(lengths), 768), dtype) + (1.0 if mode == "mean" else 0.0)  # a mean away from 0
    xc, cc = x.cuda(), cu.cuda()
    if sum(lengths):  # a few long sequences do not fill the device alone: the kernel splits them
        assert _k.segment_pool_scratch(K._arg(xc, "x"), K._arg(cc, "cu"), mode) > 0
    want = K.segment_pool(x, cu, mode, normalize)
    torch.testing.assert_close(K.segment_pool(xc, cc, mode, normalize).cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_kernels_neither_read_offsets_on_the_host_nor_wait_for_the_stream() -> None:
    gen = torch.Generator().manual_seed(11)
    B, L, H = 16, 64, 128
    lengths = random_lengths(gen, B, L, allow_empty=True)
    cu = K.cu_seqlens_from_lengths(lengths).cuda()
    x = randn(gen, (B, L, H), torch.float16).cuda()
    packed = K.pack(x, cu)
    index = torch.randint(0, packed.shape[0], (50,), generator=gen).cuda()
    long = randn(gen, (8192, H), torch.float16).cuda()
    long_cu = torch.tensor([0, 8192], dtype=torch.int32, device="cuda")
    calls = lambda: [*_cuda_calls(x, packed, cu, L, index), K.segment_pool(long, long_cu)]  # noqa: E731
    calls()  # loads the kernels (a first launch may synchronise)
    torch.cuda.synchronize()
    # No torch-level sync (a .cpu(), an int() of a device tensor) in the wrappers ...
    torch.cuda.set_sync_debug_mode("error")
    try:
        # ... and none in the extension (set_sync_debug_mode does not see a
        # cudaStreamSynchronize there): behind a ~0.5 s sleep on the stream,
        # the calls return while it still runs.
        torch.cuda._sleep(1_000_000_000)
        slept = torch.cuda.Event()
        slept.record()
        calls()
        assert not slept.query(), "a CUDA kernel call waited for the stream"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_kernels_stay_in_bounds_on_malformed_offsets() -> None:
    x = torch.ones((4, 6, 8), device="cuda")
    packed = torch.ones((10, 8), device="cuda")
    for bad in ([0, 3, 2, 7, 10], [-5, 3, 6, 9, 10], [0, 2, 4, 6, 1000], [0, 9, 9, 9, 10], [2**40, 0, -(2**40), 3, 10]):
        cu = torch.tensor(bad, device="cuda")
        outs = [K.pack(x, cu, total=10), K.unpack(packed, cu, 6), K.segment_pool(packed, cu, "mean", True),
                K.segment_pool(packed, cu, "max"), K.segment_pool(packed, cu, "cls")]
        torch.cuda.synchronize()  # an out-of-bounds access would raise here (illegal address)
        for o in outs[1:]:
            assert torch.isfinite(o).all()
    assert torch.equal(K.unpack(packed, torch.tensor([0, 4, 10], device="cuda"), 6).sum(), torch.tensor(80.0, device="cuda"))


@pytest.mark.gpu
def test_cuda_kernels_run_on_the_current_stream_and_on_unaligned_views() -> None:
    gen = torch.Generator().manual_seed(8)
    base = randn(gen, (1 + 4 * 5 * 8,), torch.float16)
    x = base[1:].view(4, 5, 8)  # contiguous, not 16-byte aligned
    lengths = torch.tensor([5, 1, 3, 2], dtype=torch.int32)
    want = K.pack(x, lengths)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        xc = base.cuda()[1:].view(4, 5, 8)
        got = K.pack(xc, lengths.cuda())
    s.synchronize()
    assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
def test_cuda_rejects_tensors_on_different_devices() -> None:
    with pytest.raises(ValueError, match="one device"):
        K.pack(torch.zeros((2, 3, 4), device="cuda"), LENGTHS)
