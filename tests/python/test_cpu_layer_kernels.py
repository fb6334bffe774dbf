"""The CPU layer kernels (fastserve.kernels.attention, bias_gelu_,
add_layer_norm_) against torch, and the packed runner's float32 layers
through them against the model's own modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_models as tm
from fastserve import Engine, kernels


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)


@pytest.mark.parametrize("hd", [8, 12, 32, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_equals_sdpa_per_sequence(hd: int, threads: int) -> None:
    torch.manual_seed(hd)
    lengths = [1, 0, 7, 8, 9, 40, 3, 130]
    nh = 3
    qkv = torch.randn(sum(lengths), 3, nh, hd)
    bias = torch.randn(3 * nh * hd)
    cu = _cu(lengths)
    want = kernels.torch_attention(qkv, cu)
    got = kernels.attention(qkv, cu, threads=threads)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # The projection's bias added inside equals it added beforehand.
    with_bias = kernels.attention(qkv, cu, bias=bias, threads=threads)
    torch.testing.assert_close(with_bias, kernels.torch_attention(qkv + bias.view(3, nh, hd), cu),
                               atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(kernels.torch_attention(qkv, cu, bias=bias), with_bias, atol=2e-6, rtol=1e-5)
    # An explicit scale reaches the softmax.
    torch.testing.assert_close(kernels.attention(qkv, cu, 0.5), kernels.torch_attention(qkv, cu, 0.5),
                               atol=2e-6, rtol=1e-5)


def _isa_paths() -> list[str]:
    """Every kernel path this CPU can run, up to its best."""
    order = ("portable", "avx2", "avx512", "avx512_bf16")
    return list(order[:order.index(kernels.cpu_isa()) + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [8, 32])
def test_attention_propagates_nan_and_inf_as_sdpa_does(hd: int, dtype) -> None:
    # A NaN in a key or a query, or an infinite score, is NaN in the rows it
    # reaches (as SDPA gives it), on every path: not finite output that a
    # broken model would serve as plausible vectors.
    torch.manual_seed(hd)
    lengths, nh = [5, 9, 4], 2
    cu = _cu(lengths)
    base = torch.randn(sum(lengths), 3, nh, hd)
    cases = {"nan key": (6, 1, float("nan")), "nan query": (0, 0, float("nan")), "inf key": (7, 1, float("inf"))}
    for what, (token, part, value) in cases.items():
        qkv = base.clone()
        qkv[token, part, 0, :] = value
        qkv[:, 0] = qkv[:, 0].abs()  # every query positive: an infinite key's score is +inf
        qkv = qkv.to(dtype)
        want = kernels.torch_attention(qkv.float(), cu)
        assert want.isnan().any(), what
        for isa in _isa_paths():
            with kernels.cpu_isa_cap(isa):
                got = kernels.attention(qkv, cu).float()
            assert torch.equal(got.isnan(), want.isnan()), (what, isa)
            torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=2e-2, rtol=2e-2)


def test_the_isa_cap_narrows_every_path_and_restores() -> None:
    best = kernels.cpu_isa()
    order = ("portable", "avx2", "avx512", "avx512_bf16")
    assert best in order
    torch.manual_seed(0)
    lengths = [5, 17, 33]
    qkv, cu = torch.randn(sum(lengths), 3, 2, 32), _cu(lengths)
    x, b = torch.randn(40, 1536), torch.randn(1536)
    want_gelu = F.gelu(x + b)
    for isa in order:
        with kernels.cpu_isa_cap(isa):
            assert order.index(kernels.cpu_isa()) == min(order.index(isa), order.index(best))
            torch.testing.assert_close(kernels.attention(qkv, cu), kernels.torch_attention(qkv, cu),
                                       atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(kernels.bias_gelu_(x.clone(), b), want_gelu, atol=2e-6, rtol=1e-5)
        assert kernels.cpu_isa() == best
    with pytest.raises(RuntimeError, match="inside"), kernels.cpu_isa_cap("portable"):
        raise RuntimeError("inside")
    assert kernels.cpu_isa() == best
    with pytest.raises(ValueError, match="isa must be 'avx512_bf16', 'avx512', 'avx2' or 'portable', got 'sse'"):
        with kernels.cpu_isa_cap("sse"):
            pass
    assert kernels.cpu_isa() == best


def test_isa_caps_in_two_threads_take_turns_and_restore_the_best() -> None:
    # A enters, B tries to, A leaves, B leaves: interleaved, B restored the
    # cap A had set, for the rest of the process.
    import threading

    best = kernels.cpu_isa()
    order: list[str] = []
    a_in, b_tried, b_in, a_out = (threading.Event() for _ in range(4))

    def a() -> None:
        with kernels.cpu_isa_cap("portable"):
            order.append("a in")
            a_in.set()
            b_tried.wait(10)
            b_in.wait(0.2)  # B waits for this block to end (it entered at once, before)
            order.append("a out")
        a_out.set()

    def b() -> None:
        a_in.wait(10)
        b_tried.set()
        with kernels.cpu_isa_cap("avx2"):
            order.append("b in")
            b_in.set()
            a_out.wait(10)
            order.append("b out")

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert order == ["a in", "a out", "b in", "b out"]
    assert kernels.cpu_isa() == best
    with kernels.cpu_isa_cap("avx2"), kernels.cpu_isa_cap("portable"):  # nesting in one thread
        assert kernels.cpu_isa() == "portable"
    assert kernels.cpu_isa() == best


def test_an_engine_gives_the_same_embeddings_on_every_kernel_path() -> None:
    texts = ["a short one", "a somewhat longer text about packed attention " * 3, "x"]
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed") as eng:
        want = eng.embed(texts)
        for isa in ("portable", "avx2"):
            with kernels.cpu_isa_cap(isa):
                np.testing.assert_allclose(eng.embed(texts), want, atol=1e-6)


def test_attention_rejects_bad_input_with_value_errors() -> None:
    qkv, cu = torch.randn(5, 3, 2, 8), _cu([2, 3])
    with pytest.raises(ValueError, match="qkv must be float32 or bfloat16, got float16"):
        kernels.attention(qkv.half(), cu)
    with pytest.raises(ValueError, match=r"bias must have the dtype of the kernel's input \(bfloat16\)"):
        kernels.attention(qkv.bfloat16(), cu, bias=torch.randn(48))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.attention(torch.randn(5, 3, 8, 2).transpose(2, 3), cu)
    with pytest.raises(ValueError, match=r"\[T, 3, heads, head_dim\]"):
        kernels.attention(torch.randn(5, 2, 2, 8), cu)
    with pytest.raises(ValueError, match="must equal the number of packed rows"):
        kernels.attention(qkv, _cu([2, 2]))
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.attention(qkv, cu, bias=torch.randn(47))
    with pytest.raises(ValueError, match="scale must be finite"):
        kernels.attention(qkv, cu, -1.0)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        kernels.attention(qkv, cu, threads=0)


@pytest.mark.parametrize("n", [8, 20, 1536])
def test_bias_gelu_is_exact_gelu_in_place(n: int) -> None:
    torch.manual_seed(n)
    x, b = 3 * torch.randn(33, n), torch.randn(n)
    want = F.gelu(x + b)
    y = x.clone()
    assert kernels.bias_gelu_(y, b) is y
    torch.testing.assert_close(y, want, atol=3e-6, rtol=1e-6)


@pytest.mark.parametrize("n", [8, 20, 384])
def test_add_layer_norm_equals_torch_in_place(n: int) -> None:
    torch.manual_seed(n)
    x, r = 4 * torch.randn(29, n) + 3, torch.randn(29, n)
    b, w, beta = torch.randn(n), torch.randn(n), torch.randn(n)
    want = F.layer_norm(x + b + r, (n,), w, beta, 1e-12)
    y = x.clone()
    assert kernels.add_layer_norm_(y, b, r, w, beta, 1e-12) is y
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_epilogues_reject_bad_input_with_value_errors() -> None:
    x, v = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.bias_gelu_(x, torch.randn(7))
    with pytest.raises(ValueError, match="x must be float32 or bfloat16, got float64"):
        kernels.bias_gelu_(x.double(), v)
    with pytest.raises(ValueError, match=r"residual must have the dtype of the kernel's input \(bfloat16\)"):
        kernels.add_layer_norm_(x.bfloat16(), v.bfloat16(), x.clone(), v.bfloat16(), v.bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="residual must have shape"):
        kernels.add_layer_norm_(x, v, torch.randn(3, 8), v, v, 1e-5)
    for eps in (-1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            kernels.add_layer_norm_(x, v, x.clone(), v, v, eps)


def test_a_layer_norm_with_eps_zero_runs_the_fused_layers_as_torch_does() -> None:
    # torch.nn.LayerNorm takes eps = 0: the kernel too, and a model that has
    # it serves on the fused path (every packed batch failed).
    x, b, w, beta = torch.randn(5, 16), torch.randn(16), torch.randn(16), torch.randn(16)
    res = torch.randn(5, 16)
    want = F.layer_norm(x + b + res, (16,), w, beta, eps=0.0)
    torch.testing.assert_close(kernels.add_layer_norm_(x.clone(), b, res, w, beta, 0.0), want, atol=2e-6, rtol=1e-5)
    _bert_runs_exactly("kernel", fused=True, layer_norm_eps=0.0)


# ------------------------------------------------------------ bfloat16


def _bf16_ulps(got: torch.Tensor, want: torch.Tensor, ulps: float) -> None:
    """got within `ulps` bfloat16 ulps of want (2^-7 relative each), plus a hair."""
    g, w = got.float(), want.float()
    bound = ulps * 2.0 ** -7 * w.abs() + 1e-6
    assert ((g - w).abs() <= bound).all(), float(((g - w).abs() / (w.abs() + 1e-6)).max())


def _in_bf16_arithmetic(hd: int) -> bool:
    """Whether bfloat16 attention of head width hd runs in bfloat16
    arithmetic here (the native AVX512-BF16 path, widths a multiple of 16)."""
    return kernels.cpu_isa() == "avx512_bf16" and hd % 16 == 0


@pytest.mark.parametrize("hd", [8, 32])
def test_bfloat16_attention_is_float32_attention_rounded_once(hd: int) -> None:
    torch.manual_seed(hd + 1)
    lengths = [1, 7, 9, 40, 130]
    nh = 2
    qkv, bias, cu = torch.randn(sum(lengths), 3, nh, hd).bfloat16(), torch.randn(3 * nh * hd).bfloat16(), _cu(lengths)
    # The float32 path (capped below AVX512-BF16's arithmetic where the CPU
    # has it): the float32 oracle on the same (widened) bfloat16 inputs,
    # within half an ulp of the rounding and float32's own error.
    with kernels.cpu_isa_cap("avx512"):
        got = kernels.attention(qkv, cu, bias=bias)
    assert got.dtype == torch.bfloat16
    want = kernels.torch_attention(qkv.float() + bias.float().view(3, nh, hd), cu)
    _bf16_ulps(got, want, 0.51)


def _bf16_arithmetic_oracle(qkv: torch.Tensor, bias: torch.Tensor, cu: torch.Tensor) -> tuple:
    """What the AVX512-BF16 path computes, in float64: q, k, v with their bias
    rounded to bfloat16, exp(s - max) rounded to bfloat16 and normalised by the
    sum of the rounded weights. Also sum_j p_j |v_j| per output, the scale of
    a weight rounded the other way."""
    T, _, nh, hd = qkv.shape
    r = (qkv.float() + bias.float().view(3, nh, hd)).bfloat16().double()
    want, spread = torch.zeros(T, nh, hd, dtype=torch.float64), torch.zeros(T, nh, hd, dtype=torch.float64)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q, k, v = (r[a:b, i].transpose(0, 1) for i in range(3))  # [nh, L, hd]
        s = (q @ k.transpose(1, 2)).float() * (1.0 / hd**0.5)
        p = torch.exp(s.double() - s.double().amax(-1, keepdim=True)).bfloat16().double()
        p = p / p.sum(-1, keepdim=True)
        want[a:b] = (p @ v).transpose(0, 1)
        spread[a:b] = (p @ v.abs()).transpose(0, 1)
    return want, spread


@pytest.mark.parametrize("hd", [16, 32, 48])
def test_bfloat16_attention_in_bfloat16_arithmetic_matches_its_oracle_and_float32(hd: int) -> None:
    """On a CPU with AVX512-BF16 the bfloat16 attention's products run in
    bfloat16 (vdpbf16ps); elsewhere the float32 path runs and the same
    bounds hold a fortiori."""
    torch.manual_seed(hd + 2)
    lengths = [1, 2, 7, 16, 17, 40, 130]
    nh = 3
    qkv, bias, cu = torch.randn(sum(lengths), 3, nh, hd).bfloat16(), torch.randn(3 * nh * hd).bfloat16(), _cu(lengths)
    got = kernels.attention(qkv, cu, bias=bias).double()
    want, spread = _bf16_arithmetic_oracle(qkv, bias, cu)
    if _in_bf16_arithmetic(hd):
        # Half an ulp of the output, a weight's rounding, float32's error.
        assert ((got - want).abs() <= 2.0**-8 * (want.abs() + spread) + 2e-6).all()
    # Against float32 attention on the unrounded sums: within a few bfloat16
    # rounding steps of the weighted |v| (the inputs' and weights' roundings).
    exact = kernels.torch_attention(qkv.float() + bias.float().view(3, nh, hd), cu).double()
    assert ((got - exact).abs() <= 2.0**-5 * spread + 2e-6).all(), float(((got - exact).abs() / spread).max())
    # Each head by itself: the same bits whatever its company in the call.
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = kernels.attention(qkv[a:b].contiguous(), _cu([b - a]), bias=bias).double()
        assert torch.equal(alone, got[a:b])


def test_bfloat16_epilogues_round_like_torchs_bfloat16_ops() -> None:
    torch.manual_seed(7)
    n = 384
    x, r = (3 * torch.randn(31, n) + 1).bfloat16(), torch.randn(31, n).bfloat16()
    b, w, beta = (torch.randn(n).bfloat16() for _ in range(3))
    g = x.clone()
    kernels.bias_gelu_(g, b)
    _bf16_ulps(g, F.gelu(x.float() + b.float()), 0.51)
    y = x.clone()
    kernels.add_layer_norm_(y, b, r, w, beta, 1e-12)
    # The sum x + b + r rounded once to bfloat16, then LayerNorm in float32
    # and the output rounded: half an ulp (+ float32's error, relative to the
    # row's scale where an output is near 0).
    s = (x.float() + b.float() + r.float()).bfloat16().float()
    want = F.layer_norm(s, (n,), w.float(), beta.float(), 1e-12)
    assert ((y.float() - want).abs() <= 0.51 * 2.0 ** -7 * want.abs() + 1e-5).all()
    # torch's own bfloat16 ops round the sum twice (x + b, then + r): within
    # two ulps of each partial sum, scaled by the normalisation.
    torch_bf16 = F.layer_norm(x + b + r, (n,), w, beta, 1e-12).float()
    scale = s.std(dim=1, unbiased=False, keepdim=True)
    partial = (x.float() + b.float()).abs() + s.abs()
    assert ((y.float() - torch_bf16).abs() <= 2.0 ** -6 * (want.abs() + partial / scale * w.float().abs())).all()


def test_a_bfloat16_engine_runs_the_kernels_and_the_modules_when_asked(monkeypatch) -> None:
    m = tm.model("bert")
    texts = tm.mixed_texts(30, seed=8)
    with Engine(m, tm.tokenizer(), execution="packed", dtype="bfloat16") as engine:
        assert engine.stats()["attention"] == "kernel" and engine.runner.fused is not None
        fused = engine.embed(texts)
        assert engine.stats()["attention_batches"]["kernel"] == engine.stats()["batches"]
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "runs")
    with Engine(m, tm.tokenizer(), execution="packed", dtype="bfloat16") as engine:
        assert engine.stats()["attention"] == "runs" and engine.runner.fused is None
        modules = engine.embed(texts)
    monkeypatch.delenv("FASTSERVE_PACKED_ATTENTION")
    with Engine(m, tm.tokenizer(), execution="packed") as engine:
        exact = engine.embed(texts)
    assert tm.min_cosine(fused, modules) > 0.999
    assert tm.min_cosine(fused, exact) > 0.999


@pytest.mark.parametrize("arch", tm.ARCHS)
def test_fused_layers_equal_the_models_modules(arch: str, monkeypatch) -> None:
    m = tm.model(arch)
    texts = tm.mixed_texts(40, seed=3)
    with Engine(m, tm.tokenizer(), execution="packed") as engine:
        runner = engine.runner
        assert engine.stats()["attention"] == "kernel" and runner.fused is not None
        got = engine.embed(texts)
        assert engine.stats()["attention_batches"]["kernel"] == engine.stats()["batches"]
    want = np.stack([tm.reference(m, t) for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The same batches through the modules with torch's attention per run.
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "runs")
    with Engine(m, tm.tokenizer(), execution="packed") as engine:
        assert engine.stats()["attention"] == "runs" and engine.runner.fused is None
        np.testing.assert_allclose(engine.embed(texts), got, atol=1e-6, rtol=0)


def _bert_runs_exactly(attention: str, fused: bool = False, **config) -> None:
    """A tiny BERT with these config values runs `attention`, the fused CPU
    layers or (not `fused`) its modules, and equals the unbatched model."""
    from transformers import AutoModel

    cfg = tm.config("bert")
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    m = AutoModel.from_config(cfg, attn_implementation="eager").eval()
    texts = tm.mixed_texts(10, seed=4)
    with Engine(m, tm.tokenizer(), execution="packed") as engine:
        got = engine.embed(texts)
        assert engine.stats()["attention"] == attention and (engine.runner.fused is not None) == fused
    np.testing.assert_allclose(got, np.stack([tm.reference(m, t) for t in texts]), atol=1e-5, rtol=0)


def test_a_layer_with_another_activation_keeps_the_modules_and_the_attention_kernel() -> None:
    _bert_runs_exactly("kernel", hidden_act="gelu_new")  # the tanh form: not what bias_gelu_ computes


@pytest.mark.parametrize("part", ["value", "intermediate"])
def test_an_autocast_layer_with_a_hook_runs_its_modules_with_the_kernels_bfloat16_attention(part, monkeypatch) -> None:
    # Under autocast a hooked layer's modules give the attention kernel Q/K/V
    # in bfloat16, as the fused layers do (tests/python/test_gemm.py).
    from fastserve import kernels

    got_dtypes = []
    attention = kernels.attention

    def recording(qkv, *args, **kw):
        got_dtypes.append(qkv.dtype)
        return attention(qkv, *args, **kw)

    monkeypatch.setattr(kernels, "attention", recording)
    m = tm.model("bert")
    texts = tm.mixed_texts(8, seed=5)
    layer = m.encoder.layer[0]
    module = layer.attention.self.value if part == "value" else layer.intermediate.dense
    with Engine(m, tm.tokenizer(), execution="packed", dtype="autocast") as engine:
        fused = engine.embed(texts)
        seen = []
        handle = module.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        got_dtypes.clear()
        try:
            hooked = engine.embed(texts)
        finally:
            handle.remove()
        s = engine.stats()
    assert seen and set(seen) == {torch.bfloat16}
    assert got_dtypes and set(got_dtypes) == {torch.bfloat16}
    assert s["attention_batches"]["kernel"] == s["batches"] and s["attention_batches"]["runs"] == 0
    assert tm.min_cosine(fused, hooked) > 0.9995


def test_forcing_the_kernel_where_it_cannot_run_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "kernel")
    with pytest.raises(ValueError, match="FASTSERVE_PACKED_ATTENTION=kernel needs a float32 or bfloat16 model"):
        Engine(tm.model("bert"), tm.tokenizer(), execution="packed", dtype="float16")
    monkeypatch.setenv("FASTSERVE_KERNELS", "torch")
    with pytest.raises(ValueError, match="FASTSERVE_PACKED_ATTENTION=kernel"):
        Engine(tm.model("bert"), tm.tokenizer(), execution="packed")


def test_a_hooked_or_patched_layer_runs_its_modules() -> None:
    # What a caller attaches to a layer's modules still runs: that layer's
    # batches go through the modules, the others through the kernels.
    m = tm.model("bert")
    texts = tm.mixed_texts(6, seed=6)
    with Engine(m, tm.tokenizer(), execution="packed") as engine:
        want = engine.embed(texts)
        seen = []
        handle = m.encoder.layer[1].intermediate.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        try:
            np.testing.assert_allclose(engine.embed(texts), want, atol=1e-6, rtol=0)
        finally:
            handle.remove()
        assert seen
        seen.clear()
        engine.embed(texts)
        assert not seen  # hook removed: the kernels again


@pytest.mark.parametrize("part", ["query", "key", "value"])
def test_a_hook_on_a_query_key_or_value_projection_runs(part) -> None:
    # The packed runner computes Q, K and V in one product on their weights
    # concatenated; a hook on one of the three still runs, on its own output.
    m = tm.model("bert")
    texts = tm.mixed_texts(6, seed=6)
    with Engine(m, tm.tokenizer(), execution="packed") as engine:
        want = engine.embed(texts)
        seen = []
        handle = getattr(m.encoder.layer[1].attention.self, part).register_forward_hook(
            lambda mod, args, out: seen.append(tuple(out.shape)))
        try:
            np.testing.assert_allclose(engine.embed(texts), want, atol=1e-6, rtol=0)
        finally:
            handle.remove()
    assert seen and all(shape[-1] == m.config.hidden_size for shape in seen)


def _uncalled_encoder(arch: str):
    if arch in ("bert", "distilbert"):
        return tm.model(arch)
    import st_models

    return st_models.encoder(arch)


@pytest.mark.parametrize("arch, name", [
    ("bert", "encoder.layer.0.attention.self"), ("bert", "encoder"), ("bert", ""),
    ("distilbert", "transformer.layer.0.attention"), ("distilbert", "embeddings"),
    ("mpnet", "encoder.layer.1.attention.attn"), ("mpnet", "embeddings"),
    ("t5", "encoder.block.0.layer.0"), ("t5", "encoder"),
])
def test_a_hook_on_a_module_packed_execution_never_calls_is_reported_once(arch, name, caplog) -> None:
    # The model, its encoder, a layer, its attention block and self-attention
    # take padded batches (and DistilBERT's and MPNet's embeddings are run by
    # their parts): the packed runners call their parts. A hook on one cannot
    # run: a warning names it once, and the batches still come out right.
    m = _uncalled_encoder(arch)
    texts = tm.mixed_texts(6, seed=6)
    uncalled = m.get_submodule(name)
    with Engine(m, tm.tokenizer(), execution="packed", dtype="float32") as engine:
        assert engine.stats()["execution"] == "packed"
        want = engine.embed(texts)
        handle = uncalled.register_forward_hook(lambda mod, args, out: None)
        try:
            with caplog.at_level("WARNING", logger="fastserve"):
                got = [engine.embed(texts) for _ in range(3)]
        finally:
            handle.remove()
    said = [r.getMessage() for r in caplog.records if "does not run in packed execution" in r.getMessage()]
    assert len(said) == 1 and type(uncalled).__name__ in said[0] and (name or "the model") in said[0]
    for g in got:
        np.testing.assert_allclose(g, want, atol=1e-6, rtol=0)


class _Tripled(torch.nn.Linear):
    """A Linear subclass whose forward is not its weight's product alone (an
    adapter, a LoRA layer, a quantised layer would be such)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 3


