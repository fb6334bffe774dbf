"""The activation formula (python/fastserve/footprint.py) against torch's own
allocation record, and max_batch_memory_mb. Bytes allocated are the same on
every machine, so nothing here depends on its speed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import tiny_models as tm

from fastserve import Engine, InvalidInputError, footprint, gemm, shapes
from fastserve.runners import layer_gemm


def _profiled(engine):
    """Wrap the runner: each batch's (tokens the scheduler counted, peak bytes)."""
    rows: list[tuple[int, int, int]] = []
    inner = engine.runner.run

    def run(batch):
        out, peak = footprint.measured_peak_bytes(lambda: inner(batch))
        lengths = np.asarray(batch.lengths)
        counted = int(lengths.sum()) if engine.runner.name == "packed" else len(lengths) * int(lengths.max())
        rows.append((counted, int(lengths.max()), peak))
        return out

    engine.runner.run = run
    return rows


# The families' own packed runners (families.py), tiny models as the parity tests build them.
# modernbert-wide: its MLP narrower than 2H (ModernBERT-base's 1.5H), where
# the layer's other tensors weigh most.
FAMILY_ARCHS = ("mpnet", "t5", "umt5", "modernbert", "modernbert-wide")


def _tiny(arch):
    import st_models

    if arch in tm.ARCHS:
        return tm.model(arch)
    if arch == "modernbert-wide":
        from transformers import AutoModel

        cfg = st_models.config("modernbert")
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 128, 192, 2
        torch.manual_seed(0)
        return AutoModel.from_config(cfg).eval()
    return st_models.encoder(arch)


@pytest.mark.parametrize("arch", tm.ARCHS + FAMILY_ARCHS)
@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_the_formula_bounds_each_batchs_measured_peak(arch, execution):
    with Engine(_tiny(arch), tm.tokenizer(), execution=execution, policy="static",
                min_batch_tokens=512, max_batch_tokens=512) as engine:
        masks = getattr(engine.runner, "_masks", None)
        if masks is not None:
            # Every run makes its mask or bias afresh (none kept: the cache is
            # counted apart, as the weights): the worst a batch meets.
            masks.limit = 0
        rows = _profiled(engine)
        texts = tm.mixed_texts(60, seed=3)
        if arch in FAMILY_ARCHS:  # and one sequence of max_length tokens alone (its [L, L] bias)
            texts.append(" ".join(["memory"] * engine.max_length))
        engine.embed(texts)
        per = engine.stats()["memory"]["activations"]["bytes_per_token"]
        shape = footprint.shape_of(engine.model.config)
        fixed = footprint.per_batch(engine.model.config, torch.float32, max_length=engine.max_length)
        scratch = footprint.attention_scratch_bytes(shape, torch.float32, max_length=engine.max_length,
                                                    threads=torch.get_num_threads())
        if engine.stats()["gemm"] == "onednn":  # a piece of a product, copied into it (gemm.py)
            scratch += footprint.gemm_piece_row_bytes(shape, torch.float32) * gemm.PIECE
        # the engine's own formula is this one
        assert engine.stats()["memory"]["activations"]["max_batch_bytes"] == (
            per * 512 + footprint.SMALL_BYTES + fixed + (scratch if execution == "packed" else 0))
    assert len(rows) >= 3
    for tokens, _, peak in rows:
        bound = per * tokens + footprint.SMALL_BYTES + fixed + (scratch if execution == "packed" else 0)
        assert peak <= bound
        if execution == "packed":
            # Not just an upper bound: the formula is the peak's own terms.
            assert peak >= 0.7 * per * tokens


