"""Engine(folder).embed against SentenceTransformer(folder).encode: tiny
random models of every architecture and module stack, saved by the installed
sentence-transformers and in the older format, packed and padded, texts of
mixed lengths (some truncated) in one batch; and a hub id read from a local
huggingface_hub cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastserve
import st_models as sm
import tiny_models as tm
from fastserve import Engine, InferenceError

st = pytest.importorskip("sentence_transformers")
if int(st.__version__.split(".")[0]) < 5:
    pytest.skip("the parity folders are built with sentence-transformers >= 5 (Pooling(pooling_mode=...))",
                allow_module_level=True)

TEXTS = ["", "x", "Hello, world!"] + tm.mixed_texts(9, seed=3)
EXECUTIONS = ("packed", "padded")
ONE_BATCH = dict(policy="static", max_batch_tokens=4096)  # every queued text fits the next batch


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(arch, stack, format) -> folder, built once per module."""
    root = tmp_path_factory.mktemp("st")
    made: dict = {}

    def get(arch: str, stack: str, fmt: str) -> Path:
        key = (arch, stack, fmt)
        if key not in made:
            new = made.get((arch, stack, "new")) or sm.save(arch, stack, root / f"{arch}-{stack}")
            made[(arch, stack, "new")] = new
            if fmt == "legacy":
                made[key] = sm.to_legacy(new, root / f"{arch}-{stack}-legacy")
        return made[key]

    return get


