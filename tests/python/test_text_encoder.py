"""TextEncoder: the engine's tokenization. A fast tokenizer is called directly
(its Rust backend, configured once), and must give exactly the ids
transformers' tokenizer(...) gives; anything else falls back to it."""

from __future__ import annotations

import functools

import pytest
import tiny_models as tm

from fastserve.models import TextEncoder


def _reference(tok, texts, max_length, truncate):
    return tok(list(texts), add_special_tokens=True, truncation=truncate,
               max_length=max_length if truncate else None)["input_ids"]


def _texts():
    return tm.mixed_texts(300, seed=11) + ["", " ", "Café 🙂 日本語", "[CLS] [SEP] <s>", "a\tb\nc"]


@functools.lru_cache(maxsize=None)
def _trained(kind: str):
    """A byte-level BPE with RoBERTa's template, or a Unigram with Metaspace
    and T5's template, trained on the corpus: other tokenizer families than
    WordPiece, without downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from fastserve.corpus import texts

    if kind == "bpe":
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        t.train_from_iterator(texts(), trainer)
        t.post_processor = processors.RobertaProcessing(("</s>", t.token_to_id("</s>")), ("<s>", t.token_to_id("<s>")))
        return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>", model_max_length=512)
    t = Tokenizer(models.Unigram())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    t.train_from_iterator(texts(), trainer)
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", t.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=512)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
@pytest.mark.parametrize("max_length,truncate", [(128, True), (16, True), (512, False)])
def test_direct_ids_equal_transformers(kind, max_length, truncate):
    tok = tm.tokenizer() if kind == "wordpiece" else _trained(kind)
    enc = TextEncoder(tok, max_length, truncate)
    assert enc.direct
    texts = _texts()
    expected = _reference(tok, texts, max_length, truncate)
    assert enc(texts) == expected  # a list: the batch call
    assert [enc([t])[0] for t in texts] == expected  # one text: the single call
    if truncate:
        assert max(len(ids) for ids in expected) == max_length  # truncation was exercised


def test_left_truncation_side_is_kept():
    tok = _trained("bpe")
    left = _copy(tok, truncation_side="left")
    enc = TextEncoder(left, 16, True)
    assert enc.direct
    texts = _texts()
    assert enc(texts) == _reference(left, texts, 16, True)


def _copy(tok, **kwargs):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token=tok.bos_token,
                                   eos_token=tok.eos_token, pad_token=tok.pad_token, unk_token=tok.unk_token,
                                   model_max_length=tok.model_max_length, **kwargs)


def test_a_tokenizer_whose_direct_ids_differ_goes_through_transformers():
    tok = tm.tokenizer()

    class Customised:  # a fast tokenizer whose __call__ does more than its backend
        is_fast = True
        backend_tokenizer = tok.backend_tokenizer
        truncation_side = "right"

        def __call__(self, texts, **kw):
            return {"input_ids": [ids + [0] for ids in tok(texts, **kw)["input_ids"]]}

    enc = TextEncoder(Customised(), 128, True)
    assert not enc.direct
    texts = _texts()
    assert enc(texts) == [ids + [0] for ids in _reference(tok, texts, 128, True)]


def test_a_slow_tokenizer_goes_through_transformers():
    tok = tm.tokenizer()

    class Slow:
        is_fast = False

        def __call__(self, texts, **kw):
            return tok(texts, **kw)

    enc = TextEncoder(Slow(), 128, True)
    assert not enc.direct
    assert enc(["hello world"]) == _reference(tok, ["hello world"], 128, True)


def test_the_direct_copy_is_private():
    """transformers reconfigures its backend on every call (truncation,
    padding); the encoder's copy keeps its own settings whatever else uses
    the same tokenizer object, as two engines sharing one tokenizer would."""
    tok = tm.tokenizer()
    short, long_ = TextEncoder(tok, 16, True), TextEncoder(tok, 128, True)
    text = " ".join(["word"] * 100)
    tok([text], truncation=True, max_length=40, padding="max_length")
    assert len(short([text])[0]) == 16
    assert len(long_([text])[0]) == 102
    assert long_([text, "x"]) == _reference(tok, [text, "x"], 128, True)  # no padding crept in


def test_one_long_text_lets_other_threads_run():
    """One text goes through the backend's batch call, which lets go of the
    GIL while it tokenizes: a 1.9 MB text (the HTTP edge takes up to 2 MB)
    held it for seconds through the single-text call, stalling the server's
    event loop (its /health answered in 1.9 s). A ratio, not a speed: another
    thread's loop must advance at least a fifth as much while the text is
    tokenized as while this thread then waits as long without the GIL (held,
    it advanced about 1% as much)."""
    import threading
    import time

    enc = TextEncoder(tm.tokenizer(), 128, True)
    assert enc.direct
    text = " ".join(tm.mixed_texts(4000, seed=3))  # 840,000 characters
    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        before, t0 = count[0], time.perf_counter()
        ids = enc([text])[0]
        during, took = count[0] - before, time.perf_counter() - t0
        before = count[0]
        threading.Event().wait(took)  # the same time with the GIL let go
        free = count[0] - before
    finally:
        stop.set()
        t.join()
    assert len(ids) == 128
    assert during >= free / 5, (during, free)
