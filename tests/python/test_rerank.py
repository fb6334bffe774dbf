"""Reranking with cross-encoders (Engine(task="rerank")): scores equal
sentence-transformers' CrossEncoder.predict on tiny random models saved as
CrossEncoder folders, for every architecture and both executions; pairs are
cut as the tokenizer cuts them; pairs from many callers share batches; bad
input gets typed errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import fastserve
import tiny_models as tm
from fastserve import Engine

ce_mod = pytest.importorskip("sentence_transformers")
CrossEncoder = ce_mod.CrossEncoder

QUERY = "how do transformers encode text"
DOCS = [
    "Transformers encode text with self-attention over tokens.",
    "A recipe for bread: flour, water, salt and yeast.",
    "Encoders map every token to a vector; pooling makes one per text.",
    "Unbelievably, the Schwarzenegger-Tübingen correspondence resurfaced.",
    " ".join(["attention"] * 200),  # past the model's 128 tokens: cut
]


def cross_encoder_folder(tmp_path, arch: str, *, num_labels: int = 1, activation=None, seed: int = 0):
    """A tiny random sequence-classification model saved as a CrossEncoder
    folder (max_length 128, the model's position table)."""
    torch.manual_seed(seed)
    m = tm.model(arch, classify=True, num_labels=num_labels, seed=seed)
    raw = tmp_path / f"{arch}-raw"
    m.save_pretrained(raw)
    tm.tokenizer().save_pretrained(raw)
    kwargs = {"activation_fn": activation} if activation is not None else {}
    ce = CrossEncoder(str(raw), max_length=128, **kwargs)
    folder = tmp_path / f"{arch}-ce"
    ce.save(str(folder))
    return folder, CrossEncoder(str(folder))


def pairs(docs=DOCS, query=QUERY):
    return [(query, d) for d in docs]


@pytest.fixture(scope="module")
def bert_ce(tmp_path_factory):
    return cross_encoder_folder(tmp_path_factory.mktemp("ce"), "bert")


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("arch", tm.ARCHS)
def test_scores_equal_cross_encoder_predict(tmp_path, arch, execution):
    folder, ce = cross_encoder_folder(tmp_path, arch)
    texts = tm.mixed_texts(24, seed=3)
    ps = [(texts[i], texts[-1 - i]) for i in range(len(texts))] + pairs()
    with Engine(str(folder), task="rerank", execution=execution) as engine:
        got = engine.score(ps)
        raw = engine.score(ps, raw=True)
    expected = ce.predict(ps)
    assert got.shape == (len(ps),)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    np.testing.assert_allclose(raw, ce.predict(ps, activation_fn=torch.nn.Identity()), atol=2e-5)
    assert engine.activation == "sigmoid"


def test_token_types_of_the_document_change_the_score_as_in_the_model(bert_ce):
    """The second segment's token types reach the packed runner: scoring
    with all-zero types (as the embeddings path runs) would differ."""
    folder, ce = bert_ce
    with Engine(str(folder), task="rerank") as engine:
        got = engine.score(pairs())
        lists = engine.tokenize_pairs(pairs())
        assert all(0 < ids.segment < len(ids) for ids in lists)
        zero_types = [engine.submit_tokens(list(ids)).result(timeout=30) for ids in lists]  # no segment: type 0
    assert not np.allclose(engine.pair_scores(zero_types), got, atol=1e-6)
    np.testing.assert_allclose(got, ce.predict(pairs()), atol=2e-6)


def test_the_saved_activation_is_applied_and_raw_scores_are_the_logits(tmp_path):
    folder, ce = cross_encoder_folder(tmp_path, "bert", activation=torch.nn.Tanh())
    with Engine(str(folder), task="rerank") as engine:
        assert engine.activation == "tanh"
        np.testing.assert_allclose(engine.score(pairs()), ce.predict(pairs()), atol=2e-6)
    with Engine(str(folder), task="rerank", activation="none") as engine:
        np.testing.assert_allclose(engine.score(pairs()), ce.predict(pairs(), activation_fn=torch.nn.Identity()),
                                   atol=2e-5)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "softmax", "none"])