def st_model(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return st.SentenceTransformer(str(folder), device="cpu")


def st_encode(folder: Path, texts, **prompt) -> np.ndarray:
    return st_model(folder).encode(texts, convert_to_numpy=True, **prompt)


def embed_in_one_batch(engine: Engine, texts, **prompt) -> np.ndarray:
    """The texts embedded together: queued while the worker is held, so in
    packed execution they leave the queue as one batch (checked; the padded
    scheduler splits batches past 20% padding: test_padded_runner_... runs
    one mixed batch)."""
    sizes: list[int] = []
    inner = engine.runner.run

    def run(batch, *args, **kwargs):
        sizes.append(int(batch.size))
        return inner(batch, *args, **kwargs)

    engine.runner.run = run
    with tm.held(engine) as gate:
        futures = engine.submit_many(texts, **prompt)
        gate.release.set()
    got = np.stack([f.result(timeout=60) for f in futures])
    if engine.runner.name == "packed":
        assert len(texts) in sizes, f"the texts ran in batches of {sizes}"
    return got


def assert_parity(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99999, cos
    assert np.abs(got - want).max() <= 1e-5


def check(folder: Path, execution: str, prompts=({},)) -> None:
    """Engine against encode on TEXTS, once per prompt arguments in `prompts`."""
    model = st_model(folder)
    with Engine(str(folder), execution=execution, **ONE_BATCH) as engine:
        assert engine.stats()["execution"] == execution
        for prompt in prompts:
            want = model.encode(TEXTS, convert_to_numpy=True, **prompt)
            assert engine.dim == want.shape[1]
            assert_parity(embed_in_one_batch(engine, TEXTS, **prompt), want)


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("fmt", ["new", "legacy"])
@pytest.mark.parametrize("arch", sm.ARCHS)
def test_every_architecture_matches_sentence_transformers(folders, arch, fmt, execution):
    check(folders(arch, "mean-dense-normalize" if fmt == "new" else "cls-normalize", fmt), execution)


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("fmt", ["new", "legacy"])
@pytest.mark.parametrize("stack", ["cls-normalize", "mean-dense-normalize", "weightedmean", "lasttoken",
                                   "max-meansqrt"])
def test_every_module_stack_matches_sentence_transformers(folders, stack, fmt, execution):
    check(folders("bert", stack, fmt), execution)


@pytest.mark.parametrize("arch", sorted(sm.PADDED))
def test_encoders_without_a_packed_family_give_each_text_as_encode_gives_it_alone(folders, arch):
    """Served padded by their own forward, each text as encode gives it
    alone, in one batch of mixed lengths (where encode's own batches move a
    text with its padding, ConvBERT, MobileBERT and FNet here, the engine's
    do not: it finds the leak and runs one length at a time)."""
    import transformers

    if not hasattr(transformers, sm.PADDED[arch][0]):
        pytest.skip(f"this transformers has no {sm.PADDED[arch][0]}")
    folder = folders(arch, "mean-dense-normalize", "new")
    model = st_model(folder)
    alone = np.stack([model.encode([t], convert_to_numpy=True)[0] for t in TEXTS])
    with Engine(str(folder), **ONE_BATCH) as engine:
        assert engine.stats()["execution"] == "padded"
        assert_parity(embed_in_one_batch(engine, TEXTS), alone)


@pytest.mark.parametrize("arch", ["xlm", "flaubert"])
def test_token_types_reach_the_model_as_encode_passes_them(folders, arch):
    """encode passes the token types the tokenizer makes (zeros for one
    text) to a model whose forward takes them. Left out, BERT counts them as
    zeros, but XLM and FlauBERT add the embedding of the ids given (nothing
    when left out): a tiny XLM's embedding was 0.55 away from encode's."""
    folder = folders(arch, "mean-dense-normalize", "new")
    assert "token_type_ids" in st_model(folder).tokenize(["x"])
    check(folder, "padded")


def test_funnel_whose_output_moves_with_padding_gives_each_text_as_encode_gives_it_alone(folders):
    """Funnel pools the sequence in blocks, padding positions included, so
    encode's own padded batches move a text with its batch's longest one.
    The engine finds the padding leak on its first padded batch and runs each
    length as a batch of its own: every text as encode gives it alone,
    whatever its company. transformers' Funnel raises on a text of two
    tokens (the empty one, [CLS] [SEP]), encode's whole call with it: the
    engine fails that request alone, with a typed error."""
    folder = folders("funnel", "mean-dense-normalize", "new")
    model = st_model(folder)
    texts = TEXTS[1:]
    with pytest.raises(RuntimeError):
        model.encode([""])
    alone = np.stack([model.encode([t], convert_to_numpy=True)[0] for t in texts])
    batched = model.encode(texts, convert_to_numpy=True)
    assert np.abs(batched - alone).max() > 1e-3  # the premise: encode's batches move the texts
    with Engine(str(folder), **ONE_BATCH) as engine:
        assert engine.stats()["execution"] == "padded"
        assert_parity(embed_in_one_batch(engine, texts), alone)
        assert engine.runner.pads_leak is True
        with tm.held(engine) as gate:
            futures = engine.submit_many(["", *texts[:3]])
            gate.release.set()
        with pytest.raises(InferenceError, match="broadcast shape"):
            futures[0].result(timeout=60)
        assert_parity(np.stack([f.result(timeout=60) for f in futures[1:]]), alone[:3])


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("stack", ["prompts", "prompts-excluded"])
@pytest.mark.parametrize("arch,fmt", [("bert", "new"), ("bert", "legacy"), ("mpnet", "new")])
def test_prompts_are_applied_as_encode_applies_them(folders, arch, stack, fmt, execution):
    """The default prompt, a named one, the empty one and a given one; with
    include_prompt=False the prompt's tokens are left out of the pooling."""
    check(folders(arch, stack, fmt), execution,
          ({}, {"prompt_name": "passage"}, {"prompt_name": "document"}, {"prompt": "custom prompt: "},
           {"prompt": "a prompt past the model's limit " * 40}))


def test_prompted_and_plain_requests_share_a_batch_each_pooled_as_its_own(folders):
    """include_prompt=False: each request's own prompt is left out, whatever
    the others in its batch carry."""
    folder = folders("bert", "prompts-excluded", "new")
    texts = TEXTS[3:9]
    want_q = st_encode(folder, texts)  # the default prompt: "query: "
    want_p = st_encode(folder, texts, prompt_name="passage")
    want_n = st_encode(folder, texts, prompt="")
    with Engine(str(folder), execution="packed", **ONE_BATCH) as engine:
        with tm.held(engine) as gate:
            fq = engine.submit_many(texts)
            fp = engine.submit_many(texts, prompt_name="passage")
            fn = engine.submit_many(texts, prompt="")
            gate.release.set()
        for futures, want in ((fq, want_q), (fp, want_p), (fn, want_n)):
            assert_parity(np.stack([f.result(timeout=60) for f in futures]), want)


def test_tokenize_and_submit_tokens_with_the_same_prompt_give_the_embedding(folders):
    folder = folders("bert", "prompts-excluded", "new")
    with Engine(str(folder)) as engine:
        ids = engine.tokenize(TEXTS[3:6], prompt_name="passage")
        direct = engine.embed(TEXTS[3:6], prompt_name="passage")
        np.testing.assert_array_equal(engine.embed(ids, prompt_name="passage"), direct)
        one = engine.submit_tokens(ids[0], prompt_name="passage").result(timeout=60)
        np.testing.assert_array_equal(one, direct[0])
        assert engine.tokenize(["a"], prompt="query: ") == engine.tokenize(["a"])  # the default prompt
        # With no prompt arguments, the default prompt ("query: ") in both.
        ids = engine.tokenize(TEXTS[3:4])
        np.testing.assert_array_equal(engine.submit_tokens(ids[0]).result(timeout=60), engine.embed(TEXTS[3]))


def test_an_unknown_prompt_name_is_refused_naming_the_known_ones(folders):
    with Engine(str(folders("bert", "prompts", "new"))) as engine:
        with pytest.raises(fastserve.InvalidInputError, match="'passage'"):
            engine.embed(["a"], prompt_name="nope")
        assert engine.prompts["query"] == "query: " and engine.default_prompt_name == "query"
        assert engine.similarity_fn_name == "cosine"


def test_a_hub_id_is_read_from_the_local_cache_with_its_whole_stack(folders, tmp_path):
    """HF_HOME points at a cache the test fills; the model runs offline, in a
    fresh process (huggingface_hub reads HF_HOME when imported)."""
    folder = folders("bert", "cls-normalize", "new")
    home = sm.hub_cache(folder, tmp_path / "hf", "fastserve-test/tiny-cls")
    script = (
        "import json, sys, warnings, numpy as np, fastserve, sentence_transformers as st\n"
        "warnings.simplefilter('ignore')\n"
        "texts = json.loads(sys.argv[1])\n"
        "want = st.SentenceTransformer('fastserve-test/tiny-cls', device='cpu').encode(texts)\n"
        "out = {}\n"
        "for execution in ('packed', 'padded'):\n"
        "    with fastserve.Engine('fastserve-test/tiny-cls', execution=execution) as e:\n"
        "        got = e.embed(texts)\n"
        "        out[execution] = [e.pooling, e.normalize, float(np.abs(got - want).max()),\n"
        "                          float(((got * want).sum(1) / np.linalg.norm(got, axis=1)\n"
        "                                 / np.linalg.norm(want, axis=1)).min())]\n"
        "print('RESULT' + json.dumps(out))\n"
    )
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(TEXTS)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT", 1)[1])
    for execution, (pooling, normalize, diff, cos) in out.items():
        assert (pooling, normalize) == ("cls", True), execution
        assert diff <= 1e-5 and cos >= 0.99999, (execution, diff, cos)


@pytest.mark.parametrize("arch", sm.ARCHS)
def test_the_padded_runner_on_one_batch_of_mixed_lengths_matches(folders, arch):
    """One padded batch holding every text (short, long, truncated), as a
    scheduler without the padding floor assembles it."""
    import torch

    from fastserve import _core

    folder = folders(arch, "prompts-excluded" if arch == "bert" else "mean-dense-normalize", "new")
    want = st_encode(folder, TEXTS, prompt_name="passage") if arch == "bert" else st_encode(folder, TEXTS)
    prompt = {"prompt_name": "passage"} if arch == "bert" else {}
    with Engine(str(folder), execution="padded") as engine:
        ids = engine.tokenize(TEXTS, **prompt)
        sched = _core.Scheduler(
            _core.SchedulerConfig(min_fill=0.0, pad_token_id=engine.tokenizer.pad_token_id or 0),
            _core.ControllerConfig(policy="static", min_tokens=1, max_tokens=1 << 16, initial_tokens=1 << 16),
            None)
        rids = list(sched.submit_many(ids, 0, None))
        batch = sched.next_batch(1.0)
        assert batch.size == len(TEXTS)
        skip = engine.tokenize(["passage: "], prompt="")[0] if arch == "bert" else None
        lengths = None if skip is None else np.full(len(TEXTS), len(skip) - 1)  # the prompt less [SEP]
        with torch.inference_mode():
            rows = engine.runner.run(batch, lengths) if lengths is not None else engine.runner.run(batch)
    order = {int(r): i for i, r in enumerate(batch.ids)}
    assert_parity(np.stack([rows[order[int(r)]] for r in rids]), want)


def _rewrite(folder: Path, out: Path, edit) -> Path:
    import shutil

    shutil.copytree(folder, out)
    modules = json.loads((out / "modules.json").read_text())
    edit(out, modules)
    (out / "modules.json").write_text(json.dumps(modules))
    return out


@pytest.mark.parametrize("case,module", [
    ("unknown module", "WordWeights"),
    ("no pooling", "Pooling"),
    ("dense before pooling", "Dense"),
    ("activation outside torch", "Dense"),
    ("cross encoder", "CrossEncoder"),
    ("custom code", "custom_st.Pooling"),
    ("custom code named as the built-in", "custom_st.Transformer"),
])
def test_a_stack_it_cannot_reproduce_is_refused_naming_the_module(folders, tmp_path, case, module):
    folder = folders("bert", "mean-dense-normalize", "new")

    def edit(out: Path, modules: list) -> None:
        if case == "unknown module":
            modules.insert(2, {"idx": 9, "name": "9", "path": "9_WW",
                               "type": "sentence_transformers.models.WordWeights"})
            for i, m in enumerate(modules):
                m["idx"] = i
        elif case == "no pooling":
            modules[:] = [modules[0]]
        elif case == "dense before pooling":  # in the list's order, whatever idx says
            modules[1], modules[2] = modules[2], modules[1]
        elif case.startswith("custom code"):
            # The folder's own class (SentenceTransformer runs it only with
            # trust_remote_code): refused, not served as the module it is named after.
            modules[0 if module.endswith("Transformer") else 1]["type"] = module
        elif case == "activation outside torch":
            cfg = json.loads((out / "2_Dense" / "config.json").read_text())
            cfg["activation_function"] = "mypackage.Swish"
            (out / "2_Dense" / "config.json").write_text(json.dumps(cfg))
        else:
            cfg = json.loads((out / "config_sentence_transformers.json").read_text())
            cfg["model_type"] = "CrossEncoder"
            (out / "config_sentence_transformers.json").write_text(json.dumps(cfg))

    bad = _rewrite(folder, tmp_path / "bad", edit)
    with pytest.raises(fastserve.UnsupportedModelError, match=module) as err:
        Engine(str(bad))
    assert err.value.module == module
    assert isinstance(err.value, fastserve.ModelLoadError)


def test_modules_run_in_the_lists_order_as_sentence_transformers_runs_them(folders, tmp_path):
    """sentence-transformers never reads "idx": Dense then Normalize listed
    with idx 3 and 2 ran Normalize first; Pooling listed with idx 2 after a
    Transformer was refused as Normalize before Pooling."""
    folder = folders("bert", "mean-dense-normalize", "new")

    def swap_idx(out: Path, modules: list) -> None:
        modules[2]["idx"], modules[3]["idx"] = 3, 2

    odd = _rewrite(folder, tmp_path / "odd-idx", swap_idx)
    with Engine(str(odd), **ONE_BATCH) as engine:
        assert_parity(embed_in_one_batch(engine, TEXTS), st_encode(odd, TEXTS))


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_dropout_after_pooling_is_served_as_encode_runs_it(folders, tmp_path):
    """A Dropout module on the pooled embedding does nothing in encode (eval
    mode): it was refused as an unknown module. Before Pooling it is refused
    (sentence-transformers' own Dropout needs the sentence embedding)."""
    folder = folders("bert", "mean-dense-normalize", "new")

    def after_pooling(out: Path, modules: list) -> None:
        (out / "2_Dropout").mkdir()
        (out / "2_Dropout" / "config.json").write_text(json.dumps({"dropout": 0.3}))
        modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dropout",
                           "type": "sentence_transformers.models.Dropout"})
        for i, m in enumerate(modules):
            m["idx"] = i

    good = _rewrite(folder, tmp_path / "good", after_pooling)
    texts = TEXTS[:8]
    want = st_encode(good, texts)
    with Engine(str(good)) as e:
        got = e.embed(texts)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    def before_pooling(out: Path, modules: list) -> None:
        after_pooling(out, modules)
        modules[1], modules[2] = modules[2], modules[1]

    bad = _rewrite(folder, tmp_path / "bad", before_pooling)
    with pytest.raises(fastserve.UnsupportedModelError, match="Dropout"):
        Engine(str(bad))


