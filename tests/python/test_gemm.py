"""The CPU layer kernels' matrix products (python/fastserve/gemm.py): the
pieces oneDNN's calls take, their results against torch.mm and float64, the
default method per CPU, the override, and an engine on either method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm
from fastserve import Engine, footprint, gemm

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch has no oneDNN")
# oneDNN's bf16 products need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: not on an AVX2-only CPU.
needs_onednn_bf16 = pytest.mark.skipif(gemm.onednn_cannot(torch.bfloat16) is not None,
                                       reason=f"{gemm.onednn_cannot(torch.bfloat16)}")

AMD_AVX512 = {"flags": ["avx2", "fma", "avx512f"], "vendor": "AuthenticAMD", "onednn_max_isa": None}


def test_pieces_cover_the_rows_in_order_in_eight_sizes():
    sizes: set[int] = set()
    for rows in range(1, 3000):
        calls = gemm.pieces(rows)
        assert calls[0][0] == 0 and sum(n for _, n in calls) == rows
        assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))
        *whole, (_, last) = calls
        assert all(n in (512, 256, 128, 64, 32, 16) for _, n in whole)
        assert last in (512, 256, 128, 64, 32, 16) or last < gemm.GRANULE
        sizes.update(n for _, n in whole)
        assert gemm.padded_rows(last) >= last
        sizes.add(gemm.padded_rows(last))  # a short last piece is padded up to 4, 8 or 16 rows
    assert sizes == {512, 256, 128, 64, 32, 16, 8, 4}  # oneDNN's cache holds eight shapes per weight shape


def test_a_short_last_piece_is_padded_to_the_power_of_two_above_it():
    assert [gemm.padded_rows(n) for n in range(1, 17)] == [4] * 4 + [8] * 4 + [16] * 8
    assert gemm.padded_rows(16) == 16 and gemm.padded_rows(512) == 512


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5, 15, 16, 17, 63, 64, 100, 511, 512, 513, 1100, 2047])
@pytest.mark.parametrize("k, n", [(64, 192), (256, 64)])
def test_onednn_products_equal_torch_mm_and_float64(rows, k, n):
    torch.manual_seed(rows)
    w, x = torch.randn(n, k), torch.randn(rows, k)
    want = (x.double() @ w.double().t())
    got = gemm.Gemm(w, "onednn")(x)
    assert got.shape == (rows, n) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got, gemm.Gemm(w, "mm")(x), atol=1e-4, rtol=1e-5)


@needs_onednn
def test_a_row_gets_the_same_bits_whatever_rows_come_with_it():
    # What keeps an embedding bitwise the same in any batch (one thread).
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(2100, 64)
    g = gemm.Gemm(w, "onednn")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = g(x[:3])
        for rows in (3, 5, 9, 16, 21, 40, 100, 512, 700, 2100):  # tails of 4, 8 and 16 rows among them
            torch.testing.assert_close(g(x[:rows])[:3], alone, atol=0, rtol=0)
        shifted = g(x[7:1200])
        torch.testing.assert_close(shifted[:3], g(x[7:10]), atol=0, rtol=0)
    finally:
        torch.set_num_threads(before)


@needs_onednn_bf16
def test_bfloat16_products_through_onednn_equal_torch_mm():
    torch.manual_seed(1)
    w, x = torch.randn(64, 128).bfloat16(), torch.randn(700, 128).bfloat16()
    got = gemm.Gemm(w, "onednn")(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), (x.float() @ w.float().t()), atol=0.1, rtol=0.02)


@needs_onednn
def test_the_reordered_weight_is_counted():
    w = torch.randn(48, 32)
    assert gemm.Gemm(w, "onednn").extra_bytes == 48 * 32 * 4
    assert gemm.Gemm(w, "mm").extra_bytes == 0
    with pytest.raises(ValueError, match="method must be one of"):
        gemm.Gemm(w, "blas")


@pytest.mark.parametrize("cpu, dtype, want", [
    (AMD_AVX512, torch.float32, "onednn"),
    (AMD_AVX512, torch.bfloat16, "onednn"),  # torch.mm reorders the weight per call: a short batch pays it
    ({**AMD_AVX512, "vendor": "GenuineIntel"}, torch.bfloat16, "onednn"),
    ({**AMD_AVX512, "vendor": "GenuineIntel"}, torch.float32, "mm"),  # MKL has AVX-512 on Intel
    ({**AMD_AVX512, "flags": ["avx2", "fma"]}, torch.float32, "mm"),  # AVX2 only: oneDNN measured slower
    ({**AMD_AVX512, "onednn_max_isa": "AVX2"}, torch.float32, "mm"),  # oneDNN capped below AVX-512
    ({**AMD_AVX512, "onednn_max_isa": "AVX512_CORE"}, torch.float32, "onednn"),
    ({**AMD_AVX512, "vendor": None}, torch.float32, "mm"),  # unknown: keep torch's
    ({**AMD_AVX512, "flags": None}, torch.float32, "mm"),
])
def test_the_default_method_per_cpu(cpu, dtype, want, monkeypatch):
    monkeypatch.setattr(gemm, "onednn_available", lambda: True)
    monkeypatch.setattr(gemm, "onednn_cannot", lambda dtype: None)
    assert gemm.default_method(dtype, cpu) == want


def test_bfloat16_products_stay_on_torch_mm_where_onednn_cannot_run_them(monkeypatch):
    # oneDNN capped below AVX-512, or absent: torch.mm emulates them.
    monkeypatch.setattr(gemm, "onednn_cannot", lambda dtype: "capped to AVX2")
    assert gemm.default_method(torch.bfloat16, AMD_AVX512) == "mm"
    assert gemm.default_method(torch.bfloat16, {**AMD_AVX512, "vendor": "GenuineIntel"}) == "mm"


def test_without_onednn_the_default_is_torch_mm(monkeypatch):
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    assert gemm.default_method(torch.float32, AMD_AVX512) == "mm"


def test_the_override_is_checked(monkeypatch):
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="FASTSERVE_CPU_GEMM must be one of"):
        gemm.method(torch.float32)
    with pytest.raises(ValueError, match="FASTSERVE_CPU_GEMM must be one of"):
        Engine(tm.model("bert"), tm.tokenizer(), execution="packed")
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", "onednn")
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    with pytest.raises(ValueError, match="FASTSERVE_CPU_GEMM=onednn cannot run torch.float32 products on this CPU: this torch has no oneDNN"):
        gemm.method(torch.float32)
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", "mm")
    assert gemm.method(torch.float32) == "mm"


@needs_onednn
def test_a_forced_onednn_that_cannot_run_bfloat16_here_is_refused_by_name():
    # oneDNN capped to AVX2 has no bf16 products: a clear ValueError at
    # construction, not torch's RuntimeError (the cap is read once per process).
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom fastserve import gemm\nprint(gemm.method(torch.float32))\n"
            "try:\n    gemm.method(torch.bfloat16)\nexcept ValueError as e:\n    print('refused:', e)\n")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", FASTSERVE_CPU_GEMM="onednn")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "onednn"
    assert lines[1].startswith("refused: FASTSERVE_CPU_GEMM=onednn cannot run torch.bfloat16 products on this CPU")
    assert "ONEDNN_MAX_CPU_ISA='AVX2'" in lines[1]


def _engine(monkeypatch, method, arch="bert"):
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", method)
    engine = Engine(tm.model(arch), tm.tokenizer(), execution="packed")
    monkeypatch.delenv("FASTSERVE_CPU_GEMM")
    assert engine.runner.fused is not None  # CI's CPUs have the kernels' AVX2 path
    return engine


@needs_onednn
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_an_engine_gives_the_same_embeddings_on_either_method(arch, monkeypatch):
    texts = tm.mixed_texts(40, seed=5)
    out, stats = {}, {}
    for method in gemm.GEMMS:
        with _engine(monkeypatch, method, arch) as engine:
            out[method] = engine.embed(texts)
            stats[method] = engine.stats()
    np.testing.assert_allclose(out["onednn"], out["mm"], atol=2e-6, rtol=0)
    assert stats["mm"]["gemm"] == "mm" and stats["onednn"]["gemm"] == "onednn"
    m = tm.model(arch)
    layers = m.encoder.layer if arch == "bert" else m.transformer.layer
    linear = sum(mod.weight.numel() * 4 for layer in layers for mod in layer.modules()
                 if isinstance(mod, torch.nn.Linear))
    # The caller's model is shared, so "mm" keeps Q/K/V fused as a copy
    # (weights and biases; runners.FusedQKV) and "onednn" its reordered
    # weights, Q/K/V fused among them, plus the fused Q/K/V bias.
    qkv_bias = sum(mod.bias.numel() * 4 for layer in layers for name, mod in layer.named_modules()
                   if name.split(".")[-1] in ("query", "key", "value", "q_lin", "k_lin", "v_lin"))
    qkv = qkv_bias + sum(mod.weight.numel() * 4 for layer in layers for name, mod in layer.named_modules()
                         if name.split(".")[-1] in ("query", "key", "value", "q_lin", "k_lin", "v_lin"))
    assert stats["mm"]["memory"]["gemm_weights_bytes"] == qkv
    assert stats["onednn"]["memory"]["gemm_weights_bytes"] == linear + qkv_bias


def test_layers_through_the_modules_report_no_method(monkeypatch):
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "runs")
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed") as engine:
        assert engine.stats()["gemm"] is None and engine.stats()["memory"]["gemm_weights_bytes"] == 0
    with Engine(tm.model("bert"), tm.tokenizer(), execution="padded") as engine:
        assert engine.stats()["gemm"] is None


@pytest.mark.parametrize("method", gemm.GEMMS)
def test_an_autocast_engine_runs_the_fused_layers_on_bfloat16_copies_of_the_weights(method, monkeypatch):
    # Under autocast the fused layers take their products in bfloat16 from
    # copies of the weights made once (counted, beside oneDNN's reordered
    # copy where forced), attention in the kernel's bfloat16 path, and keep
    # the residual stream and LayerNorms in float32: within a hair of what
    # torch.autocast gives the modules, and the budget counts the float32
    # fused layers' activations and pieces (upper bounds of the mixed ones).
    if method == "onednn" and gemm.onednn_cannot(torch.bfloat16):
        pytest.skip(f"oneDNN cannot run bfloat16 products here: {gemm.onednn_cannot(torch.bfloat16)}")
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", method)
    texts = tm.mixed_texts(40, seed=7)
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed", dtype="autocast",
                max_batch_memory_mb=0.5) as engine:
        got = engine.embed(texts)
        s = engine.stats()
        assert engine.runner.fused is not None
        budget = engine.memory_budget
    assert (s["gemm"], s["attention"], s["compute_dtype"]) == (method, "kernel", "bfloat16")
    assert s["attention_batches"]["kernel"] == s["batches"] > 0
    # The copies in bfloat16 (the Q/K/V and intermediate biases too; for
    # "onednn" the reordered weights alone, not a plain copy beside them).
    layers = tm.model("bert").encoder.layer
    linear = sum(mod.weight.numel() for layer in layers for mod in layer.modules() if isinstance(mod, torch.nn.Linear))
    biases = sum(lin.bias.numel() for layer in layers for lin in (
        layer.attention.self.query, layer.attention.self.key, layer.attention.self.value, layer.intermediate.dense))
    assert s["memory"]["gemm_weights_bytes"] == 2 * (linear + biases)
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed", max_batch_memory_mb=0.5,
                warmup=False) as fp32:
        assert fp32.runner.fused is not None
        piece_row = footprint.gemm_piece_row_bytes(footprint.shape_of(tm.model("bert").config), torch.float32)
        assert (budget.bytes_per_token, budget.piece_row_bytes) == (
            fp32.memory_budget.bytes_per_token, piece_row if method == "onednn" else 0)
        exact = fp32.embed(texts)
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "runs")
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed", dtype="autocast", warmup=False) as modules:
        assert modules.runner.fused is None
        torch_autocast = modules.embed(texts)
    assert tm.min_cosine(got, exact) > 0.999 and tm.min_cosine(torch_autocast, exact) > 0.999
    assert tm.min_cosine(got, torch_autocast) > 0.9995


@needs_onednn
def test_the_memory_budget_counts_a_piece_of_a_product(monkeypatch):
    budgets = {}
    for method in gemm.GEMMS:
        monkeypatch.setenv("FASTSERVE_CPU_GEMM", method)
        with Engine(tm.model("bert"), tm.tokenizer(), execution="packed", max_batch_memory_mb=0.5,
                    warmup=False) as engine:
            assert engine.runner.fused is not None
            budgets[method] = engine.memory_budget
    shape = footprint.shape_of(tm.model("bert").config)
    row = footprint.gemm_piece_row_bytes(shape, torch.float32)
    assert row == max(3 * shape.hidden, shape.intermediate) * 4
    mm, one = budgets["mm"], budgets["onednn"]
    assert (mm.piece_row_bytes, one.piece_row_bytes, one.piece_rows) == (0, row, gemm.PIECE)
    for tokens in (1, 100, gemm.PIECE, 3000):
        assert one.batch_bytes(tokens) == mm.batch_bytes(tokens) + row * min(tokens, gemm.PIECE)
    for budget in (mm, one):  # the most tokens that fit
        assert budget.batch_bytes(budget.tokens) <= 0.5 * 2**20 < budget.batch_bytes(budget.tokens + 1)


@pytest.mark.parametrize("mib", [0.01, 0.05, 0.3, 2.0, 40.0])
def test_a_budget_with_a_piece_holds_the_most_tokens_that_fit(mib):
    # Either side of the piece's PIECE rows: the closed form against a search.
    budget = footprint.MemoryBudget(mib, bytes_per_token=300, fixed_bytes=5000, piece_row_bytes=700, piece_rows=64)
    t = budget.tokens
    assert t == max((n for n in range(0, 200_000) if budget.batch_bytes(n) <= mib * 2**20), default=0)