def test_activations_match_torch_at_extreme_logits_without_warnings(activation):
    import warnings

    from fastserve.tasks import apply_activation

    if activation == "softmax":  # over each row's labels
        logits = np.array([[-1e30, 0.0, 1e30], [-120.0, -88.8, 5.0], [88.8, 90.0, -88.8], [0, 0, 0]], np.float32)
    else:
        logits = np.array([[-1e30, -120.0, -88.8, -88.7, -1.0, 0.0, 1.0, 88.8, 1e30, -np.inf, np.inf]], np.float32).T
    torch_fn = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "softmax": lambda t: torch.softmax(t, -1),
                "none": lambda t: t}[activation]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow RuntimeWarning among them
        got = apply_activation(logits, activation)
    np.testing.assert_allclose(got, torch_fn(torch.from_numpy(logits)).numpy(), rtol=1e-6, atol=0)


def test_several_logit_heads_score_every_label_and_cannot_rank(tmp_path):
    folder, ce = cross_encoder_folder(tmp_path, "bert", num_labels=3)
    with Engine(str(folder), task="rerank") as engine:
        got = engine.score(pairs())
        assert got.shape == (len(DOCS), 3)
        np.testing.assert_allclose(got, ce.predict(pairs()), atol=2e-5)  # Identity, as CrossEncoder's default
        with pytest.raises(fastserve.InvalidInputError, match="one-logit head"):
            engine.rerank(QUERY, DOCS)


def test_rerank_sorts_like_cross_encoder_rank(bert_ce):
    folder, ce = bert_ce
    with Engine(str(folder), task="rerank") as engine:
        full = engine.rerank(QUERY, DOCS, return_documents=True)
        top = engine.rerank(QUERY, DOCS, top_n=2)
    expected = ce.rank(QUERY, DOCS, return_documents=True)
    assert [r.index for r in full] == [e["corpus_id"] for e in expected]
    np.testing.assert_allclose([r.score for r in full], [e["score"] for e in expected], atol=2e-6)
    assert [r.document for r in full] == [DOCS[e["corpus_id"]] for e in expected]
    assert [(r.index, r.score) for r in top] == [(r.index, r.score) for r in full[:2]]
    assert all(r.document is None for r in top)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("strategy", ["longest_first", "only_second"])