def test_the_transformers_tokenizer_settings_apply_as_encode_applies_them(folders, tmp_path):
    """Each was ignored: processing_kwargs' text max_length (sentence-transformers
    6), the deprecated tokenizer_name_or_path, and the tokenizer's own
    truncation_side="left" (the default truncate cut on the right)."""
    import shutil

    from tokenizers.normalizers import BertNormalizer

    base = folders("bert", "mean-dense-normalize", "new")
    long_texts = [t for t in TEXTS if len(tm.tokenizer()(t)["input_ids"]) > sm.MAX_SEQ_LENGTH]
    assert long_texts

    short = shutil.copytree(base, tmp_path / "short")
    _edit_json(short / "sentence_bert_config.json", processing_kwargs={"text": {"max_length": 6}})
    cased = shutil.copytree(base, tmp_path / "cased-tokenizer")
    tok_dir = tmp_path / "elsewhere"
    tok = tm.tokenizer().__class__.from_pretrained(str(base), do_lower_case=False)
    tok.backend_tokenizer.normalizer = BertNormalizer(lowercase=False)
    tok.save_pretrained(str(tok_dir))
    _edit_json(tok_dir / "tokenizer_config.json", do_lower_case=False)
    _edit_json(cased / "sentence_bert_config.json", tokenizer_name_or_path=str(tok_dir))
    left = shutil.copytree(base, tmp_path / "left")
    _edit_json(left / "tokenizer_config.json", truncation_side="left")
    texts = ["HELLO World, MIXED Case", *long_texts, TEXTS[4]]
    for folder in (short, cased, left):
        with Engine(str(folder)) as engine:
            assert_parity(engine.embed(texts), st_encode(folder, texts))
            if folder is short:
                assert engine.max_length == 6
            if folder is left:
                assert engine.truncate == "left"
    with Engine(str(base)) as engine:
        assert engine.truncate == "right"  # the tokenizer's own side
    other = shutil.copytree(base, tmp_path / "other-processing")
    _edit_json(other / "sentence_bert_config.json", processing_kwargs={"common": {"add_special_tokens": False}})
    with pytest.raises(fastserve.UnsupportedModelError, match="processing_kwargs"):
        Engine(str(other))


