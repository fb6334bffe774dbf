"""Engine dtypes on the CPU: float32 by default, bfloat16 weights, float32
weights under bfloat16 autocast; pooling in float32; a warning where the CPU
has no native bfloat16; the CPU's features in stats(). The accuracy bound of
bfloat16 and autocast against float32 is checked with the real MiniLM on the
shipped corpus."""

from __future__ import annotations

import platform
import warnings

import numpy as np
import pytest
import torch

import tiny_models as tm
from fastserve import Engine, precision

TEXTS = ["a short one", "the quick brown fox jumps over the lazy dog", "x", "a somewhat longer sentence " * 4]


def test_auto_is_float32_on_cpu_and_autocast_keeps_float32_weights():
    cpu = torch.device("cpu")
    auto = precision.resolve("auto", cpu)
    assert (auto.name, auto.weights, auto.autocast) == ("float32", torch.float32, None)
    mixed = precision.resolve("autocast", cpu)
    assert (mixed.name, mixed.weights, mixed.autocast, mixed.compute) == (
        "autocast", torch.float32, torch.bfloat16, torch.bfloat16)
    assert precision.resolve("bfloat16", cpu).weights == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        precision.resolve("int8", cpu)


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("dtype", ["bfloat16", "autocast"])
def test_half_precision_embeddings_are_float32_and_close_to_float32(execution, dtype):
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), execution=execution) as ref, \
            Engine(m, tm.tokenizer(), execution=execution, dtype=dtype) as eng:
        want, got = ref.embed(TEXTS), eng.embed(TEXTS)
        s = eng.stats()
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised in float32
    assert (got * want).sum(1).min() > 0.99
    assert s["dtype"] == dtype and s["compute_dtype"] == "bfloat16"
    assert s["weights_dtype"] == ("float32" if dtype == "autocast" else "bfloat16")
    # autocast leaves the caller's float32 model shared, bfloat16 works on a copy
    assert s["process"]["model"] == ("shared" if dtype == "autocast" else "copied")
    assert next(m.parameters()).dtype == torch.float32


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("stack", ["mean-dense-normalize", "max-meansqrt"])
@pytest.mark.parametrize("dtype", ["bfloat16", "autocast"])
def test_a_dense_module_runs_in_float32_in_every_dtype(tmp_path, execution, stack, dtype):
    """A sentence-transformers Dense after pooling runs in float32 under
    dtype="autocast" too (the worker's autocast ran its linear in bfloat16,
    and every request failed converting the result)."""
    import warnings as w

    import st_models
    from sentence_transformers import SentenceTransformer

    folder = st_models.save("bert", stack, tmp_path)
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    with w.catch_warnings():
        w.simplefilter("ignore")  # emulated bfloat16 on this CPU
        with Engine(str(folder), dtype=dtype, execution=execution, replicas=1) as eng:
            got = eng.embed(TEXTS)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert tm.min_cosine(got, want) > 0.999


@pytest.mark.parametrize("dtype", ["bfloat16", "autocast"])
def test_half_precision_classification_scores_are_float32_probabilities(dtype):
    with Engine(tm.model("bert", classify=True), tm.tokenizer(), task="classify", dtype=dtype) as eng:
        out = eng.classify(TEXTS)
    for c in out:
        assert abs(sum(c.scores.values()) - 1.0) < 1e-5 and c.label in c.scores


def test_stats_report_the_cpu_features_found():
    with Engine(tm.model("bert"), tm.tokenizer()) as eng:
        cpu = eng.stats()["cpu"]
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(cpu) == {"capability", "flags", "onednn_max_isa", "native_bf16", "native_fp16", "amx", "kernel_isa",
                        "vendor"}
    flags = precision._cpuinfo_flags()
    if flags is not None:
        # The kernels' path follows the CPU's flags (x86-64 here; elsewhere portable).
        wide = "avx512_bf16" if "avx512_bf16" in flags else "avx512"
        want = (wide if "avx512f" in flags else "avx2") if {"avx2", "fma", "f16c"} <= flags else "portable"
        assert cpu["kernel_isa"] == (want if platform.machine() in ("x86_64", "AMD64") else "portable")
        assert cpu["flags"] == [f for f in precision.REPORTED_FLAGS if f in flags]
        assert cpu["native_bf16"] == bool({"avx512_bf16", "amx_bf16"} & flags) or cpu["onednn_max_isa"] is not None
        assert cpu["native_fp16"] == bool({"avx512_fp16", "amx_fp16"} & flags) or cpu["onednn_max_isa"] is not None


