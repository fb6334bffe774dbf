"""Token classification (Engine(task="token-classify")): entities equal
transformers' token-classification pipeline for every aggregation strategy,
on tiny random models and texts whose words the tokenizer splits into
sub-words; each token's row goes back to its own request (padding-free)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import fastserve
import tiny_models as tm
from fastserve import Engine

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
TEXTS = [
    "Arnold Schwarzenegger visited Tübingen and the Universitätsklinikum on Tuesday.",
    "Unbelievably, antidisestablishmentarianism trended in Reykjavík.",
    "Microsoft's headquarters: Redmond, Washington.",
    "hi",
    "The quick brown fox jumps over the lazy dog near Llanfairpwllgwyngyll station, "
    "where Zyxwvut Qwerty-Asdfgh works for Globex Corporation.",
]
STRATEGIES = ["none", "simple", "first", "average", "max"]


def token_model(arch: str, seed: int = 0):
    from transformers import AutoModelForTokenClassification

    cfg = tm.config(arch)
    cfg.num_labels = len(LABELS)
    cfg.id2label = dict(enumerate(LABELS))
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    torch.manual_seed(seed)
    return AutoModelForTokenClassification.from_config(cfg, attn_implementation="eager").eval()


def pipeline_entities(m, texts, strategy):
    from transformers import pipeline

    pipe = pipeline("token-classification", model=m, tokenizer=tm.tokenizer(), aggregation_strategy=strategy,
                    device="cpu")
    out = pipe(texts)
    key = "entity" if strategy == "none" else "entity_group"
    return [[(e[key], float(e["score"]), e["start"], e["end"], e["word"], e.get("index")) for e in ents]
            for ents in out]


def ours(found):
    return [[(e.label, e.score, e.start, e.end, e.word, e.index) for e in ents] for ents in found]


def assert_same(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert [(x[0], x[2], x[3], x[4], x[5]) for x in g] == [(x[0], x[2], x[3], x[4], x[5]) for x in e]
        np.testing.assert_allclose([x[1] for x in g], [x[1] for x in e], atol=1e-5)


@pytest.fixture(scope="module")
def bert_tagger():
    return token_model("bert")


def test_the_texts_split_words_into_sub_words():
    tok = tm.tokenizer()
    pieces = tok.tokenize(" ".join(TEXTS))
    assert sum(p.startswith("##") for p in pieces) >= 10


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("arch", tm.ARCHS)
def test_entities_equal_the_transformers_pipeline(arch, execution, strategy):
    m = token_model(arch)
    with Engine(m, tm.tokenizer(), task="token-classify", execution=execution) as engine:
        got = engine.extract(TEXTS, aggregation_strategy=strategy)
    expected = pipeline_entities(m, TEXTS, strategy)
    assert sum(map(len, expected)) > 5  # the random model tags something
    assert_same(ours(got), expected)


def test_each_entity_text_is_its_span_of_the_input(bert_tagger):
    with Engine(bert_tagger, tm.tokenizer(), task="token-classify") as engine:
        for text, ents in zip(TEXTS, engine.extract(TEXTS, aggregation_strategy="first")):
            for e in ents:
                assert e.text == text[e.start:e.end] and e.start < e.end
                assert e.label in {"PER", "LOC", "ORG"}  # merged: B-/I- dropped, O ignored


def test_a_text_gets_the_same_entities_whatever_shares_its_batch(bert_tagger):
    with Engine(bert_tagger, tm.tokenizer(), task="token-classify") as engine:
        together = engine.extract(TEXTS, aggregation_strategy="none", ignore_labels=())
        alone = [engine.extract(t, aggregation_strategy="none", ignore_labels=()) for t in TEXTS]
    assert_same(ours(together), ours(alone))
    # every non-special token is reported once: the rows went back to their own request
    tok = tm.tokenizer()
    assert [len(e) for e in together] == [len(tok.tokenize(t)) for t in TEXTS]


def test_entities_refuse_inputs_and_logits_of_other_lengths(bert_tagger):
    with Engine(bert_tagger, tm.tokenizer(), task="token-classify") as engine:
        inputs, lists = engine.prepare_extract(TEXTS[:2])
        logits = [f.result(timeout=30) for f in engine.submit_many(lists)]
        assert len(engine.entities(inputs, logits)) == 2
        with pytest.raises(ValueError, match="2 inputs, 1 logits"):  # the second text was dropped
            engine.entities(inputs, logits[:1])


def test_long_texts_are_cut_like_the_pipeline_cuts_them_or_refused():
    m = token_model("bert")
    long = " ".join(["Schwarzenegger"] * 60)  # 3 word pieces each
    n = len(tm.tokenizer()(long)["input_ids"])
    assert n > 128
    with Engine(m, tm.tokenizer(), task="token-classify", max_length=128) as engine:
        got = engine.extract([long], aggregation_strategy="none", ignore_labels=())[0]
        assert max(e.index for e in got) == 126  # the last token before [SEP] at 127
        _, lists = engine.prepare_extract([long])
        assert lists.infos[0].truncated and lists.infos[0].tokens == n and len(lists[0]) == 128
    with Engine(m, tm.tokenizer(), task="token-classify", truncate="error") as engine:
        with pytest.raises(fastserve.InvalidInputError, match=f"index 1 is {n} tokens long"):
            engine.extract(["short", long])


def test_bad_arguments_get_typed_errors(bert_tagger):
    with Engine(bert_tagger, tm.tokenizer(), task="token-classify") as engine:
        with pytest.raises(fastserve.InvalidInputError, match="aggregation_strategy"):
            engine.extract(TEXTS, aggregation_strategy="longest")
        with pytest.raises(fastserve.InvalidInputError, match="index 1 must be a str"):
            engine.extract(["a", 3])
        with pytest.raises(fastserve.InvalidInputError, match="task='token-classify'"):
            engine.embed("a")
        assert engine.extract([]) == []
        assert engine.dim == len(LABELS)
    with pytest.raises(ValueError, match="chunk"):
        Engine(bert_tagger, tm.tokenizer(), task="token-classify", truncate="chunk")


def test_aextract_equals_extract(bert_tagger):
    with Engine(bert_tagger, tm.tokenizer(), task="token-classify") as engine:
        assert asyncio.run(engine.aextract(TEXTS)) == engine.extract(TEXTS)
        assert asyncio.run(engine.aextract(TEXTS[0])) == engine.extract(TEXTS[0])
