"""A model's weights changed while an engine serves it: a batch that starts
after the change serves the new weights, in every runner, whether the
engine shares the caller's model or owns it. The fused CPU layers keep
copies (oneDNN's reordered weights, autocast's bfloat16 ones, a shared
model's fused Q/K/V) and a model the engine owns has its Q/K/V as views of
one fused tensor: each is rebuilt where its tensors changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import st_models
import tiny_models as tm
from fastserve import Engine, gemm

METHODS = [m for m in gemm.GEMMS if m != "onednn" or gemm.onednn_available()]


def _texts():
    return tm.mixed_texts(12, seed=5)


def _want(model, dtype, **kw) -> np.ndarray:
    """What a new engine over the changed model gives."""
    with Engine(model, tm.tokenizer(), execution="packed", dtype=dtype, warmup=False, **kw) as fresh:
        return fresh.embed(_texts())


def _change(model, how: str, seed: int = 1) -> None:
    other = (tm.model(model.config.model_type, seed=seed) if model.config.model_type in tm.ARCHS
             else st_models.encoder(model.config.model_type, seed=seed)).state_dict()
    if how == "in place":  # copy_ into each parameter: its version counter moves
        model.load_state_dict(other)
    elif how == "replaced":  # new Parameter objects
        model.load_state_dict(other, assign=True)
    elif how == "no_grad ops":  # what an optimizer step does
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(other[name] - p)
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["in place", "replaced", "no_grad ops"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["float32", "autocast"])
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_a_shared_models_changed_weights_are_served_from_the_next_batch(arch, dtype, method, how, monkeypatch):
    if method == "onednn" and dtype == "autocast" and gemm.onednn_cannot(torch.bfloat16):
        pytest.skip(f"oneDNN cannot run bfloat16 products here: {gemm.onednn_cannot(torch.bfloat16)}")
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", method)
    m = tm.model(arch)
    with Engine(m, tm.tokenizer(), execution="packed", dtype=dtype, warmup=False) as engine:
        assert engine.stats()["process"]["model"] == "shared"
        assert engine.runner.fused is not None and engine.stats()["gemm"] == method
        before = engine.embed(_texts())
        _change(m, how)
        got = engine.embed(_texts())
        bytes_after = engine.stats()["memory"]["gemm_weights_bytes"]
        want = _want(m, dtype)
        with Engine(m, tm.tokenizer(), execution="packed", dtype=dtype, warmup=False) as again:
            assert again.stats()["memory"]["gemm_weights_bytes"] == bytes_after
    assert np.abs(before - want).max() > 1e-2  # the change matters
    np.testing.assert_allclose(got, want, atol=1e-6 if dtype == "float32" else 2e-3)


@pytest.mark.parametrize("how", ["in place", "replaced"])
@pytest.mark.parametrize("arch", ["bert", "mpnet", "t5"])
def test_an_owned_models_changed_weights_are_served_from_the_next_batch(arch, how, tmp_path):
    # The engine loads the model itself: its Q/K/V are views of one fused
    # tensor (FusedQKV), which a replaced parameter no longer is.
    folder = st_models.save_encoder(arch, tmp_path / arch)
    with Engine(str(folder), execution="packed", warmup=False) as engine:
        assert engine.stats()["process"]["model"] == "loaded"
        before = engine.embed(_texts())
        _change(engine.model, how)
        got = engine.embed(_texts())
        want = _want(engine.model, "float32")
    assert np.abs(before - want).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_the_replicas_share_the_rebuilt_layers():
    # Two one-thread replicas run shallow copies of one runner: a change is
    # rebuilt once, for both, and the copies' bytes stay as they were.
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), execution="packed", replicas=2, warmup=False) as engine:
        runners = [r.runner for r in engine._replicas]
        assert len(runners) == 2 and runners[0].fused is runners[1].fused
        bytes_before = engine.stats()["memory"]["gemm_weights_bytes"]
        old = runners[0].fused
        engine.embed(_texts())
        _change(m, "in place")
        engine.embed(_texts())
        assert runners[0].fused is runners[1].fused and runners[0].fused is not old
        assert engine.stats()["memory"]["gemm_weights_bytes"] == bytes_before


def test_unchanged_weights_keep_the_layers():
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), execution="packed", warmup=False) as engine:
        layers = engine.runner.fused
        engine.embed(_texts())
        engine.embed("again")
        assert engine.runner.fused is layers


def test_a_layer_that_lost_a_bias_runs_its_modules():
    # Not a standard layer any more: its modules run, as the model now says.
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), execution="packed", warmup=False) as engine:
        engine.embed(_texts())
        m.encoder.layer[1].intermediate.dense.bias = None
        m.encoder.layer[0].attention.self.key.bias = None  # Q/K/V no longer fuse there
        got = engine.embed(_texts())
        assert engine.runner.fused[0] is None and engine.runner.fused[1] is None
        with Engine(m, tm.tokenizer(), execution="padded", warmup=False) as padded:
            want = padded.embed(_texts())
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_an_owned_qkv_whose_parameters_were_replaced_runs_the_three_modules():
    # Fusing again would re-point the parameters' data while the caller's
    # thread may still write into the old storage (a use after free, or a
    # write lost): the parameters are left alone and the modules run.
    from fastserve.runners import FusedQKV

    att = tm.model("bert").encoder.layer[0].attention.self
    lins = (att.query, att.key, att.value)
    qkv = FusedQKV(*lins, own=True)
    h = torch.randn(5, 32)
    assert qkv.own
    qkv.refresh()  # nothing changed: still fused
    assert qkv.own
    for lin in lins:
        lin.weight = torch.nn.Parameter(lin.weight.detach().clone() * 2)
    ptrs = [lin.weight.data_ptr() for lin in lins]
    qkv.refresh()
    assert not qkv.own and [lin.weight.data_ptr() for lin in lins] == ptrs
    torch.testing.assert_close(qkv(h), torch.cat([lin(h) for lin in lins], dim=-1))


def test_a_change_made_while_a_fused_layer_takes_its_copies_shows_at_the_next_batch(monkeypatch):
    # The stamps are taken before the copies: a write landing between them
    # (another thread's) is a change, not something already seen.
    from fastserve import runners

    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), execution="packed", warmup=False) as engine:
        layer = engine.runner.fused[0]
        assert not layer.stamps.changed()
        tensors = runners.FusedQKV.tensors

        def tensors_then_a_write(self):
            out = tensors(self)
            with torch.no_grad():
                self.projections[0].weight.add_(1.0)  # the writer, after the stamps, before the copy is used
            return out

        monkeypatch.setattr(runners.FusedQKV, "tensors", tensors_then_a_write)
        with torch.no_grad():
            m.encoder.layer[0].output.dense.weight.mul_(1.0)  # a change: layer 0 is rebuilt at the next batch
        engine.embed("rebuilds layer 0")
        assert engine.runner.fused[0] is not layer and engine.runner.fused[0].stamps.changed()
        monkeypatch.setattr(runners.FusedQKV, "tensors", tensors)
        got = engine.embed(_texts())
        want = _want(m, "float32")
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_bias_made_from_tensors_that_changed_meanwhile_is_not_kept():
    # Another replica's refresh() may empty the cache while this one makes a
    # bias from the old tensors: that bias is returned, never stored.
    from fastserve.families import _MaskCache

    lin = torch.nn.Linear(2, 2)
    cache = _MaskCache()
    cache.watch([(lin, "weight")])

    def make_while_changed():
        with torch.no_grad():
            lin.weight.add_(1.0)
        cache.refresh()  # the other replica's, mid-make
        return torch.zeros(4)

    cache.get(("k", 4), make_while_changed)
    assert len(cache) == 0
    cache.get(("k", 4), lambda: torch.ones(4))
    assert len(cache) == 1


def test_a_closed_engine_with_fused_layers_is_freed_by_reference_counting():
    # The engine freezes the collector's objects once built (gc.freeze()), so
    # a reference cycle through the runner would keep a closed engine's
    # layers and model alive for good: nothing may point back at the runner.
    import gc
    import weakref

    engine = Engine(tm.model("bert"), tm.tokenizer(), execution="packed", warmup=False)
    assert engine.runner.fused is not None and engine.stats()["process"]["gc"]["frozen"]
    layers, model = weakref.ref(engine.runner._fused), weakref.ref(engine.model)
    threads = [r.thread for r in engine._replicas]
    engine.embed("once")
    engine.close()
    for t in threads:
        t.join(30)
    del engine
    # A batch's own cycles are made after the freeze: the collector frees them.
    tm.until(lambda: gc.collect() is not None and layers() is None and model() is None,
             "the closed engine's layers and model to be freed", 10)


def test_a_changed_layer_norm_eps_is_served_from_the_next_batch():
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), execution="packed", warmup=False) as engine:
        engine.embed(_texts())
        for layer in m.encoder.layer:
            layer.output.LayerNorm.eps = 0.5
        got = engine.embed(_texts())
        want = _want(m, "float32")
        with Engine(m, tm.tokenizer(), execution="padded", warmup=False) as padded:
            np.testing.assert_allclose(padded.embed(_texts()), want, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_q_weight_replaced_between_the_refresh_and_the_rebuild_is_served(monkeypatch, tmp_path):
    # A writer's load_state_dict(assign=True) landing after the batch's
    # FusedQKV.refresh() and before the fused layers' rebuild: the rebuild
    # must not copy the old fused Q/K/V (forced here by writing at the start
    # of _FusedLayers.current, once).
    from fastserve import runners

    folder = st_models.save_encoder("bert", tmp_path / "bert")
    new_q = torch.randn(32, 32, generator=torch.Generator().manual_seed(7))
    with Engine(str(folder), execution="packed", warmup=False) as engine:
        before = engine.embed(_texts())
        current, pending = runners._FusedLayers.current, [True]

        def write_then_current(self):
            if pending:
                pending.clear()
                engine.model.load_state_dict({"encoder.layer.0.attention.self.query.weight": new_q}, assign=True,
                                             strict=False)
            return current(self)

        monkeypatch.setattr(runners._FusedLayers, "current", write_then_current)
        engine.embed(_texts())
        got = [engine.embed(_texts()) for _ in range(2)]
        want = _want(engine.model, "float32")
    assert np.abs(before - want).max() > 1e-3
    for g in got:
        np.testing.assert_allclose(g, want, atol=1e-6)