def _no_bf16_cpu(monkeypatch):
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "autocast"])
def test_bfloat16_on_a_cpu_without_native_bfloat16_runs_and_warns_how_slow(monkeypatch, dtype):
    _no_bf16_cpu(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"emulated there and runs about \d+(\.\d+)?(-\d+(\.\d+)?)?x slower than float32"):
        eng = Engine(tm.model("bert"), tm.tokenizer(), dtype=dtype)
    with eng:
        assert eng.embed(TEXTS).shape == (len(TEXTS), 32)
        assert eng.stats()["cpu"]["native_bf16"] is False


def test_float16_on_a_cpu_without_native_float16_runs_and_warns_how_slow(monkeypatch):
    _no_bf16_cpu(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"dtype='float16' on a CPU that has no AVX512-FP16 or AMX-FP16: "
                                            r"float16 is emulated there and runs about \d+-\d+x slower"):
        eng = Engine(tm.model("bert"), tm.tokenizer(), dtype="float16")
    with eng:
        assert eng.embed(TEXTS).dtype == np.float32
        assert eng.stats()["cpu"]["native_fp16"] is False


def test_float16_on_a_cpu_with_avx512_fp16_does_not_warn(monkeypatch):
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_fp16"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(tm.model("bert"), tm.tokenizer(), dtype="float16", replicas=1, warmup=False).close()


def test_float32_on_a_cpu_without_native_bfloat16_does_not_warn(monkeypatch):
    _no_bf16_cpu(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(tm.model("bert"), tm.tokenizer()).close()


def test_a_onednn_isa_cap_below_bfloat16_counts_as_no_native_bfloat16(monkeypatch):
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    feats = precision.cpu_features()
    assert feats["native_bf16"] is False and feats["amx"] is False and feats["onednn_max_isa"] == "AVX2"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert precision.cpu_features()["native_bf16"] is True


@pytest.mark.parametrize("cap, amx", [(None, True), ("ALL", True), ("AVX512_CORE_AMX", True),
                                      ("AVX512_CORE_BF16", False), ("AVX2_VNNI_2", False), ("AVX2", False)])
def test_amx_is_reported_only_where_onednn_may_use_it(monkeypatch, cap, amx):
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert precision.cpu_features()["amx"] is amx


@pytest.mark.parametrize("flags, cap, why", [
    ({"avx2", "fma"}, "AVX512_CORE_AMX", "has no AVX512-BF16 or AMX"),  # the cap is not why: the CPU lacks them
    ({"avx2", "fma"}, None, "has no AVX512-BF16 or AMX"),
    ({"avx512f", "avx512_bf16", "amx_bf16"}, "AVX2", "runs oneDNN capped at ONEDNN_MAX_CPU_ISA=AVX2"),
])
def test_the_slow_bfloat16_warning_names_the_real_reason(monkeypatch, flags, cap, why):
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset(flags))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    p = precision.resolve("bfloat16", torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match=f"a CPU that {why}:"):
        precision.warn_if_slow(p)


# The bound the README states: the smallest cosine between an embedding and
# its float32 counterpart over the whole shipped corpus, with the real model.
MIN_COSINE = 0.999


def _min_cosine_vs_float32(texts, dtype):
    with Engine(max_batch_tokens=2048) as ref:
        want = ref.embed(texts)
    with Engine(dtype=dtype, max_batch_tokens=2048) as eng:
        got = eng.embed(texts)
    return tm.min_cosine(want, got)


@pytest.mark.parametrize("dtype", ["bfloat16", "autocast"])
def test_real_model_on_every_eighth_corpus_text_stays_within_the_stated_bound_of_float32(dtype):
    from fastserve.corpus import texts

    sample = list(texts())[::8]
    assert _min_cosine_vs_float32(sample, dtype) >= MIN_COSINE


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "autocast"])
def test_real_model_on_the_whole_shipped_corpus_stays_within_the_stated_bound_of_float32(dtype):
    from fastserve.corpus import texts

    assert _min_cosine_vs_float32(list(texts()), dtype) >= MIN_COSINE