class _Doubled(torch.nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 2


@pytest.mark.parametrize("kind", ["subclass", "parametrized"])
@pytest.mark.parametrize("arch", ["bert", "distilbert", "mpnet", "t5"])
def test_a_projection_that_is_not_a_plain_linear_runs_as_itself(arch, kind) -> None:
    # Q/K/V fuse into one product of their weights only where the three are
    # plain Linear layers; a subclass (or a parametrized weight) runs its own
    # forward, in packed execution as in padded.
    from torch.nn.utils import parametrize

    m = _uncalled_encoder(arch)
    att = {"bert": lambda b: b.attention.self, "distilbert": lambda b: b.attention,
           "mpnet": lambda b: b.attention.attn, "t5": lambda b: b.layer[0].SelfAttention}[arch]
    blocks = m.encoder.block if arch == "t5" else (m.transformer.layer if arch == "distilbert" else m.encoder.layer)
    name = {"bert": "value", "distilbert": "v_lin", "mpnet": "v", "t5": "v"}[arch]
    lin = getattr(att(blocks[0]), name)
    if kind == "subclass":
        new = _Tripled(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.load_state_dict(lin.state_dict())
        setattr(att(blocks[0]), name, new)
    else:
        parametrize.register_parametrization(lin, "weight", _Doubled())
    texts = tm.mixed_texts(6, seed=7)
    with Engine(m, tm.tokenizer(), execution="padded", dtype="float32") as padded:
        want = padded.embed(texts)
    with Engine(m, tm.tokenizer(), execution="packed", dtype="float32") as packed:
        assert packed.stats()["execution"] == "packed"
        np.testing.assert_allclose(packed.embed(texts), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("missing", ["query", "key", "value"])
def test_qkv_with_a_bias_on_some_projections_only_run_as_the_modules(missing) -> None:
    # Fusing needs a bias on all three or on none: else the three run.
    m = tm.model("bert")
    for block in m.encoder.layer:
        getattr(block.attention.self, missing).bias = None
    texts = tm.mixed_texts(6, seed=8)
    with Engine(m, tm.tokenizer(), execution="padded", dtype="float32") as padded:
        want = padded.embed(texts)
    with Engine(m, tm.tokenizer(), execution="packed", dtype="float32") as packed:
        np.testing.assert_allclose(packed.embed(texts), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "autocast"])
def test_strided_vectors_in_a_fused_layer_are_copied_contiguous(dtype) -> None:
    # A LayerNorm weight or a bias that is a strided view (a slice of a
    # larger tensor) runs through the kernels as a contiguous copy, counted.
    m = tm.model("bert")
    block = m.encoder.layer[0]
    with torch.no_grad():
        for mod, name in ((block.output.LayerNorm, "weight"), (block.intermediate.dense, "bias"),
                          (block.attention.output, None)):
            if name is None:
                mod = mod.dense
                name = "bias"
            t = getattr(mod, name)
            wide = torch.stack([t.detach(), torch.zeros_like(t)], dim=1).reshape(-1)
            setattr(mod, name, torch.nn.Parameter(wide[::2]))
            assert not getattr(mod, name).is_contiguous()
    texts = tm.mixed_texts(6, seed=9)
    with Engine(m, tm.tokenizer(), execution="padded", dtype=dtype) as padded:
        want = padded.embed(texts)
    with Engine(m, tm.tokenizer(), execution="packed", dtype=dtype) as packed:
        assert packed.runner.fused is not None
        np.testing.assert_allclose(packed.embed(texts), want, atol=1e-3 if dtype == "autocast" else 1e-5, rtol=0)


def test_what_a_hook_on_a_projection_returns_is_used() -> None:
    m = tm.model("bert")
    texts = tm.mixed_texts(6, seed=6)
    with Engine(m, tm.tokenizer(), execution="packed") as engine:
        want = engine.embed(texts)
        handle = m.encoder.layer[0].attention.self.value.register_forward_hook(lambda mod, args, out: out * 0)
        try:
            zeroed = engine.embed(texts)
        finally:
            handle.remove()
        assert np.allclose(engine.embed(texts), want, atol=1e-6)
    assert np.abs(zeroed - want).max() > 1e-3


def test_widths_the_vector_path_does_not_take_keep_torchs_kernels() -> None:
    # Head width 12: the kernels would run their portable loops, slower than
    # torch's own; the modules and torch's attention run instead, exactly.
    _bert_runs_exactly("runs", hidden_size=36, num_attention_heads=3, intermediate_size=72)


def test_without_the_vector_path_the_engine_keeps_torchs_kernels() -> None:
    # FASTSERVE_KERNEL_NO_SIMD stands for a CPU without AVX2 (read once per process).
    import os
    import subprocess
    import sys

    code = ("import tiny_models as tm; from fastserve import Engine, kernels; "
            "e = Engine(tm.model('bert'), tm.tokenizer(), execution='packed'); "
            "print(kernels.cpu_vector_paths(), e.stats()['attention'], e.runner.fused is None); e.close()")
    env = dict(os.environ, FASTSERVE_KERNEL_NO_SIMD="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "runs", "True"]


def test_the_kernel_switches_are_off_when_unset_empty_or_zero() -> None:
    # FASTSERVE_KERNEL_NO_SIMD and FASTSERVE_KERNEL_NO_AVX512: "0" and "" are
    # off like unset, anything else is on (read once per process).
    import os
    import subprocess
    import sys

    def isa(**switches: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTSERVE_KERNEL_NO_")}
        env.update(switches)
        out = subprocess.run([sys.executable, "-c", "from fastserve import kernels; print(kernels.cpu_isa())"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    native = isa()
    for off in ("0", ""):
        assert isa(FASTSERVE_KERNEL_NO_SIMD=off, FASTSERVE_KERNEL_NO_AVX512=off) == native
    assert isa(FASTSERVE_KERNEL_NO_SIMD="1") == "portable"
    assert isa(FASTSERVE_KERNEL_NO_AVX512="1") == ("avx2" if native.startswith("avx512") else native)


def test_a_subnormal_input_runs_its_head_in_float32_and_leaves_the_others_in_bfloat16() -> None:
    """vdpbf16ps treats float32 subnormals as zero where torch keeps them: a
    head whose q, k or v holds one runs the float32 path, each head deciding
    for itself, so the others keep their bits whatever shares their call."""
    hd, nh = 16, 3
    if not _in_bf16_arithmetic(hd):
        pytest.skip("needs the kernels' AVX512-BF16 path")
    torch.manual_seed(5)
    lengths = [20, 9, 12, 30, 7]  # enough sequences that a call groups all heads of one
    cu = _cu(lengths)
    clean = torch.randn(sum(lengths), 3, nh, hd).bfloat16()
    tiny = clean.clone()
    bits = tiny.view(torch.int16)
    bits[5, 1, 1, 3] = 1  # a subnormal key in head 1 of the first sequence
    got, dp = kernels.attention(tiny, cu), kernels.attention(clean, cu)
    with kernels.cpu_isa_cap("avx512"):
        f32 = kernels.attention(tiny, cu)
    first = slice(0, lengths[0])
    assert torch.equal(got[first, 1], f32[first, 1])  # the head with the subnormal: float32
    assert not torch.equal(dp[first, 1], f32[first, 1])
    for h in (0, 2):  # the others: bfloat16 arithmetic, the same bits as without the subnormal
        assert torch.equal(got[first, h], dp[first, h]) and not torch.equal(got[first, h], f32[first, h])
    assert torch.equal(got[lengths[0]:], dp[lengths[0]:])