@pytest.mark.parametrize("arch", ["roberta", "xlm-roberta", "mpnet"])
def test_a_text_holding_the_pad_token_is_positioned_as_transformers_positions_it(folders, arch):
    """These families' embeddings count positions from the ids: a pad id
    inside a text sits at padding_idx and the tokens after it move up one. The
    packed runners gave every token the next position (min cosine 0.84-0.96)."""
    folder = folders(arch, "mean-dense-normalize", "new")
    texts = ["hello [PAD] world, and more words after it", "[PAD]", "[PAD] [PAD] lead", TEXTS[5]]
    with Engine(str(folder), execution="packed", **ONE_BATCH) as packed:
        assert_parity(embed_in_one_batch(packed, texts), st_encode(folder, texts))
        # MPNet's embeddings position around id 1 whatever the pad token is.
        pad = 1 if arch == "mpnet" else 0
        ids = [[101, 7592, pad, 2088, pad, 102], [101, pad, 102], [101, 2088, 102], [pad, pad]]
        with Engine(str(folder), execution="padded") as padded:
            assert_parity(packed.embed(ids), padded.embed(ids))


def test_normalize_false_drops_the_stacks_normalize_and_true_adds_one(folders):
    folder = folders("bert", "weightedmean", "new")  # no Normalize module
    want = st_encode(folder, TEXTS[3:7])
    with Engine(str(folder), normalize=True) as engine:
        assert engine.normalize is True
        got = engine.embed(TEXTS[3:7])
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    with Engine(str(folders("bert", "cls-normalize", "new")), normalize=False) as engine:
        assert engine.normalize is False
        assert np.abs(np.linalg.norm(engine.embed(TEXTS[3:7]), axis=1) - 1).max() > 1e-3