@pytest.mark.parametrize("arch", ["mpnet", "t5", "modernbert"])
def test_the_families_runners_release_dead_tensors_before_the_feed_forward(arch):
    # At a width where the layer's tensors, not the masks or the kernels'
    # scratch, make the peak (hidden 128, intermediate 512), the formula is
    # the peak itself: a runner that kept the layer's input, the attention
    # context or ModernBERT's Q/K/V through the feed-forward (as it once did:
    # MPNet 11H where 9H, T5 the context more, ModernBERT 25H where 19H)
    # would go over it.
    import st_models
    from transformers import AutoModel, T5EncoderModel

    cfg = st_models.config(arch)
    if arch == "t5":
        cfg.d_model, cfg.d_ff, cfg.d_kv, cfg.num_heads, cfg.num_layers = 128, 512, 32, 4, 2
    else:
        cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers = 128, 512, 4, 2
        if arch == "modernbert":
            cfg.layer_types = ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    m = (T5EncoderModel(cfg) if arch == "t5" else AutoModel.from_config(cfg)).eval()
    texts = tm.mixed_texts(60, seed=3)
    with Engine(m, tm.tokenizer(), execution="packed", policy="static",
                min_batch_tokens=512, max_batch_tokens=512) as engine:
        engine.embed(texts)  # the masks and biases made once and kept (counted apart)
        rows = _profiled(engine)
        engine.embed(texts)
        per = engine.stats()["memory"]["activations"]["bytes_per_token"]
    rows = [r for r in rows if r[0] >= 256]
    assert rows
    for tokens, _, peak in rows:
        assert 0.97 * per * tokens <= peak <= per * tokens + footprint.SMALL_BYTES


def test_the_activation_table_is_what_each_activation_holds():
    # footprint.ACTIVATION_TENSORS: the [T, I] tensors alive at once inside
    # each activation, its input included, by torch's allocation record.
    from transformers.activations import ACT2FN

    x = torch.randn(64, 48)
    for name, count in footprint.ACTIVATION_TENSORS.items():
        with torch.inference_mode():
            _, peak = footprint.measured_peak_bytes(lambda: ACT2FN[name](x))
        assert (count - 1) * x.nbytes <= peak <= (count - 1) * x.nbytes + 64, name  # (and a scalar or two)


def test_the_budget_counts_the_workers_threads_not_the_builders(restore_torch_threads):
    # The attention scratch is per worker thread: the count left in the
    # thread that builds the engine (another engine's torch_threads=1) is
    # not the workers' (an equal share of the cores each).
    tokens = []
    for builder in (1, 4):
        torch.set_num_threads(builder)
        with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, max_batch_memory_mb=0.08, warmup=False) as e:
            tokens.append(e.memory_budget.tokens)
    assert tokens[0] == tokens[1]


def _minilm_shaped():
    """A tiny BERT with MiniLM's proportions: I = 4H."""
    from transformers import AutoModel

    cfg = tm.config("bert")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 64, 256, 4
    torch.manual_seed(0)
    return AutoModel.from_config(cfg).eval()


def test_the_formula_is_exact_for_a_minilm_sized_layer(monkeypatch):
    # I = 4H (MiniLM, BERT-base): through the model's modules (torch's
    # attention), the feed-forward's H + 2I dominates, and the peak is exactly
    # that (plus the int64 index rows), whatever the lengths.
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "runs")
    with Engine(_minilm_shaped(), tm.tokenizer(), execution="packed", policy="static",
                min_batch_tokens=1024, max_batch_tokens=1024) as engine:
        rows = _profiled(engine)
        engine.embed(tm.mixed_texts(80, seed=4))
        per = engine.stats()["memory"]["activations"]["bytes_per_token"]
    assert per == (64 + 2 * 256) * 4 + 24
    for tokens, _, peak in rows:
        assert (64 + 2 * 256) * 4 * tokens <= peak <= per * tokens


