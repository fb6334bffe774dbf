"""CUDA graphs and torch's variable-length flash attention in the packed
runner (python/fastserve/graphs.py). The buffer layout and the shape ladder
are checked everywhere; the rest is marked gpu (skipped without a CUDA
device: conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm
from fastserve import Engine, runners, shapes
from fastserve.graphs import CudaGraphs, _Graph, ghost_pieces, sequence_slots

gpu = pytest.mark.gpu


def test_a_batch_is_rounded_up_to_a_token_bucket_and_a_power_of_two_of_sequences():
    g = CudaGraphs(lambda *a: None, tm.model("bert"), torch.device("cpu"), pad_id=0, max_length=128,
                   position_offset=0, max_tokens=2048)
    assert g.shape(128, 1) == (128, 1)  # a bucket already: no ghost
    assert g.shape(100, 3) == (112, 4)  # 12 ghost tokens in one sequence: 4 slots
    assert g.shape(1030, 5) == (1152, 8)  # 122 ghosts
    assert g.shape(600, 2) == (640, 4)
    assert g.shape(2048, 300) == (2048, 512)
    assert g.shape(2049, 1) is None and g.shape(0, 0) is None  # eager
    assert [sequence_slots(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert ghost_pieces(300, 128) == [128, 128, 44] and ghost_pieces(0, 128) == []
    for tokens in range(1, 2049, 7):
        T, S = g.shape(tokens, 1)
        assert T == shapes.bucket(tokens) and T - tokens < max(16, T // 8)


def test_the_schedulers_bucket_floor_is_the_ladder_graphs_round_up_to():
    from fastserve import _core

    for tokens in range(16, 20000):
        floor = _core.bucket_floor(tokens)
        assert floor == shapes.fitting(tokens, True) and shapes.bucket(floor) == floor
    assert _core.bucket_floor(9) == 9  # below the first bucket: the budget as it is
    assert _core.SchedulerConfig(token_buckets=True).token_buckets


def test_the_graphs_input_holds_the_batch_then_its_ghosts_then_empty_sequences():
    g = _Graph(tokens=16, slots=8, device=torch.device("cpu"))
    ids = np.array([101, 7, 102, 101, 9, 9, 102], np.int64)
    positions = np.array([2, 3, 4, 2, 3, 4, 5], np.int64)
    cu = np.array([0, 3, 7], np.int64)
    g.fill(ids, positions, cu, pad_id=1, max_length=5, position_offset=2)
    buf = g.dev.numpy()
    np.testing.assert_array_equal(buf[:16], [101, 7, 102, 101, 9, 9, 102] + [1] * 9)
    # 9 ghost tokens in pieces of at most 5, positions from the offset.
    np.testing.assert_array_equal(buf[16:32], list(positions) + [2, 3, 4, 5, 6, 2, 3, 4, 5])
    # Two real sequences, two ghosts, then empty slots ending at T.
    np.testing.assert_array_equal(buf[32:], [0, 3, 7, 12, 16, 16, 16, 16, 16])


def test_varlen_attention_is_chosen_where_torch_has_the_flash_kernel(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(runners, "_flash_varlen", lambda: None)  # no flash-attn package
    monkeypatch.setattr(runners, "_torch_flash_varlen", lambda device=None: object())
    assert runners._attention_method(cuda, torch.float16) == "varlen"
    assert runners._attention_method(cuda, torch.bfloat16) == "varlen"
    assert runners._attention_method(cuda, torch.float32) == "pad"  # no float32 flash kernel
    assert runners._attention_method(cuda, torch.float16, head_dim=36) == "pad"  # not a multiple of 8
    assert runners._attention_method(cpu, torch.float16) == "runs"
    monkeypatch.setattr(runners, "_flash_varlen", lambda: object())
    assert runners._attention_method(cuda, torch.float16) == "flash"  # the package, where installed
    monkeypatch.setattr(runners, "_torch_flash_varlen", lambda device=None: None)
    monkeypatch.setattr(runners, "_flash_varlen", lambda: None)
    assert runners._attention_method(cuda, torch.float16) == "pad"
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "varlen")
    with pytest.raises(ValueError, match="varlen needs a torch with flash attention"):
        runners._attention_method(cuda, torch.float16)


def test_torchs_flash_kernel_is_not_offered_on_gpus_older_than_ampere(monkeypatch):
    # A CUDA build of torch has the kernel whatever the card; it refuses
    # V100s and T4s (sm_70, sm_75) on every call.
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    for capability, offered in (((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert (runners._torch_flash_varlen(cuda) is not None) == offered, capability
        monkeypatch.setattr(runners, "_flash_varlen", lambda: None)
        assert runners._attention_method(cuda, torch.float16) == ("varlen" if offered else "pad")


def _embed(monkeypatch, texts, *, graphs: bool, attention: str | None = None, model=None, **kw):
    monkeypatch.setenv("FASTSERVE_CUDA_GRAPHS", "1" if graphs else "0")
    if attention:
        monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", attention)
    else:
        monkeypatch.delenv("FASTSERVE_PACKED_ATTENTION", raising=False)
    with Engine(model or tm.model("bert"), tm.tokenizer(), device="cuda", execution="packed", **kw) as engine:
        got = engine.embed(texts)
        return got, engine.stats()


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_varlen_attention_equals_the_padded_copy(monkeypatch, dtype):
    texts = tm.mixed_texts(60, seed=11)
    got, s = _embed(monkeypatch, texts, graphs=False, attention="varlen", dtype=dtype)
    want, _ = _embed(monkeypatch, texts, graphs=False, attention="pad", dtype=dtype)
    assert s["attention"] == "varlen" and s["attention_batches"]["varlen"] == s["batches"]
    assert s["cuda_graphs"] is None
    assert tm.min_cosine(got, want) >= 0.9999
    np.testing.assert_allclose(got, want, atol=5e-3 if dtype == "bfloat16" else 1e-3, rtol=0)


@gpu
@pytest.mark.parametrize("arch", tm.ARCHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_graph_replays_equal_eager_batches_and_the_fp32_reference(monkeypatch, arch, dtype):
    texts = tm.mixed_texts(80, seed=12)
    got, s = _embed(monkeypatch, texts, graphs=True, model=tm.model(arch), dtype=dtype)
    eager, _ = _embed(monkeypatch, texts, graphs=False, model=tm.model(arch), dtype=dtype)
    want = np.stack([tm.reference(tm.model(arch), t) for t in texts])
    g = s["cuda_graphs"][0]
    assert s["attention"] == "varlen" and g["replays"] >= s["batches"] and g["captured"] >= 1
    assert g["capture_s"] > 0 and g["eager"] == 0
    np.testing.assert_allclose(got, eager, atol=5e-3 if dtype == "bfloat16" else 1e-3, rtol=0)
    assert tm.min_cosine(got, want) >= (0.99 if dtype == "bfloat16" else 0.999)


@gpu
def test_a_text_alone_and_in_a_mixed_graph_batch_get_the_same_embedding(monkeypatch):
    monkeypatch.delenv("FASTSERVE_CUDA_GRAPHS", raising=False)
    texts = tm.mixed_texts(40, seed=13)
    with Engine(tm.model("bert"), tm.tokenizer(), device="cuda", dtype="float16") as engine:
        together = engine.embed(texts)
        alone = np.stack([engine.embed(t) for t in texts])
        g = engine.stats()["cuda_graphs"][0]
    assert g["eager"] == 0 and g["captured"] >= 2  # the list's shapes and a single text's
    np.testing.assert_allclose(together, alone, atol=1e-3, rtol=0)


@gpu
def test_weights_changed_in_place_or_replaced_reach_the_next_replay(monkeypatch):
    monkeypatch.delenv("FASTSERVE_CUDA_GRAPHS", raising=False)
    text = "a weight changed under a captured graph"
    model = tm.model("bert").half().cuda()
    with Engine(model, tm.tokenizer(), device="cuda", dtype="float16") as engine:
        before = engine.embed(text)
        norm = model.encoder.layer[0].output.LayerNorm
        with torch.no_grad():
            norm.weight.mul_(-1.0)  # in place: the graph reads the same memory
        flipped = engine.embed(text)
        g = engine.stats()["cuda_graphs"][0]
        assert g["dropped"] == 0
        norm.weight = torch.nn.Parameter(norm.weight.detach().clone() * -1.0)  # replaced: graphs dropped
        restored = engine.embed(text)
        g = engine.stats()["cuda_graphs"][0]
    cpu = tm.model("bert")
    with torch.no_grad():
        cpu.encoder.layer[0].output.LayerNorm.weight.mul_(-1.0)
    assert tm.min_cosine(flipped[None], tm.reference(cpu, text)[None]) >= 0.999
    assert tm.min_cosine(before[None], flipped[None]) < 0.5  # (the flip turns the embedding round)
    assert g["dropped"] >= 1 and g["captured"] >= 2
    np.testing.assert_allclose(restored, before, atol=1e-3, rtol=0)


@gpu
def test_a_forward_hook_runs_because_its_batches_run_eagerly(monkeypatch):
    monkeypatch.delenv("FASTSERVE_CUDA_GRAPHS", raising=False)
    model = tm.model("bert").half().cuda()
    calls: list[int] = []
    with Engine(model, tm.tokenizer(), device="cuda", dtype="float16") as engine:
        engine.embed("captured first")
        handle = model.encoder.layer[1].intermediate.dense.register_forward_hook(lambda *a: calls.append(1))
        engine.embed("the hook must see this one")
        handle.remove()
        engine.embed("and replayed again after")
        g = engine.stats()["cuda_graphs"][0]
    assert calls == [1] and g["eager"] == 1 and g["replays"] >= 2


@gpu
def test_batches_above_the_largest_graph_run_eagerly(monkeypatch):
    monkeypatch.delenv("FASTSERVE_CUDA_GRAPHS", raising=False)
    texts = tm.mixed_texts(30, seed=14)
    with Engine(tm.model("bert"), tm.tokenizer(), device="cuda", dtype="float16") as engine:
        engine.runner.graphs.max_tokens = 16
        got = engine.embed(texts)
        g = engine.stats()["cuda_graphs"][0]
    want, _ = _embed(monkeypatch, texts, graphs=False, dtype="float16")
    assert g["eager"] >= 1
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


@gpu
def test_classification_replays_match_eager(monkeypatch):
    texts = tm.mixed_texts(30, seed=15)
    out = {}
    for graphs in (True, False):
        monkeypatch.setenv("FASTSERVE_CUDA_GRAPHS", "1" if graphs else "0")
        with Engine(tm.model("bert", classify=True), tm.tokenizer(), task="classify", device="cuda",
                    dtype="float16") as engine:
            out[graphs] = np.array([list(c.scores.values()) for c in engine.classify(texts)])
            if graphs:
                assert engine.stats()["cuda_graphs"][0]["replays"] >= 1
    np.testing.assert_allclose(out[True], out[False], atol=2e-3, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_the_cuda_epilogues_take_each_layers_tensors_as_its_modules_do(monkeypatch, arch):
    # The wiring of PackedRunner's CUDA tails (which weight, bias, residual
    # and LayerNorm go to which kernel), checked on the CPU with torch
    # standing in for the two kernels; a hook on one of a layer's modules
    # sends that layer back through its modules.
    from fastserve import kernels as K

    def bias_gelu_(x, bias):
        return x.copy_(torch.nn.functional.gelu(x + bias))

    def add_layer_norm_(x, bias, residual, weight, beta, eps):
        return x.copy_(torch.nn.functional.layer_norm(x + bias + residual, x.shape[-1:], weight, beta, eps))

    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "runs")  # the modules' path, not the CPU layer kernels
    texts = tm.mixed_texts(20, seed=16)
    with Engine(tm.model(arch), tm.tokenizer(), execution="packed") as engine:
        runner = engine.runner
        want = engine.embed(texts)
        assert runner._tails is None  # CUDA only
        calls = {"gelu": 0, "norm": 0}

        def counted(fn, key):
            def call(*a):
                calls[key] += 1
                return fn(*a)
            return call

        monkeypatch.setattr(K, "bias_gelu_", counted(bias_gelu_, "gelu"))
        monkeypatch.setattr(K, "add_layer_norm_", counted(add_layer_norm_, "norm"))
        runner._tails = [(p, p + runners._tail_containers(b, runner.distil))
                         for p, b in zip((runners._standard_layer(b, runner.distil) for b in runner.blocks),
                                         runner.blocks)]
        got = engine.embed(texts)
        layers = len(runner.blocks)
        assert calls["gelu"] == 0 and calls["norm"] > 0 and calls["norm"] % (2 * layers) == 0
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
        # A hook on layer 0's feed-forward output projection: layer 0 runs its
        # modules; one on the intermediate projection runs where it is (its
        # module is called either way).
        seen: list[str] = []
        first = runner.blocks[0]
        out = first.ffn.lin2 if runner.distil else first.output.dense
        inter = first.ffn.lin1 if runner.distil else first.intermediate.dense
        handles = [out.register_forward_hook(lambda *a: seen.append("out")),
                   inter.register_forward_hook(lambda *a: seen.append("inter"))]
        before = dict(calls)
        np.testing.assert_allclose(engine.embed(texts[0]), want[0], atol=2e-6, rtol=0)
        for handle in handles:
            handle.remove()
        assert sorted(seen) == ["inter", "out"] and calls["norm"] - before["norm"] == 2 * (layers - 1)
        # A bias removed since: that layer's modules run (as the model now says).
        out.bias = None
        before = dict(calls)
        got = engine.embed(texts[:3])
        assert calls["norm"] - before["norm"] == 2 * (layers - 1)
    with Engine(runner.model, tm.tokenizer(), execution="padded") as padded:
        np.testing.assert_allclose(got, padded.embed(texts[:3]), atol=2e-6, rtol=0)


def _fake_cuda(monkeypatch) -> dict:
    """Just enough of torch.cuda for CudaGraphs' control flow on the CPU: a
    'capture' runs the forward once, a 'replay' counts."""
    import contextlib

    seen = {"captures": 0, "replays": 0}

    class Graph:
        def replay(self):
            seen["replays"] += 1

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode=None):
        seen["captures"] += 1
        yield

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return seen


def test_a_shape_whose_capture_raises_runs_eagerly_from_then_on(monkeypatch, caplog):
    seen = _fake_cuda(monkeypatch)
    calls = {"n": 0}

    def forward(ids, pos, cu, max_seqlen):
        calls["n"] += 1
        if calls["n"] == 2:  # the capture's run (the first is the warm-up)
            raise RuntimeError("operation not permitted when stream is capturing")
        return torch.zeros(len(ids), 4)

    g = CudaGraphs(forward, tm.model("bert"), torch.device("cpu"), pad_id=0, max_length=128,
                   position_offset=0, max_tokens=2048)
    ids, pos, cu = np.arange(10), np.arange(10), np.array([0, 10])
    with caplog.at_level("WARNING", logger="fastserve"):
        assert g.run(ids, pos, cu) is None  # the runner then runs the batch eagerly
    assert "CUDA graph capture failed for batches of 16 tokens" in caplog.text
    assert g.run(ids, pos, cu) is None and calls["n"] == 2 and seen["captures"] == 1  # not tried again
    s = g.stats()
    assert s["failed"] == 1 and s["eager"] == 2 and s["graphs"] == 0 and s["captured"] == 0 and s["capture_s"] > 0
    # Another shape still captures, then replays with no further capture.
    ids, pos, cu = np.arange(20), np.arange(20), np.array([0, 20])
    hidden, cu_out = g.run(ids, pos, cu)
    assert hidden.shape == (20, 4) and cu_out.tolist() == [0, 20] and g.last_capture_s > 0
    g.run(ids, pos, cu)
    assert seen == {"captures": 2, "replays": 2} and g.last_capture_s == 0
    assert g.stats()["captured"] == 1 and g.stats()["replays"] == 2