def test_the_embeddings_route_takes_prompt_name_and_prompt_as_encode_does(folders):
    """The HTTP extension fields: the same vectors as SentenceTransformer.encode
    with the same prompt arguments; an unknown prompt name is a 400."""
    import asyncio

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from fastserve.server import create_app

    folder = folders("bert", "prompts-excluded", "new")
    texts = TEXTS[3:7]

    async def post(app, body):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            return await c.post("/v1/embeddings", json=body)

    with Engine(str(folder)) as engine:
        app = create_app(engine)
        for prompt in ({}, {"prompt_name": "passage"}, {"prompt": "custom prompt: "}, {"prompt": ""}):
            r = asyncio.run(post(app, {"input": texts, **prompt}))
            assert r.status_code == 200, r.text
            got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
            assert_parity(got, st_encode(folder, texts, **prompt))
        r = asyncio.run(post(app, {"input": texts, "prompt_name": "nope"}))
        assert r.status_code == 400 and "prompt_name 'nope'" in r.json()["error"]["message"]


def test_auto_logs_once_why_it_runs_padded_and_stats_report_the_path(caplog):
    """A model no packed adapter declares runs padded; the reason is logged
    once (not per engine or batch) and reported by stats()."""
    import logging

    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model("electra", vocab_size=tm.tokenizer().vocab_size, embedding_size=32, hidden_size=32,
                               num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    electra = AutoModel.from_config(cfg).eval()
    from fastserve import families

    families._logged.discard(("electra", "no packed runner for model_type='electra'"))
    with caplog.at_level(logging.INFO, logger="fastserve"):
        for _ in range(2):
            with Engine(electra, tm.tokenizer()) as engine:
                s = engine.stats()
    said = [r.getMessage() for r in caplog.records if "runs electra padded" in r.getMessage()]
    assert said == ["fastserve: execution='auto' runs electra padded: no packed runner for model_type='electra'"]
    assert (s["execution"], s["family"], s["dtype"]) == ("padded", "other", "float32")
    assert s["padded_reason"] == "no packed runner for model_type='electra'"
    assert s["attention"] is None and s["model_attention"] in ("sdpa", "eager")
    with Engine(sm.encoder("mpnet"), tm.tokenizer()) as engine:
        s = engine.stats()
    assert (s["execution"], s["family"], s["attention"], s["padded_reason"]) == ("packed", "mpnet", "runs", None)


def test_do_lower_case_and_max_seq_length_of_the_transformer_config_apply(folders, tmp_path):
    """A cased tokenizer under a Transformer config with do_lower_case (and a
    shorter max_seq_length): the engine lowercases and truncates as encode."""
    import shutil

    from tokenizers.normalizers import BertNormalizer

    legacy = folders("bert", "mean-dense-normalize", "legacy")
    folder = tmp_path / "lower"
    shutil.copytree(legacy, folder)
    tok_dir = folder / "0_Transformer"
    tok = tm.tokenizer().__class__.from_pretrained(str(tok_dir), do_lower_case=False)
    tok.backend_tokenizer.normalizer = BertNormalizer(lowercase=False)  # cased
    tok.save_pretrained(str(tok_dir))
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": False}))
    cased = tm.tokenizer().__class__.from_pretrained(str(tok_dir))
    assert cased("HELLO")["input_ids"] != cased("hello")["input_ids"]
    (tok_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 20, "do_lower_case": True}))
    texts = ["HELLO World, MIXED Case", "ÉCOLE Über Straße", TEXTS[5].upper()]
    want = st_encode(folder, texts)
    with Engine(str(folder)) as engine:
        assert engine.max_length == 20
        assert engine.tokenize(["HELLO"]) == engine.tokenize(["hello"])
        assert_parity(engine.embed(texts), want)