@pytest.mark.parametrize("method", gemm.GEMMS)
def test_the_formula_is_exact_for_layers_through_the_cpu_kernels(method, monkeypatch):
    # Float32 on the CPU: GELU and the LayerNorms in place, Q/K/V freed with
    # the attention kernel's call, so the feed-forward's 2H + I per token is
    # the peak (6H rather than 9H for I = 4H). With oneDNN's products
    # (gemm.py) a piece of a product lives beside it while it is copied in:
    # at most gemm_piece_bytes more, whatever the batch.
    if method == "onednn" and not gemm.onednn_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", method)
    with Engine(_minilm_shaped(), tm.tokenizer(), execution="packed", policy="static",
                min_batch_tokens=1024, max_batch_tokens=1024) as engine:
        assert engine.runner.fused is not None
        rows = _profiled(engine)
        engine.embed(tm.mixed_texts(80, seed=4))
        per = engine.stats()["memory"]["activations"]["bytes_per_token"]
        row = footprint.gemm_piece_row_bytes(footprint.shape_of(engine.model.config), torch.float32)
    assert per == (2 * 64 + 256) * 4 + 24 and row == 256 * 4  # the up-projection's rows
    for tokens, _, peak in rows:
        piece = row * min(tokens, gemm.PIECE) if method == "onednn" else 0
        assert (2 * 64 + 256) * 4 * tokens <= peak <= per * tokens + piece


def test_the_float32_formula_bounds_autocast_layers_through_the_cpu_kernels():
    # Under autocast the fused layers' products and GELU are bfloat16 and
    # their residual stream float32 (runners._FusedLayer): the engine budgets
    # the float32 count, an upper bound of the mixed one.
    with Engine(_minilm_shaped(), tm.tokenizer(), execution="packed", policy="static", dtype="autocast",
                min_batch_tokens=1024, max_batch_tokens=1024) as engine:
        assert engine.runner.fused is not None and engine.stats()["gemm"] == gemm.method(torch.bfloat16)
        rows = _profiled(engine)
        engine.embed(tm.mixed_texts(80, seed=4))
        per = engine.stats()["memory"]["activations"]["bytes_per_token"]
        row = footprint.gemm_piece_row_bytes(footprint.shape_of(engine.model.config), torch.float32)
    assert per == (2 * 64 + 256) * 4 + 24
    assert rows
    for tokens, _, peak in rows:
        piece = row * min(tokens, gemm.PIECE) if engine.stats()["gemm"] == "onednn" else 0
        assert peak <= per * tokens + piece + footprint.SMALL_BYTES


def test_a_memory_budget_bounds_every_batch_and_refuses_what_cannot_fit():
    mib = 0.08
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), max_batch_memory_mb=mib, policy="static", max_batch_tokens=4096) as engine:
        budget = engine.memory_budget
        assert budget is not None and budget.tokens == engine.max_batch_tokens
        assert budget.batch_bytes(budget.tokens) <= mib * 2**20 < budget.batch_bytes(budget.tokens + 1)
        if engine.stats()["gemm"] != "onednn":
            assert budget.tokens == (int(mib * 2**20) - budget.fixed_bytes) // budget.bytes_per_token
        assert 16 < budget.tokens < engine.max_length  # a max-length input cannot fit
        s = engine.stats()
        assert s["max_batch_tokens"] == budget.tokens
        assert s["memory"]["activations"]["max_batch_memory_mb"] == mib
        # the largest batch as the formula counts it, fixed bytes and all (it left them out)
        largest = s["memory"]["activations"]["max_batch_bytes"]
        assert largest == budget.running_bytes(budget.tokens) <= mib * 2**20
        assert largest >= budget.fixed_bytes + budget.bytes_per_token * budget.tokens

        rows = _profiled(engine)
        short = [t for t in tm.mixed_texts(80, seed=5) if len(tm.tokenizer()(t)["input_ids"]) <= budget.tokens]
        long_text = " ".join(["memory"] * 400)
        with tm.held(engine, holder=True) as gate:
            futures = [engine.submit(t) for t in short]
            with pytest.raises(InvalidInputError, match="max_batch_memory_mb"):
                engine.submit(long_text)
            with pytest.raises(InvalidInputError, match="at index 1"):
                engine.submit_many([short[0], long_text])
            with pytest.raises(InvalidInputError, match="max_batch_memory_mb"):
                engine.submit_tokens(list(range(100, 100 + budget.tokens + 1)))
            gate.release.set()
            got = [f.result(timeout=60) for f in futures]
        for text, row in zip(short, got):
            np.testing.assert_allclose(row, tm.reference(m, text), atol=1e-5, rtol=0)
        assert rows and all(tokens <= budget.tokens for tokens, _, _ in rows)
        # The measured peak of every batch stays within the budget.
        assert all(peak <= mib * 2**20 for _, _, peak in rows)
        assert engine.health()["healthy"]