def test_long_pairs_are_cut_as_the_tokenizer_cuts_them(bert_ce, side, strategy):
    folder, _ = bert_ce
    long_query = " ".join(["query"] * 90)
    ps = [(QUERY, DOCS[-1]), (long_query, DOCS[-1]), (QUERY, DOCS[0])]
    tok = tm.tokenizer()
    tok_side = type(tok).from_pretrained(str(folder), truncation_side=side)
    expected = tok_side([q for q, _ in ps], [d for _, d in ps], truncation=strategy, max_length=128)
    with Engine(str(folder), task="rerank", truncate=side, pair_truncation=strategy) as engine:
        lists = engine.tokenize_pairs(ps)
        assert [list(x) for x in lists] == expected["input_ids"]
        assert [x.segment for x in lists] == [t.index(1) for t in expected["token_type_ids"]]
        assert [i.truncated for i in lists.infos] == [True, True, False]
        assert lists.infos[0].tokens > 128 and lists.infos[0].computed_tokens == 128
        m = engine.model
        with torch.inference_mode():
            ref = [torch.sigmoid(m(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits)[0, 0]
                   for ids, types in zip(expected["input_ids"], expected["token_type_ids"])]
        np.testing.assert_allclose(engine.score(ps), np.array(ref), atol=2e-6)


def test_a_query_too_long_for_only_second_and_long_pairs_with_truncate_error_are_refused(bert_ce):
    folder, _ = bert_ce
    huge_query = " ".join(["query"] * 200)
    with Engine(str(folder), task="rerank", pair_truncation="only_second") as engine:
        with pytest.raises(fastserve.InvalidInputError, match="only_second"):
            engine.score([(QUERY, DOCS[0]), (huge_query, "short")])
        assert engine.stats()["submitted"] == 0
    with Engine(str(folder), task="rerank", truncate="error") as engine:
        with pytest.raises(fastserve.InvalidInputError, match=r"pair at index 4 is \d+ tokens long"):
            engine.rerank(QUERY, DOCS)
        assert engine.stats()["submitted"] == 0


def test_errors_name_the_pair_or_document_the_caller_gave(bert_ce):
    # rerank scores the distinct documents: its errors name the caller's
    # index; only_second names the pair it cannot cut, not the first long one.
    folder, _ = bert_ce
    long_doc = " ".join(["word"] * 200)
    with Engine(str(folder), task="rerank", truncate="error") as engine:
        for docs, index in ((["a", "a", "a", long_doc], 3), ([long_doc, "a", long_doc], 0), (["a", "a", "b", "x\ud800"], 3)):
            with pytest.raises(fastserve.InvalidInputError, match=f"pair at index {index}(?!\\d)"):
                engine.rerank(QUERY, docs)
            with pytest.raises(fastserve.InvalidInputError, match=f"pair at index {index}(?!\\d)"):
                asyncio.run(engine.arerank(QUERY, docs))
        # a lone surrogate is named where it is: the query, or a pair's text
        # (its character counted in that text, not in the two joined)
        for call in (engine.rerank, lambda q, d: asyncio.run(engine.arerank(q, d))):
            with pytest.raises(fastserve.InvalidInputError,
                               match="^query is not valid Unicode: a lone surrogate '.ud800' at character 1 "):
                call("q\ud800", ["a", "b"])
        for pair, which in ((("q\ud800", "d"), "first"), (("q", "d\ud800"), "second")):
            with pytest.raises(fastserve.InvalidInputError, match=f"^pair at index 1's {which} text is not valid "
                                                                  "Unicode: a lone surrogate '.ud800' at character 1 "):
                engine.score([("fine", "pair"), pair])
        assert engine.rerank(QUERY, ["a"])[0].index == 0
    with Engine(str(folder), task="rerank", pair_truncation="only_second") as engine:
        with pytest.raises(fastserve.InvalidInputError, match="pair at index 3 cannot be cut"):
            engine.score([("q", "d"), ("short", long_doc), ("q2", "d2"), (" ".join(["query"] * 200), "short")])


def test_a_pair_queued_alone_keeps_its_token_types(bert_ce):
    folder, _ = bert_ce
    with Engine(str(folder), task="rerank") as engine:
        want = engine.score(pairs(), raw=True)
        lists = engine.tokenize_pairs(pairs())
        alone = engine.pair_scores([engine.submit_tokens(ids).result(timeout=30) for ids in lists], raw=True)
    np.testing.assert_allclose(alone, want, atol=1e-6, rtol=0)


def test_bad_arguments_get_typed_errors(bert_ce):
    folder, _ = bert_ce
    with pytest.raises(ValueError, match="pair_truncation"):
        Engine(str(folder), task="rerank", pair_truncation="only_first")
    with pytest.raises(ValueError, match="chunk"):
        Engine(str(folder), task="rerank", truncate="chunk")
    with Engine(str(folder), task="rerank") as engine:
        for bad, match in [("just a string", "list of"), ([("q",)], "two strings"), ([("q", 3)], "two strings")]:
            with pytest.raises(fastserve.InvalidInputError, match=match):
                engine.score(bad)
        with pytest.raises(fastserve.InvalidInputError, match="query must be a str"):
            engine.rerank(None, DOCS)
        with pytest.raises(fastserve.InvalidInputError, match="document at index 1"):
            engine.rerank(QUERY, ["a", 2])
        with pytest.raises(fastserve.InvalidInputError, match="top_n"):
            engine.rerank(QUERY, DOCS, top_n=0)
        with pytest.raises(fastserve.InvalidInputError, match="task='rerank'"):
            engine.embed("text")
        assert engine.rerank(QUERY, []) == []
        assert engine.score([]).shape == (0,)
    with Engine(tm.model("bert"), tm.tokenizer()) as embedder:
        with pytest.raises(fastserve.InvalidInputError, match="task='embed'"):
            embedder.rerank(QUERY, DOCS)


def test_pairs_of_many_callers_share_batches(bert_ce):
    """Two callers' pairs, queued while the worker is held, run in one batch
    and each caller gets its own scores."""
    folder, ce = bert_ce
    with Engine(str(folder), task="rerank") as engine:
        with tm.held(engine) as gate:
            a = engine.submit_pairs(pairs(DOCS[:2]))
            b = engine.submit_pairs(pairs(DOCS[2:4], query="bread recipes"))
            tm.until(lambda: engine.stats()["queue_depth"] == 4, "the four pairs to be queued")
            gate.release.set()
            got_a = engine.pair_scores([f.result(timeout=30) for f in a])
            got_b = engine.pair_scores([f.result(timeout=30) for f in b])
        assert engine.stats()["batch_size"]["max"] == 4
    np.testing.assert_allclose(got_a, ce.predict(pairs(DOCS[:2])), atol=2e-6)
    np.testing.assert_allclose(got_b, ce.predict(pairs(DOCS[2:4], query="bread recipes")), atol=2e-6)


def test_async_forms_equal_the_sync_ones(bert_ce):
    folder, _ = bert_ce
    with Engine(str(folder), task="rerank") as engine:
        async def both():
            return await engine.arerank(QUERY, DOCS, top_n=3), await engine.ascore(pairs())
        ranked, scores = asyncio.run(both())
        assert ranked == engine.rerank(QUERY, DOCS, top_n=3)
        np.testing.assert_array_equal(scores, engine.score(pairs()))


def test_every_saved_activation_format_of_sentence_transformers_is_read(tmp_path):
    """5.x+: config_sentence_transformers.json; 4.x: config.json's
    "sentence_transformers"; older: "sbert_ce_default_activation_function";
    none saved: sigmoid for one logit, identity for several."""
    from types import SimpleNamespace

    from fastserve.tasks import cross_encoder_activation

    one = SimpleNamespace(num_labels=1)
    assert cross_encoder_activation(None, one) == "sigmoid"
    assert cross_encoder_activation(None, SimpleNamespace(num_labels=3)) == "none"
    assert cross_encoder_activation(None, SimpleNamespace(
        num_labels=1, sentence_transformers={"activation_fn": "torch.nn.modules.linear.Identity"})) == "none"
    assert cross_encoder_activation(None, SimpleNamespace(
        num_labels=1, sbert_ce_default_activation_function="torch.nn.modules.activation.Tanh")) == "tanh"
    (tmp_path / "config_sentence_transformers.json").write_text(
        '{"activation_fn": "torch.nn.modules.activation.Sigmoid"}')
    assert cross_encoder_activation(tmp_path, SimpleNamespace(num_labels=3)) == "sigmoid"
    assert cross_encoder_activation(tmp_path, one, "none") == "none"  # an explicit choice wins
    # A torch class by its short path, as CrossEncoder imports it.
    for path, ours in (("torch.nn.Sigmoid", "sigmoid"), ("torch.nn.Identity", "none"), ("torch.nn.Tanh", "tanh")):
        assert cross_encoder_activation(None, SimpleNamespace(num_labels=3, sbert_ce_default_activation_function=path)) \
            == ours
    for path in ("torch.nn.ReLU", "torch.sigmoid"):  # torch, but not an activation fastserve applies
        with pytest.raises(fastserve.ModelLoadError, match="not supported"):
            cross_encoder_activation(None, SimpleNamespace(num_labels=1, sbert_ce_default_activation_function=path))
    with pytest.raises(fastserve.ModelLoadError, match="cannot be found"):
        cross_encoder_activation(None, SimpleNamespace(num_labels=1, sbert_ce_default_activation_function="torch.nn.Nope"))
    # Not torch: not imported (sentence-transformers needs trust_remote_code), warned about, the default.
    with pytest.warns(RuntimeWarning, match="is not a torch class"):
        assert cross_encoder_activation(None, SimpleNamespace(num_labels=1, sbert_ce_default_activation_function="my.Fn")) \
            == "sigmoid"


def test_a_saved_default_prompt_goes_in_front_of_each_query_as_cross_encoder_puts_it(tmp_path):
    """A CrossEncoder folder saved with prompts and a default prompt: score
    and rerank equal CrossEncoder.predict / rank, which put the prompt in
    front of each pair's first text; prompt_name / prompt as predict's."""
    import inspect

    if "default_prompt_name" not in inspect.signature(CrossEncoder.__init__).parameters:
        pytest.skip("this sentence-transformers' CrossEncoder has no prompts")
    torch.manual_seed(0)
    raw = tmp_path / "raw"
    tm.model("bert", classify=True, num_labels=1).save_pretrained(raw)
    tm.tokenizer().save_pretrained(raw)
    prompts = {"query": "Instruct: judge relevance. Query: ", "short": "q: "}
    CrossEncoder(str(raw), max_length=128, prompts=prompts, default_prompt_name="query").save(str(tmp_path / "ce"))
    ce = CrossEncoder(str(tmp_path / "ce"))
    ps = pairs()
    with Engine(str(tmp_path / "ce"), task="rerank") as engine:
        assert engine.prompts == prompts and engine.default_prompt_name == "query"
        np.testing.assert_allclose(engine.score(ps), ce.predict(ps), atol=2e-6)
        np.testing.assert_allclose(engine.score(ps, prompt=""), ce.predict(ps, prompt=""), atol=2e-6)
        np.testing.assert_allclose(engine.score(ps, prompt_name="short"), ce.predict(ps, prompt_name="short"),
                                   atol=2e-6)
        prompted, bare = engine.tokenize_pairs(ps[:1]), engine.tokenize_pairs(ps[:1], prompt="")
        assert prompted[0].segment > bare[0].segment  # the prompt's tokens, in the query's segment
        ranked = engine.rerank(QUERY, DOCS)
        with pytest.raises(fastserve.InvalidInputError, match="not one of this model's prompts"):
            engine.score(ps, prompt_name="nope")
    score = {r.index: r.score for r in ranked}  # (a random model's scores are close: compare them, not the order)
    expected = ce.rank(QUERY, DOCS)
    np.testing.assert_allclose([score[e["corpus_id"]] for e in expected], [e["score"] for e in expected], atol=2e-6)


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_a_document_given_twice_gets_one_score_and_copies_rank_in_index_order(bert_ce, execution):
    """Copies of a document (duplicated chunks are common) are scored once:
    equal scores whatever batches they would have run in, the earlier first,
    as CrossEncoder.rank orders equal scores."""
    folder, ce = bert_ce
    docs = [DOCS[0], DOCS[1], DOCS[0], DOCS[2], DOCS[0], DOCS[1]]
    with Engine(str(folder), task="rerank", execution=execution) as engine:
        before = engine.stats()["submitted"]
        ranked = engine.rerank(QUERY, docs, return_documents=True)
        assert engine.stats()["submitted"] - before == 3  # three distinct documents
        ranked_async = asyncio.run(engine.arerank(QUERY, docs, return_documents=True))
    assert ranked == ranked_async
    score = {r.index: r.score for r in ranked}
    assert score[0] == score[2] == score[4] and score[1] == score[5]
    order = [r.index for r in ranked]
    assert order.index(0) < order.index(2) < order.index(4) and order.index(1) < order.index(5)
    assert [r.document for r in ranked] == [docs[i] for i in order]
    expected = ce.rank(QUERY, docs)
    np.testing.assert_allclose([score[e["corpus_id"]] for e in expected], [e["score"] for e in expected], atol=2e-6)


def test_long_pairs_do_not_log_the_tokenizers_indexing_errors_warning(bert_ce):
    """The engine counts each pair whole before cutting it: transformers'
    "... will result in indexing errors" does not apply and is not logged."""
    import logging

    from transformers.utils import logging as hf_logging

    folder, _ = bert_ce
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        with Engine(str(folder), task="rerank") as engine:
            assert engine.score(pairs([" ".join(["attention"] * 300)])).shape == (1,)
    finally:
        root.removeHandler(handler)
    assert not [r for r in records if "indexing errors" in r.getMessage()]


@pytest.mark.parametrize("arch,types", [("bert", True), ("distilbert", False)])
def test_token_types_reach_only_a_model_that_has_them(tmp_path, arch, types):
    """DistilBERT has no token types (transformers 4.x's forward refuses
    token_type_ids: every pair failed there): its pairs run without them;
    BERT's carry them."""
    folder, ce = cross_encoder_folder(tmp_path, arch)
    with Engine(str(folder), task="rerank", execution="padded") as engine:
        seen = []
        inner = engine.runner.run
        engine.runner.run = lambda batch, **kw: (seen.append("segments" in kw), inner(batch, **kw))[1]
        got = engine.score(pairs())
    assert seen and set(seen) == {types}
    np.testing.assert_allclose(got, ce.predict(pairs()), atol=2e-6)


@pytest.mark.parametrize("arch", ["xlm", "flaubert"])
def test_pairs_of_a_model_without_a_type_table_carry_the_types_predict_passes(tmp_path, arch):
    """XLM and FlauBERT have no token type table: predict's 0/1 types go
    through the word embeddings, so the pair's types must reach the model
    (all zeros moved a tiny XLM's raw scores by 0.023 and its ranking)."""
    import st_models
    from transformers import FlaubertForSequenceClassification, XLMForSequenceClassification

    cfg = st_models.config(arch)
    cfg.num_labels = 1
    torch.manual_seed(0)
    m = {"xlm": XLMForSequenceClassification, "flaubert": FlaubertForSequenceClassification}[arch](cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    raw = tmp_path / "raw"
    m.save_pretrained(raw)
    tm.tokenizer().save_pretrained(raw)
    CrossEncoder(str(raw), max_length=128).save(str(tmp_path / "ce"))
    ce = CrossEncoder(str(tmp_path / "ce"))
    texts = tm.mixed_texts(12, seed=3)
    ps = [(texts[i], texts[-1 - i]) for i in range(len(texts))] + pairs(DOCS[:4])
    with Engine(str(tmp_path / "ce"), task="rerank") as engine:
        assert engine.stats()["execution"] == "padded"
        got = engine.score(ps, raw=True)
    np.testing.assert_allclose(got, ce.predict(ps, activation_fn=torch.nn.Identity()), atol=2e-5)


def test_pairs_are_cut_on_the_side_the_engine_says_whatever_the_tokenizer_says(bert_ce, tmp_path):
    """A tokenizer saved with truncation_side="left": by default the engine
    cuts there (as CrossEncoder does), and truncate="right" cut pairs on the
    left all the same while engine.truncate said "right"."""
    import json
    import shutil

    folder, ce = bert_ce
    left = shutil.copytree(folder, tmp_path / "left")
    cfg = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**cfg, "truncation_side": "left"}))
    long_pair = [(QUERY, " ".join(f"w{i}" for i in range(300)))]
    with Engine(str(folder), task="rerank") as plain, Engine(str(left), task="rerank") as own, \
            Engine(str(left), task="rerank", truncate="right") as right:
        assert (plain.truncate, own.truncate, right.truncate) == ("right", "left", "right")
        cut_right = plain.tokenize_pairs(long_pair)[0]
        assert right.tokenize_pairs(long_pair)[0] == cut_right
        assert own.tokenize_pairs(long_pair)[0] != cut_right
        np.testing.assert_allclose(own.score(long_pair), CrossEncoder(str(left)).predict(long_pair), atol=1e-5)