@pytest.mark.parametrize("arch", ["bert", "mpnet", "t5", "umt5", "modernbert"])
def test_packed_attention_on_a_padded_copy_with_bias_and_window_matches(folders, arch, monkeypatch):
    """The attention CUDA runs ("pad": one SDPA call over a padded copy, the
    family's relative bias or window mask plus the key mask), forced on the CPU."""
    monkeypatch.setenv("FASTSERVE_PACKED_ATTENTION", "pad")
    folder = folders(arch, "mean-dense-normalize", "new")
    want = st_encode(folder, TEXTS)
    with Engine(str(folder), execution="packed", **ONE_BATCH) as engine:
        assert_parity(embed_in_one_batch(engine, TEXTS), want)
        s = engine.stats()
    assert s["attention"] == "pad" and s["attention_batches"]["pad"] >= 1


def test_the_path_comes_from_the_adapters_declarations():
    from fastserve import families

    t5 = sm.encoder("t5")
    assert families.select(t5, "embed", "auto").capabilities.layout == "packed"
    choice = families.select(t5, "classify", "auto")  # the T5 adapter declares no classify head
    assert choice.capabilities.layout == "padded" and choice.reason == "the packed t5 runner has no 'classify' head"
    with pytest.raises(ValueError, match="execution='packed' is not available: the packed t5 runner has no"):
        families.select(t5, "classify", "packed")
    assert families.select(t5, "embed", "padded").reason == "execution='padded'"
    bert = tm.model("bert")
    bert.config.position_embedding_type = "relative_key"
    reason = families.select(bert, "embed", "auto").reason
    assert reason.startswith("bert: ") and "relative_key" in reason
    for family in families.FAMILIES:  # every adapter runs embed packed, with every pooling
        assert family.capabilities.layout == "packed" and "embed" in family.capabilities.tasks
        assert family.capabilities.poolings == frozenset(fastserve.st_spec.POOLING_MODES)