@pytest.mark.parametrize("task", ["rerank", "token-classify"])
def test_a_pair_or_text_past_the_budget_is_refused_naming_it(task):
    # As an embedding's: the memory budget, not the core's max_request_tokens.
    if task == "rerank":
        m = tm.model("bert", classify=True, num_labels=1)
    else:
        from transformers import AutoModelForTokenClassification

        m = AutoModelForTokenClassification.from_config(tm.config("bert"), attn_implementation="eager").eval()
    long_text = " ".join(["memory"] * 100)
    with Engine(m, tm.tokenizer(), task=task, max_batch_memory_mb=0.08, replicas=1) as engine:
        assert engine.memory_budget.tokens < 100
        with pytest.raises(InvalidInputError, match=r"at index 1 is \d+ tokens long; max_batch_memory_mb=0.08 holds"):
            if task == "rerank":
                engine.score([("q", "short"), ("q", long_text)])
            else:
                engine.extract(["short", long_text])
        assert engine.stats()["submitted"] == 0


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "64"])
def test_a_bad_memory_budget_is_refused_at_construction(bad):
    with pytest.raises(ValueError, match="max_batch_memory_mb"):
        Engine(tm.model("bert"), tm.tokenizer(), max_batch_memory_mb=bad)


@pytest.mark.parametrize("mib", [1e-6, 0.03])  # 0.03 MiB: many tokens' activations, less than a batch's fixed part
def test_a_budget_that_holds_no_token_is_refused_naming_the_least_that_does(mib):
    with pytest.raises(ValueError, match=r"holds no token: a batch needs \d+ bytes whatever its size and \d+ bytes "
                                         r"per token( \(\d+ for each of its first \d+\))?(, and runs at least 4 "
                                         r"tokens)? \(at least [0-9.]+ MiB\)") as info:
        Engine(tm.model("bert"), tm.tokenizer(), max_batch_memory_mb=mib)
    least = float(str(info.value).rsplit("at least ", 1)[1].split()[0])
    with Engine(tm.model("bert"), tm.tokenizer(), max_batch_memory_mb=least, replicas=1,
                warmup=False) as engine:  # the figure given works as it is
        assert engine.memory_budget.tokens >= 1


@pytest.mark.parametrize("dtype, room, products", [("bfloat16", 97, "mm"), ("bfloat16", 97, "onednn"),
                                                   ("float32", 3, None)])
