"""What an Engine changes outside itself (fastserve/process.py): torch's
thread count, glibc's malloc thresholds, SDPA's backend switches on CUDA, and
a model object the caller passed in. Each is reported in stats()["process"],
checked, and can be turned off."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import pytest
import torch

import tiny_models as tm
from fastserve import Engine, process
from fastserve.errors import InferenceError


# ------------------------------------------------------------ the caller's model


def test_a_ready_model_is_shared_not_copied():
    m = tm.model("bert")
    with Engine(m, tm.tokenizer()) as engine:
        assert engine.model is m
        assert engine.stats()["process"]["model"] == "shared"


def test_a_model_in_training_mode_is_served_from_a_copy_and_left_training():
    m = tm.model("bert").train()
    with Engine(m, tm.tokenizer()) as engine:
        assert engine.stats()["process"]["model"] == "copied"
        assert engine.model is not m and not engine.model.training
        assert m.training
        got = engine.embed("the same weights")
    np.testing.assert_allclose(got, tm.reference(m.eval(), "the same weights"), atol=1e-5)


def test_a_cast_for_serving_never_changes_the_callers_model():
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), dtype="bfloat16") as engine:
        assert engine.stats()["process"]["model"] == "copied"
        assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
        engine.embed("runs in bf16")
    assert {p.dtype for p in m.parameters()} == {torch.float32}


def test_copy_model_false_casts_in_place_and_says_so():
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), dtype="bfloat16", copy_model=False) as engine:
        assert engine.model is m
        assert engine.stats()["process"]["model"] == "changed in place"
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_a_bfloat16_engine_waits_for_a_float32_batch_that_has_onednn_off(monkeypatch):
    # A float32 batch turns oneDNN off while it runs; a bf16 engine built
    # meanwhile would run its products without it (other bits, slower):
    # registering waits until that batch restores the switch.
    import threading

    monkeypatch.setattr(process, "_onednn_users", 0)  # no bf16 engine alive: the batch turns oneDNN off

    before = torch._C._get_mkldnn_enabled()
    done = threading.Event()
    what = []

    def register():
        what.append(process.onednn_for(torch.device("cpu"), torch.bfloat16, True)[1])
        what.append(torch._C._get_mkldnn_enabled())
        done.set()

    with process._onednn_off_context():
        assert not torch._C._get_mkldnn_enabled()
        t = threading.Thread(target=register)
        t.start()
        assert not done.wait(0.2)  # still waiting: the batch runs
    t.join(timeout=30)
    try:
        assert done.is_set() and what == ["on, token buckets", before]
        with process._onednn_off_context():  # a registered bf16 engine: float32 batches leave it on
            assert torch._C._get_mkldnn_enabled() == before
    finally:
        process.onednn_release("on, token buckets")


def test_a_model_the_engine_loads_itself_is_its_own(tmp_path):
    folder = tm.save("bert", tmp_path / "m")
    with Engine(str(folder)) as engine:
        assert engine.stats()["process"]["model"] == "loaded"


def _encoder(arch: str):
    if arch in ("bert", "distilbert", "roberta"):
        return tm.model(arch)
    import st_models

    return st_models.encoder(arch)


def _storages(m) -> dict[str, tuple[int, int, int]]:
    return {k: (p.untyped_storage().data_ptr(), p.untyped_storage().nbytes(), p.storage_offset())
            for k, p in m.named_parameters()}


@pytest.mark.parametrize("dtype", ["float32", "autocast", "bfloat16 in place"])
@pytest.mark.parametrize("arch", ["bert", "distilbert", "mpnet", "t5"])
def test_a_shared_model_keeps_its_parameters_as_they_were(arch, dtype, tmp_path):
    # Packed execution fuses Q, K and V into one product; on a model the
    # caller still holds it never rebinds their parameters (views of one
    # tensor could no longer be saved by safetensors' save_model, and built
    # under inference mode could no longer be trained).
    from safetensors.torch import save_model

    m = _encoder(arch)
    texts = tm.mixed_texts(4, seed=3)
    kw = {"dtype": dtype}
    if dtype == "bfloat16 in place":  # copy_model=False: the cast is made on the caller's model, nothing more
        m, kw = m.bfloat16(), {"dtype": "bfloat16", "copy_model": False}
        m.train()
    before = _storages(m)
    with torch.inference_mode(), Engine(m, tm.tokenizer(), execution="packed", **kw) as engine:
        assert engine.stats()["process"]["model"] == ("changed in place" if "copy_model" in kw else "shared")
        got = engine.embed(texts)
    assert _storages(m) == before
    assert not any(p.is_inference() for p in m.parameters())
    save_model(m, str(tmp_path / "m.safetensors"))
    m.train()  # still trainable
    m(**{k: v for k, v in tm.tokenizer()(["one step"], return_tensors="pt").items()
         if k in ("input_ids", "attention_mask")})[0].float().sum().backward()
    m.eval()
    with Engine(m, tm.tokenizer(), execution="padded", **kw) as padded:
        np.testing.assert_allclose(got, padded.embed(texts), atol=1e-5 if dtype == "float32" else 2e-2)


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("where", ["model", "encoder"])
def test_a_model_put_back_in_training_mode_fails_its_batches_until_eval(where, execution):
    # Dropout would run in the modules the engine calls: each batch fails
    # with the cause and the fix, and serving resumes after eval().
    m = tm.model("bert")
    with Engine(m, tm.tokenizer(), execution=execution) as engine:
        want = engine.embed("before")
        m.get_submodule("" if where == "model" else where).train()
        with pytest.raises(InferenceError, match=r"training mode .*model\.eval\(\)"):
            engine.embed("during")
        m.eval()
        np.testing.assert_allclose(engine.embed("before"), want, atol=1e-6)
        assert engine.health()["healthy"]


def test_a_forward_patched_by_a_closure_over_the_callers_module_is_refused_when_the_model_is_copied():
    # The copy would keep calling the caller's module (its float32 weights
    # from a bfloat16 copy): refused at construction, naming the module.
    m = tm.model("bert")
    q = m.encoder.layer[1].attention.self.query
    orig = q.forward
    q.forward = lambda x: orig(x) * 0.5
    with pytest.raises(ValueError, match=r"'encoder\.layer\.1\.attention\.self\.query' has a forward replaced"):
        Engine(m, tm.tokenizer(), dtype="bfloat16")
    with Engine(m, tm.tokenizer(), dtype="float32") as engine:  # shared: the patch runs on the caller's module
        assert engine.stats()["process"]["model"] == "shared"
        engine.embed("runs")


ORIGINALS: dict = {}


@pytest.mark.parametrize("how", ["partial over a closure", "global container", "nested function",
                                 "a plain object's attribute"])
def test_a_forward_reaching_the_callers_module_indirectly_is_refused_when_the_model_is_copied(how):
    import functools

    m = tm.model("bert")
    q = m.encoder.layer[0].attention.self.query
    orig = q.forward
    if how == "partial over a closure":
        q.forward = functools.partial(lambda x, scale: orig(x) * scale, scale=0.5)
    elif how == "global container":
        ORIGINALS["q"] = q.forward
        q.forward = lambda x: ORIGINALS["q"](x) * 0.5
    elif how == "nested function":
        def outer():
            def inner(x):
                return orig(x) * 0.5
            return inner(torch.ones(1, 32))
        q.forward = lambda x: (outer, orig(x))[1]
    else:
        class Scaled:  # an adapter object holding the original forward
            def __init__(self, fn):
                self.fn = fn

            def __call__(self, x):
                return self.fn(x) * 0.5

        held = Scaled(orig)
        q.forward = lambda x: held(x)
    try:
        with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.attention\.self\.query' has a forward replaced"):
            Engine(m, tm.tokenizer(), dtype="bfloat16")
    finally:
        ORIGINALS.clear()


def test_a_forward_using_only_torch_and_an_accelerate_style_partial_follow_the_copy():
    # What reaches none of the caller's modules is accepted: a function that
    # names only torch, and a partial of a function over the module itself
    # (deepcopy rebinds it to the copy).
    import functools

    m = tm.model("bert")
    q = m.encoder.layer[0].attention.self.query
    q.forward = lambda x: torch.nn.functional.linear(x, torch.zeros(32, 32, dtype=x.dtype))

    def new_forward(module, x):
        return torch.nn.functional.linear(x, module.weight, module.bias) * 0.5

    k = m.encoder.layer[0].attention.self.key
    k.forward = functools.update_wrapper(functools.partial(new_forward, k), k.forward)
    with Engine(m, tm.tokenizer(), dtype="bfloat16", execution="packed") as engine:
        assert engine.stats()["process"]["model"] == "copied"
        engine.embed("runs on the copy")


def test_a_pipeline_that_changes_nothing_serves_a_patched_forward():
    # A pipeline always works on its own copy; where the copy needs no other
    # device or dtype, a patched forward calling the caller's module still
    # computes the same (as before the refusal existed).
    m = tm.model("bert")
    q = m.encoder.layer[1].attention.self.query
    orig = q.forward
    q.forward = lambda x: orig(x) * 0.5
    texts = tm.mixed_texts(4, seed=4)
    with Engine(m, tm.tokenizer(), dtype="float32") as data:
        want = data.embed(texts)
    with Engine(m, tm.tokenizer(), dtype="float32", devices=["cpu", "cpu"], parallel="pipeline") as piped:
        np.testing.assert_allclose(piped.embed(texts), want, atol=1e-6)


def test_an_engine_built_inside_a_float32_batch_does_not_wait_for_that_batch(monkeypatch):
    # A bf16 engine built from a hook of a float32 batch (this thread has
    # oneDNN off) registers without waiting for the batch it runs in.
    import threading

    monkeypatch.setattr(process, "_onednn_users", 0)  # no bf16 engine alive: the batch turns oneDNN off
    out = []

    def batch():
        with process._onednn_off_context():
            out.append(process.onednn_for(torch.device("cpu"), torch.bfloat16, True)[1])

    t = threading.Thread(target=batch, daemon=True)
    t.start()
    t.join(timeout=30)
    try:
        assert out == ["on, token buckets"]
    finally:
        if out:
            process.onednn_release("on, token buckets")


def test_a_forward_patched_as_a_bound_method_follows_the_copy():
    # deepcopy rebinds a bound method to the copied module: accepted, and it
    # runs on the copy's (bfloat16) weights.
    import types

    m = tm.model("bert")
    q = m.encoder.layer[1].attention.self.query
    calls = []

    def halved(self, x):
        calls.append(self.weight.dtype)
        return torch.nn.functional.linear(x, self.weight, self.bias) * 0.5

    q.forward = types.MethodType(halved, q)
    with Engine(m, tm.tokenizer(), dtype="bfloat16", execution="packed") as engine:
        assert engine.stats()["process"]["model"] == "copied"
        engine.embed("runs on the copy")
    assert calls and set(calls) == {torch.bfloat16}


# --------------------------------------------------------------- torch threads


def test_torch_threads_default_is_one_per_usable_core_and_reported(restore_torch_threads):
    torch.set_num_threads(1)
    with Engine(tm.model("bert"), tm.tokenizer()) as engine:
        report = engine.stats()["process"]["torch_threads"]
    assert report["before"] == 1
    assert report["now"] == process.usable_cores() == torch.get_num_threads()
    assert report["changed"] == (process.usable_cores() != 1)


def test_torch_threads_zero_leaves_torchs_setting_alone(restore_torch_threads):
    torch.set_num_threads(1)
    with Engine(tm.model("bert"), tm.tokenizer(), torch_threads=0) as engine:
        report = engine.stats()["process"]["torch_threads"]
    assert report == {"changed": False, "before": 1, "now": 1}
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_invalid_torch_threads_are_refused(bad):
    with pytest.raises(ValueError, match="torch_threads"):
        Engine(tm.model("bert"), tm.tokenizer(), torch_threads=bad)


# ---------------------------------------------------------------------- malloc


def test_glibc_accepts_the_malloc_thresholds_and_the_engine_reports_it():
    if process._mallopt() is None:
        pytest.skip("no glibc mallopt in this process")
    with Engine(tm.model("bert"), tm.tokenizer()) as engine:
        report = engine.stats()["process"]["malloc"]
    assert report == {"tuned": True, "threshold_bytes": process.MALLOC_THRESHOLD_BYTES,
                      "accepted": {"mmap_threshold": True, "trim_threshold": True}}


def test_a_threshold_glibc_refuses_is_reported_and_warned_about(monkeypatch):
    seen = []

    def refusing(param, value):
        seen.append((param, value))
        return 0 if param == process._M_MMAP_THRESHOLD else 1

    monkeypatch.setattr(process, "_mallopt", lambda: refusing)
    with pytest.warns(RuntimeWarning, match="glibc refused mallopt for mmap_threshold"):
        report = process.keep_freed_memory()
    assert report["tuned"] is False
    assert report["accepted"] == {"mmap_threshold": False, "trim_threshold": True}
    assert seen == [(process._M_MMAP_THRESHOLD, process.MALLOC_THRESHOLD_BYTES),
                    (process._M_TRIM_THRESHOLD, process.MALLOC_THRESHOLD_BYTES)]


def test_tune_malloc_false_never_calls_mallopt(monkeypatch):
    def fail(*_):
        raise AssertionError("mallopt was called")

    monkeypatch.setattr(process, "_mallopt", lambda: fail)
    with Engine(tm.model("bert"), tm.tokenizer(), tune_malloc=False) as engine:
        assert engine.stats()["process"]["malloc"] == {"tuned": False}


# ------------------------------------------------------------------------ SDPA


def test_cuda_batches_run_without_cudnn_attention_unless_asked():
    cpu, switched = process.sdpa_backends_for(torch.device("cpu"), cudnn_attention=False)
    assert cpu is contextlib.nullcontext and switched is False
    with cpu():
        assert torch.backends.cuda.cudnn_sdp_enabled()  # the CPU path changes nothing
    ctx, switched = process.sdpa_backends_for(torch.device("cuda"), cudnn_attention=False)
    assert switched is True
    with ctx():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the batch
    keep, switched = process.sdpa_backends_for(torch.device("cuda"), cudnn_attention=True)
    assert keep is contextlib.nullcontext and switched is False


def test_a_cpu_engine_reports_no_backend_switch():
    with Engine(tm.model("bert"), tm.tokenizer()) as engine:
        assert engine.stats()["process"]["sdpa_backends_switched_per_batch"] is False


@pytest.mark.parametrize("kwargs,match", [
    ({"max_length": 10_000}, "max_length"),
    # refused once the runner is chosen, and by the workers' bound: before the
    # model is cast in place and malloc's thresholds are set, too
    ({"preempt": True, "execution": "padded"}, "preempt"),
    ({"replicas": 5000}, "replicas must be at most 4096"),
    ({"devices": ["cpu"] * 3, "replicas": 2000}, "replicas x devices must be at most 4096"),
])
def test_a_refused_engine_changes_nothing_in_the_process_or_the_callers_model(restore_torch_threads,
                                                                               monkeypatch, kwargs, match):
    torch.set_num_threads(1)
    called = []
    monkeypatch.setattr(process, "_mallopt", lambda: lambda *a: called.append(a) or 1)
    m = tm.model("bert").train()
    with pytest.raises(ValueError, match=match):
        Engine(m, tm.tokenizer(), dtype="bfloat16", copy_model=False, warmup=False, **kwargs)
    assert torch.get_num_threads() == 1 and called == []
    assert m.training and {p.dtype for p in m.parameters()} == {torch.float32}


@pytest.mark.parametrize("kwargs,match", [
    ({"max_queue": 0}, "max_queue"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"min_batch_tokens": 0}, "min_batch_tokens"),
    ({"chunk_overlap": -1, "truncate": "chunk"}, "chunk_overlap"),
    ({"preempt": True, "execution": "padded"}, "preempt"),  # refused once the runner is chosen
])
def test_an_engine_refused_late_leaves_the_threads_and_onednn_as_they_were(restore_torch_threads, kwargs,
                                                                             match):
    torch.set_num_threads(1)
    users = process._onednn_users
    m = tm.model("bert")
    with pytest.raises(ValueError, match=match):
        Engine(m, tm.tokenizer(), dtype="bfloat16", torch_threads=2, warmup=False, **kwargs)
    assert torch.get_num_threads() == 1
    assert process._onednn_users == users  # else float32 engines ran with oneDNN on from then on
    assert {p.dtype for p in m.parameters()} == {torch.float32}


@pytest.mark.parametrize("name", ["target_latency_ms", "request_timeout_s", "max_batch_tokens", "max_length",
                                  "max_queue", "max_batch_size", "min_batch_tokens", "chunk_overlap"])
def test_a_number_given_as_a_string_is_refused_by_name(name):
    with pytest.raises(ValueError, match=name):
        Engine(tm.model("bert"), tm.tokenizer(), warmup=False, **{name: "100"})


@pytest.mark.parametrize("kwargs,match", [
    ({"max_length": 20.0}, "max_length must be an int"),
    ({"max_batch_tokens": float("inf")}, "max_batch_tokens must be an int"),
    ({"max_batch_tokens": 512.5}, "max_batch_tokens must be an int"),
    ({"max_queue_tokens": 0}, "max_queue_tokens must be an int >= 1"),
    ({"max_queue_tokens": False}, "max_queue_tokens must be an int >= 1"),
    ({"target_latency_ms": float("inf")}, "target_latency_ms must be a positive finite number"),
    ({"min_batch_tokens": 4096, "max_batch_tokens": 64}, "min_batch_tokens .4096. must not exceed max_batch_tokens"),
    # options that would do nothing on this engine are refused, not ignored
    ({"chunk_overlap": 16}, "chunk_overlap is for truncate='chunk'"),
    ({"pair_truncation": "only_second"}, "pair_truncation is for task='rerank'"),
    ({"activation": "softmax"}, "activation is for task='classify' or 'rerank'"),
    # on/off options take a bool (or None): "false" and "no" switched the option on
    ({"normalize": "false"}, "normalize must be True or False"),
    ({"normalize": 2}, "normalize must be True or False"),
    ({"tune_malloc": "no"}, "tune_malloc must be True or False"),
    ({"freeze_gc": "no"}, "freeze_gc must be True or False"),
    ({"tune_onednn": 0.0}, "tune_onednn must be True or False"),
    ({"copy_model": "yes"}, "copy_model must be True or False"),
    ({"cudnn_attention": "off"}, "cudnn_attention must be True or False"),
    ({"request_timeout_s": ""}, "request_timeout_s must be a number"),
    ({"task": "classify", "pooling": "cls"}, "pooling is for task='embed'"),
    ({"task": "rerank", "normalize": False}, "normalize is for task='embed'"),
    # the workers' options and the dtype: checked by name without the model too
    ({"parallel": "bogus"}, "parallel must be one of"),
    ({"replicas": 0}, "replicas must be a positive int"),
    ({"devices": "bogus"}, "devices must be 'all' or a list of devices"),
    ({"devices": []}, "devices must be 'all' or a non-empty list"),
    ({"devices": ["cpu", "auto"]}, "devices must name each device"),
    ({"devices": ["cpu", "cuda:0"]}, "data-parallel replicas must share one device type"),
    ({"device": "cpu", "devices": ["cpu"]}, "give either device= or devices=, not both"),
    ({"device": "bogus"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"parallel": "pipeline"}, "parallel='pipeline' needs at least two devices"),
    ({"parallel": "pipeline", "devices": ["cpu", "cpu"], "replicas": 2}, "replicas must be 1"),
    ({"dtype": "bogus"}, "dtype must be one of"),
    ({"dtype": ["float32"]}, "dtype must be one of"),
    ({"replicas": 5000}, "replicas must be at most 4096"),
    ({"max_batch_memory_mb": "64"}, "max_batch_memory_mb must be a positive number"),
    ({"max_batch_memory_mb": float("nan")}, "max_batch_memory_mb must be a positive number"),
    ({"max_batch_memory_mb": -1}, "max_batch_memory_mb must be a positive number"),
    ({"max_batch_memory_mb": 10**400}, "max_batch_memory_mb must be a positive number"),
])
def test_bad_or_inapplicable_options_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(tm.model("bert"), tm.tokenizer(), warmup=False, **kwargs)
    with pytest.raises(ValueError, match=match):  # the same checks, with no model (fastserve.ray.app's)
        Engine.check_options(warmup=False, **kwargs)


def test_an_on_off_option_takes_numpy_bools_and_0_or_1_as_bools():
    import numpy as np

    Engine.check_options(normalize=np.False_, warmup=0, freeze_gc=1, preempt=np.True_)
    with Engine(tm.model("bert"), tm.tokenizer(), normalize=np.True_, warmup=0) as e:
        assert e.normalize is True and e.stats()["warmup_s"] == [None] * len(e.stats()["replicas"])
        assert abs(float(np.linalg.norm(e.embed("x"))) - 1) < 1e-5


def test_check_options_refuses_a_keyword_the_engine_does_not_take_and_passes_good_ones():
    with pytest.raises(TypeError, match="max_batch_tokn"):
        Engine.check_options(max_batch_tokn=512)
    with pytest.raises(ValueError, match="warmup must be True or False"):
        Engine.check_options(warmup="no")
    Engine.check_options(task="rerank", pair_truncation="only_second", max_batch_tokens=512, warmup=False)
    # Devices this machine may lack are the replicas' business (a Ray
    # driver without GPUs deploys GPU replicas): named right, they pass here.
    Engine.check_options(devices=["cuda:0", "cuda:1"], parallel="pipeline", dtype="float16")
    Engine.check_options(device="cuda:3", replicas=2)


def test_defaults_of_inapplicable_options_and_a_min_batch_above_the_default_max_are_accepted():
    with Engine(tm.model("bert"), tm.tokenizer(), warmup=False, chunk_overlap=0, pair_truncation="longest_first",
                activation="auto", min_batch_tokens=4096) as e:  # the default max (2048 on a CPU) caps it
        assert e.max_batch_tokens == 2048


def test_a_submodule_left_in_training_mode_is_served_from_an_eval_copy():
    m = tm.model("bert")
    m.encoder.layer[0].train()  # dropout live in one layer, the top module in eval
    with Engine(m, tm.tokenizer()) as engine:
        assert engine.stats()["process"]["model"] == "copied"
        assert not any(sub.training for sub in engine.model.modules())
    assert m.encoder.layer[0].training


def test_stats_give_a_copy_of_the_process_report():
    with Engine(tm.model("bert"), tm.tokenizer()) as engine:
        engine.stats()["process"]["malloc"]["accepted"]["mmap_threshold"] = "edited"
        assert engine.stats()["process"]["malloc"].get("accepted", {}).get("mmap_threshold") != "edited"


# ------------------------------------------------------------ memory report


def test_stats_report_the_process_memory_and_no_cuda_memory_on_the_cpu():
    with Engine(tm.model("bert"), tm.tokenizer()) as engine:
        engine.embed(["a few words", "and a few more"])
        mem = engine.stats()["memory"]
    assert set(mem) == {"rss_bytes", "peak_rss_bytes", "cuda_allocated_bytes", "cuda_reserved_bytes",
                        "cuda_peak_allocated_bytes", "activations", "gemm_weights_bytes"}
    assert mem["cuda_allocated_bytes"] is None and mem["cuda_reserved_bytes"] is None
    assert mem["cuda_peak_allocated_bytes"] is None
    if os.path.exists("/proc/self/status"):
        assert isinstance(mem["rss_bytes"], int) and mem["rss_bytes"] > 0
        assert isinstance(mem["peak_rss_bytes"], int) and mem["peak_rss_bytes"] >= mem["rss_bytes"]


def test_the_proc_status_parser_reads_vmrss_and_vmhwm_in_bytes():
    text = ("Name:\tpython\nVmPeak:\t  999 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\nThreads:\t3\n")
    assert process.parse_proc_status(text) == (1024 * 1024, 2048 * 1024)
    assert process.parse_proc_status("Name:\tpython\nVmRSS:\tgarbage\n") == (None, None)
    assert process.parse_proc_status("") == (None, None)


def test_without_proc_the_peak_comes_from_getrusage_and_the_current_rss_is_unknown(monkeypatch, tmp_path):
    resource = pytest.importorskip("resource")
    monkeypatch.setattr(process, "_PROC_STATUS", str(tmp_path / "missing"))
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    rss, peak = process.rss_bytes()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    assert rss is None
    assert 0 < before <= peak <= after  # the peak only grows
    with Engine(tm.model("bert"), tm.tokenizer()) as engine:
        mem = engine.stats()["memory"]
    assert mem["rss_bytes"] is None and mem["peak_rss_bytes"] > 0


def test_once_built_the_engine_collects_then_freezes_the_collectors_objects():
    """The collector's full passes skip what the process held at
    construction (a pass over it held the GIL for hundreds of ms); garbage
    alive then is collected first, not frozen."""
    import gc
    import weakref

    class Node:
        pass

    gc.unfreeze()
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    gone = weakref.ref(a)
    del a, b
    before = len(gc.get_objects())
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False) as engine:
        report = engine.stats()["process"]["gc"]
        assert gone() is None
        assert report["frozen"] and report["objects"] > before / 2 and gc.get_freeze_count() > before / 2
        assert len(gc.get_objects()) < before / 2  # what the collector still passes over
    gc.unfreeze()
    with Engine(tm.model("bert"), tm.tokenizer(), replicas=1, warmup=False, freeze_gc=False) as engine:
        assert engine.stats()["process"]["gc"] == {"frozen": False} and gc.get_freeze_count() == 0