# --- config values sentence-transformers 6 applies -------------------------------

ST_MAJOR = int(st.__version__.split(".")[0])


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("stack", ["mean-dense-normalize", "cls-normalize", "weightedmean"])
def test_truncate_dim_of_the_st_config_matches_encode(folders, tmp_path, stack, execution):
    """config_sentence_transformers.json's truncate_dim (saved by
    sentence-transformers 6): encode cuts every embedding to it after the
    stack and does not normalise again. Older releases do not read it from
    the config: the reference is then SentenceTransformer(truncate_dim=8),
    what 6.x makes of the file."""
    import shutil

    folder = Path(shutil.copytree(folders("bert", stack, "new"), tmp_path / "cut"))
    _edit_json(folder / "config_sentence_transformers.json", truncate_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = st.SentenceTransformer(str(folder), device="cpu", truncate_dim=8)
        if ST_MAJOR >= 6:
            assert st_model(folder).truncate_dim == 8
    want = model.encode(TEXTS, convert_to_numpy=True)
    assert want.shape == (len(TEXTS), 8)
    with Engine(str(folder), execution=execution, **ONE_BATCH) as engine:
        assert engine.dim == 8
        assert_parity(embed_in_one_batch(engine, TEXTS), want)
    with Engine(str(folder), execution=execution, normalize=True) as engine:
        assert_parity(engine.embed(TEXTS[3:]), model.encode(TEXTS[3:], convert_to_numpy=True,
                                                            normalize_embeddings=True))


def test_the_tokenizer_kwargs_model_max_length_wins_over_max_seq_length_as_in_transformer_init(folders, tmp_path):
    """A legacy Transformer config with both max_seq_length 16 and
    tokenizer_args' model_max_length 40: sentence-transformers 6 sets
    max_seq_length as the tokenizer's model_max_length only where the kwargs
    set none, so it truncates at 40 (fastserve cut at 16: min cosine 0.955)."""
    import shutil

    folder = Path(shutil.copytree(folders("bert", "mean-dense-normalize", "legacy"), tmp_path / "targs"))
    _edit_json(folder / "0_Transformer" / "sentence_bert_config.json", max_seq_length=16,
               tokenizer_args={"model_max_length": 40})
    model = st_model(folder)
    if model.max_seq_length != 40:
        pytest.skip(f"sentence-transformers {st.__version__} lets max_seq_length win (6.x: the tokenizer kwargs)")
    with Engine(str(folder), **ONE_BATCH) as engine:
        assert engine.max_length == 40
        assert_parity(embed_in_one_batch(engine, TEXTS), model.encode(TEXTS, convert_to_numpy=True))


def test_prompt_name_query_and_document_work_on_every_model_as_in_encode(folders, tmp_path):
    """sentence-transformers 6's default prompts {"query": "", "document": ""},
    under the saved ones; a default_prompt_name "query" without a saved query
    prompt loads."""
    import shutil

    if "query" not in getattr(st.SentenceTransformer, "_default_prompts", {}):
        pytest.skip(f"sentence-transformers {st.__version__} has no default prompts")
    folder = folders("bert", "cls-normalize", "new")
    texts = TEXTS[3:8]
    with Engine(str(folder)) as engine:
        assert engine.prompts == st_model(folder).prompts
        for name in ("query", "document"):
            assert_parity(engine.embed(texts, prompt_name=name), st_encode(folder, texts, prompt_name=name))
        assert_parity(engine.embed(texts, prompt_name="query"), st_model(folder).encode_query(texts))
    default = Path(shutil.copytree(folder, tmp_path / "default-query"))
    _edit_json(default / "config_sentence_transformers.json", prompts={}, default_prompt_name="query")
    model = st_model(default)
    with Engine(str(default)) as engine:
        assert (engine.prompts, engine.default_prompt_name) == (model.prompts, model.default_prompt_name)
        assert_parity(engine.embed(texts), model.encode(texts))
    with Engine(str(folders("bert", "prompts", "new"))) as engine:  # saved prompts win
        assert engine.prompts == st_model(folders("bert", "prompts", "new")).prompts


def test_a_t5_without_any_length_limit_runs_whole_texts_as_encode_given_max_length(tmp_path):
    """No position table, no tokenizer limit, no max_seq_length:
    sentence-transformers cuts nothing; fastserve warns that it assumes 512
    and, given max_length=1024, matches encode on a 700-token text."""
    from sentence_transformers.models import Pooling, Transformer

    hf = sm.save_encoder("t5", tmp_path / "t5-hf")
    folder = tmp_path / "t5-st"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.SentenceTransformer(modules=[Transformer(str(hf)), Pooling(32, "mean")], device="cpu").save(str(folder))
    for f in (folder / "tokenizer_config.json", folder / "sentence_bert_config.json"):
        cfg = json.loads(f.read_text())
        cfg.pop("model_max_length", None)
        cfg.pop("max_seq_length", None)
        f.write_text(json.dumps(cfg))
    texts = ["short text", " ".join(["word"] * 700)]
    model = st_model(folder)
    if (model.max_seq_length or 0) < 10_000:
        pytest.skip(f"sentence-transformers {st.__version__} sets a limit here: {model.max_seq_length}")
    want = model.encode(texts, convert_to_numpy=True)
    with pytest.warns(RuntimeWarning, match="512"):
        Engine(str(folder)).close()
    with Engine(str(folder), max_length=1024) as engine:
        assert_parity(engine.embed(texts), want)


def _xlnet_folder(root: Path, mode: str) -> Path:
    from sentence_transformers.models import Pooling, Transformer
    from transformers import XLNetConfig, XLNetModel

    try:
        from transformers import XLNetTokenizer

        words = [w for w in tm.tokenizer().vocab if w.isalpha()][:3000]
        specials = ["<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>", "<eod>", "<eop>"]
        vocab = ([(s, 0.0) for s in specials] + [("▁" + w, -5.0) for w in words]
                 + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz,.!"])
        tok = XLNetTokenizer(vocab=vocab, unk_id=0)  # transformers 5: a Unigram tokenizer from a vocabulary
        hf = root / "xlnet-hf"
        tok.save_pretrained(hf)
    except Exception as e:  # transformers 4 builds XLNet's tokenizer from a sentencepiece file only
        pytest.skip(f"no tiny XLNet tokenizer with this transformers: {e!r}")
    import torch

    torch.manual_seed(0)
    m = XLNetModel(XLNetConfig(vocab_size=len(vocab), d_model=32, n_layer=2, n_head=4, d_inner=64,
                               pad_token_id=tok.pad_token_id)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    m.save_pretrained(hf)
    folder = root / f"xlnet-{mode}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.SentenceTransformer(modules=[Transformer(str(hf), max_seq_length=64), Pooling(32, pooling_mode=mode)],
                               device="cpu").save(str(folder))
    return folder


def test_xlnets_position_table_of_minus_one_is_no_limit(tmp_path):
    """XLNet's max_position_embeddings is -1: sentence-transformers ignores it
    (max_seq_length 64 here); fastserve took it as the limit and refused to
    build (max_length -1), even given max_length=64."""
    folder = _xlnet_folder(tmp_path, "mean")
    texts = TEXTS[2:8]
    want = st_encode(folder, texts)
    with Engine(str(folder)) as engine:
        assert engine.max_length == 64
        assert_parity(engine.embed(texts), want)
    with Engine(str(folder), max_length=32) as engine:
        assert engine.max_length == 32