def test_the_budget_holds_a_batch_as_it_runs_padded_with_ghost_rows(dtype, room, products, monkeypatch):
    # A packed CPU batch runs at shapes.target(T): its token bucket in
    # bfloat16 with the products through torch.mm, at least MIN_ROWS tokens
    # otherwise (float32, or bfloat16 through oneDNN's pieces, which bound
    # oneDNN's cache themselves: process.onednn_buckets). A budget with room
    # for 97 tokens holds 96 with buckets (bucket(97) = 112 would not fit),
    # 97 without; one with room for 3 holds none in float32.
    if products == "onednn" and gemm.onednn_cannot(torch.bfloat16):
        pytest.skip(f"oneDNN cannot run bfloat16 products here: {gemm.onednn_cannot(torch.bfloat16)}")
    if products is not None:
        monkeypatch.setenv("FASTSERVE_CPU_GEMM", products)
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), dtype=dtype, replicas=1, warmup=False) as probe:
        per = probe.stats()["memory"]["activations"]["bytes_per_token"]
        # no budget: the formula's largest batch all the same, with its fixed bytes
        assert probe.stats()["memory"]["activations"]["max_batch_bytes"] > per * probe.max_batch_tokens
    shape, dt = footprint.shape_of(m.config), getattr(torch, dtype)
    # The products' own bytes as the engine counts them: a piece of rows per
    # token through oneDNN, torch.mm's scratch in the fixed bytes otherwise.
    onednn = layer_gemm(m, torch.device("cpu"), dt) == "onednn"
    fixed = footprint.SMALL_BYTES + footprint.attention_scratch_bytes(
        shape, dt, max_length=128, threads=torch.get_num_threads()) + \
        (0 if onednn else footprint.mm_scratch_bytes(m, dt, torch.get_num_threads()))
    per += footprint.gemm_piece_row_bytes(shape, dt) if onednn else 0
    mib = (fixed + per * room + per // 2) / 2**20
    if dtype == "float32":
        with pytest.raises(ValueError, match="holds no token: .*, and runs at least 4 tokens"):
            Engine(m, tm.tokenizer(), dtype=dtype, replicas=1, max_batch_memory_mb=mib, warmup=False)
        return
    with Engine(m, tm.tokenizer(), dtype=dtype, replicas=1, max_batch_memory_mb=mib, warmup=False,
                policy="static", max_batch_tokens=4096) as engine:
        budget = engine.memory_budget
        assert engine.stats()["gemm"] == products and budget.buckets == (products == "mm")
        bound = 96 if budget.buckets else room
        assert budget.tokens == bound and shapes.target(bound, budget.buckets) == bound
        assert engine.stats()["memory"]["activations"]["max_batch_bytes"] == budget.batch_bytes(bound) <= mib * 2**20
        # one token more runs past it: its bucket, ghost rows and all, or itself
        assert budget.running_bytes(bound + 1) == budget.batch_bytes(112 if budget.buckets else room + 1) > mib * 2**20
        rows = _profiled(engine)
        engine.embed([t for t in tm.mixed_texts(60, seed=9) if len(tm.tokenizer()(t)["input_ids"]) <= bound])
    assert rows and all(tokens <= bound for tokens, _, _ in rows)
    assert all(peak <= mib * 2**20 for _, _, peak in rows)


def _one_layer(cfg, *, hidden: int, intermediate: int, heads: int, positions: int):
    """A one-layer random model of cfg's architecture at these sizes."""
    from transformers import AutoModel

    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers = \
        hidden, intermediate, heads, 1
    cfg.max_position_embeddings = positions
    torch.manual_seed(0)
    return AutoModel.from_config(cfg).eval()


@pytest.mark.parametrize("products", ["mm", "onednn"])
@pytest.mark.parametrize("dtype", ["bfloat16", "autocast"])
def test_a_tight_budget_holds_minilm_sized_reduced_precision_batches(dtype, products, monkeypatch):
    # Through torch.mm, oneDNN's bfloat16 matmul takes a buffer per thread
    # and call beside its output (footprint.mm_scratch_bytes): uncounted, a
    # MiniLM-sized batch of 256 tokens peaked 1.155x a budget made for it
    # (AVX512-BF16 CPU). The budget counts it where oneDNN runs the dtype (0
    # where it cannot). Through gemm.py's pieces (bfloat16's default where
    # oneDNN runs it), a piece of rows per token instead.
    if products == "onednn" and gemm.onednn_cannot(torch.bfloat16):
        pytest.skip(f"oneDNN cannot run bfloat16 products here: {gemm.onednn_cannot(torch.bfloat16)}")
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", products)
    m = _one_layer(tm.config("bert"), hidden=384, intermediate=1536, heads=12, positions=512)
    with Engine(m, tm.tokenizer(), dtype=dtype, replicas=1, warmup=False, max_length=256) as probe:
        formula = probe._activation_formula
    mib = formula.batch_bytes(256) / 2**20  # room for 256 tokens, no more
    with Engine(m, tm.tokenizer(), dtype=dtype, replicas=1, warmup=False, max_length=256, policy="static",
                max_batch_memory_mb=mib, max_batch_tokens=4096) as engine:
        assert engine.memory_budget.tokens >= 200
        rows = _profiled(engine)
        engine.embed([" ".join(["memory"] * 254)])  # one sequence of 256 tokens
        engine.embed(tm.mixed_texts(60, seed=5))
    assert rows
    for tokens, _, peak in rows:
        assert peak <= mib * 2**20, (tokens, peak, mib * 2**20)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_relative_bias_of_a_long_sequence_is_within_the_formula(dtype):
    # MPNet makes a max_length sequence's bias [1, heads, L, L] and its
    # contiguous copy while its int64 buckets and the relative positions
    # they came from are alive: 16 + 2 * heads * e bytes per L^2. Counted
    # with the buckets alone (8 + ...), a 1,024-token bfloat16 batch peaked
    # 1.045x its budget. Twelve heads, so the bias outweighs the 56-byte floor.
    import st_models

    m = _one_layer(st_models.config("mpnet"), hidden=96, intermediate=192, heads=12, positions=514)
    with Engine(m, tm.tokenizer(), dtype=dtype, replicas=1, warmup=False, max_length=512, policy="static",
                min_batch_tokens=512, max_batch_tokens=512) as engine:
        assert engine.runner.name == "packed"
        engine.runner._masks.limit = 0  # the bias made afresh, as a batch may need it
        formula = engine._activation_formula
        rows = _profiled(engine)
        engine.embed([" ".join(["memory"] * 600)])  # truncated to 512 tokens
    assert rows and rows[0][0] == 512
    for tokens, _, peak in rows:
        assert peak <= formula.running_bytes(tokens), (peak, formula.running_bytes(tokens))
        assert peak >= 0.8 * formula.running_bytes(tokens)  # the bias is most of it, and counted close


def test_the_fused_qkv_weight_of_the_engines_own_model_is_not_a_second_copy(tmp_path):
    m = tm.model("bert")
    before = footprint.weight_bytes(m)
    with Engine(str(tm.save("bert", tmp_path / "m")), execution="packed") as engine:
        assert engine.stats()["process"]["model"] == "loaded"
        assert footprint.weight_bytes(engine.model) == before
        query = engine.model.encoder.layer[0].attention.self.query.weight
        fused, _ = engine.runner.attn[0].qkv.tensors()
        assert query.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        np.testing.assert_allclose(engine.embed("a shared weight"), tm.reference(m, "a shared weight"),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mpnet", "t5", "umt5"])
def test_the_families_fused_qkv_weights_are_not_second_copies_and_their_hooks_run(arch, tmp_path):
    import st_models

    folder = st_models.save_encoder(arch, tmp_path / "m")
    texts = tm.mixed_texts(4, seed=2)
    with Engine(str(folder), execution="packed", dtype="float32") as engine:
        assert engine.stats()["execution"] == "packed"
        want = engine.embed(texts)
        layer = engine.model.encoder.layer[0].attention.attn if arch == "mpnet" else \
            engine.model.encoder.block[0].layer[0].SelfAttention
        fused, _ = engine.runner.qkv[0].tensors()
        for lin in (layer.q, layer.k, layer.v):
            assert lin.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        with torch.no_grad():  # a change to the model's weight is a change to what the runner computes
            layer.v.weight.mul_(0.5)
        assert np.abs(engine.embed(texts) - want).max() > 1e-4
        seen = []  # and a hook on a projection runs
        handle = layer.k.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        try:
            engine.embed(texts)
        finally:
            handle.remove()
        assert seen


def test_the_cli_takes_a_memory_budget(tmp_path, capsys):
    from fastserve import cli

    folder = tm.save("bert", tmp_path / "tiny")
    assert cli.main(["embed", "--model", str(folder), "--max-batch-memory-mb", "0.08", "--format", "json",
                     "a short text"]) == 0
    assert len(json.loads(capsys.readouterr().out)["embedding"]) == 32
    # a text that can never run: one line on stderr, exit 2 (not a traceback)
    assert cli.main(["embed", "--model", str(folder), "--max-batch-memory-mb", "0.08", " ".join(["long"] * 300)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastserve embed: ") and "max_batch_memory_mb=0.08" in err[0]
