"""The HTTP routes of the rerank and token-classify tasks and of chunked
embeddings, served in-thread on 127.0.0.1: POST /v1/rerank (with httpx, and
with Cohere's own Python client speaking its shape), TEI's POST /rerank,
POST /v1/extract; the same auth, limits, metrics, deadline and errors as the
embeddings route; usage counts every token computed."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prom_parser = pytest.importorskip("prometheus_client.parser")

import fastserve  # noqa: E402
import tiny_models as tm  # noqa: E402
from fastserve.server import create_app  # noqa: E402
from test_extract import TEXTS, token_model  # noqa: E402
from test_long_inputs import long_text  # noqa: E402
from test_rerank import DOCS, QUERY, cross_encoder_folder  # noqa: E402
from test_server import InThreadServer  # noqa: E402

API_KEY = "task-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def ce_folder(tmp_path_factory):
    return cross_encoder_folder(tmp_path_factory.mktemp("ce"), "bert")[0]


@contextlib.contextmanager
def served(engine, **kw):
    with InThreadServer(create_app(engine, api_key=API_KEY, **kw)) as srv:
        yield srv


@pytest.fixture(scope="module")
def reranker(ce_folder):
    with fastserve.Engine(str(ce_folder), task="rerank") as engine, served(engine, max_inputs=8) as srv:
        yield engine, srv


def post(srv, path, body, headers=AUTH):
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=60)


def error_of(r, status):
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ------------------------------------------------------------------ rerank


def test_documents_go_back_as_sent_and_those_json_cannot_carry_are_a_400_before_anything_runs(reranker):
    # return_documents echoes each document as sent: a field with a lone
    # surrogate (json.dumps writes it as its escape), or nested past what
    # JSON writing allows, is refused up front, not a 500 once the model ran.
    engine, srv = reranker
    before = engine.stats()["submitted"]
    deep: list = []
    for _ in range(300):
        deep = [deep]
    for doc in ({"text": "x", "meta": "\udc00"}, {"text": "x", "m": deep}):
        body = httpx.post(srv.url + "/v1/rerank", headers={**AUTH, "Content-Type": "application/json"}, timeout=60,
                          content=json.dumps({"query": "q", "return_documents": True,
                                              "documents": [{"text": "fine"}, doc]}).encode())
        err = error_of(body, 400)
        assert (err["param"], err["code"]) == ("documents", "invalid_input")
        assert err["message"].startswith("documents[1] cannot be returned as JSON")
    assert engine.stats()["submitted"] == before
    # a document comes back as sent: a null field too, and no text it lacked
    r = post(srv, "/v1/rerank", {"query": "q", "return_documents": True, "rank_fields": ["title"],
                                 "documents": [{"title": "t", "note": None}]})
    assert r.status_code == 200 and r.json()["results"][0]["document"] == {"title": "t", "note": None}
    # without return_documents, the same documents rank
    r = post(srv, "/v1/rerank", {"query": "q", "documents": [{"text": "x", "m": deep}]})
    assert r.status_code == 200 and len(r.json()["results"]) == 1



def test_rerank_route_equals_the_engine(reranker):
    engine, srv = reranker
    r = post(srv, "/v1/rerank", {"model": "any", "query": QUERY, "documents": DOCS, "top_n": 3,
                                 "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = engine.rerank(QUERY, DOCS, top_n=3, return_documents=True)
    assert [x["index"] for x in body["results"]] == [e.index for e in expected]
    np.testing.assert_allclose([x["relevance_score"] for x in body["results"]], [e.score for e in expected],
                               atol=1e-6)
    assert [x["document"]["text"] for x in body["results"]] == [e.document for e in expected]
    tokens = sum(i.computed_tokens for i in engine.tokenize_pairs([(QUERY, d) for d in DOCS]).infos)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    # documents as {"text": ...} objects; no top_n: every document, no document echoed
    r = post(srv, "/v1/rerank", {"query": QUERY, "documents": [{"text": d} for d in DOCS], "raw_scores": True})
    raw = engine.rerank(QUERY, DOCS, raw=True)
    assert [(x["index"], pytest.approx(x["relevance_score"], abs=1e-5)) for x in r.json()["results"]] == \
        [(e.index, e.score) for e in raw]
    assert all("document" not in x for x in r.json()["results"])


def test_tei_rerank_alias(reranker):
    engine, srv = reranker
    r = post(srv, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert r.status_code == 200, r.text
    expected = engine.rerank(QUERY, DOCS)
    assert [x["index"] for x in r.json()] == [e.index for e in expected]
    np.testing.assert_allclose([x["score"] for x in r.json()], [e.score for e in expected], atol=1e-6)
    assert [x["text"] for x in r.json()] == [DOCS[e.index] for e in expected]
    raw = post(srv, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    assert "text" not in raw[0]
    np.testing.assert_allclose(sorted(x["score"] for x in raw), sorted(engine.score([(QUERY, d) for d in DOCS],
                                                                                   raw=True)), atol=1e-5)


def test_tei_rerank_truncate_false_refuses_a_long_pair_and_the_direction_is_checked(reranker):
    """text-embeddings-inference's truncate and truncation_direction were
    ignored: truncate=false still cut a long pair."""
    engine, srv = reranker
    long_doc = " ".join(["word"] * (engine.max_length * 2))
    texts = [DOCS[0], long_doc, long_doc]
    err = error_of(post(srv, "/rerank", {"query": QUERY, "texts": texts, "truncate": False}), 413)
    assert err["param"] == "texts" and err["message"].startswith("texts[1]:")
    assert engine.stats()["queue_depth"] == 0
    for truncate in (True, None):
        body = {"query": QUERY, "texts": texts, **({} if truncate is None else {"truncate": truncate})}
        assert post(srv, "/rerank", body).status_code == 200  # cut, as before
    short = [d for d in DOCS if not engine.tokenize_pairs([(QUERY, d)]).infos[0].truncated]
    assert post(srv, "/rerank", {"query": QUERY, "texts": short, "truncate": False,
                                 "truncation_direction": "Right"}).status_code == 200
    assert error_of(post(srv, "/rerank", {"query": QUERY, "texts": DOCS, "truncation_direction": "Left"}),
                    400)["param"] == "truncation_direction"
    assert "did you mean 'raw_scores'" in error_of(post(srv, "/rerank", {"query": QUERY, "texts": DOCS,
                                                                         "raw_score": True}), 400)["message"]


def test_cohere_client_reranks_through_the_route(reranker):
    cohere = pytest.importorskip("cohere")
    engine, srv = reranker
    co = cohere.Client(api_key=API_KEY, base_url=srv.url)
    got = co.rerank(model="fastserve", query=QUERY, documents=DOCS, top_n=2, return_documents=True)
    expected = engine.rerank(QUERY, DOCS, top_n=2)
    assert [x.index for x in got.results] == [e.index for e in expected]
    np.testing.assert_allclose([x.relevance_score for x in got.results], [e.score for e in expected], atol=1e-6)
    assert [x.document.text for x in got.results] == [DOCS[e.index] for e in expected]
    with pytest.raises(cohere.core.api_error.ApiError) as e:
        cohere.Client(api_key="wrong", base_url=srv.url).rerank(query=QUERY, documents=DOCS)
    assert e.value.status_code == 401


def test_cohere_v2_client_reranks_through_the_v2_path(reranker):
    cohere = pytest.importorskip("cohere")
    if not hasattr(cohere, "ClientV2"):
        pytest.skip("this cohere has no v2 client")
    engine, srv = reranker
    co = cohere.ClientV2(api_key=API_KEY, base_url=srv.url)
    got = co.rerank(model="fastserve", query=QUERY, documents=DOCS, top_n=2,
                    max_tokens_per_doc=engine.max_length)
    expected = engine.rerank(QUERY, DOCS, top_n=2)
    assert [x.index for x in got.results] == [e.index for e in expected]
    np.testing.assert_allclose([x.relevance_score for x in got.results], [e.score for e in expected], atol=1e-6)
    import inspect

    optional = {"priority": 1, "relevant_spans": {"enabled": False}}  # the SDK's other arguments
    optional = {k: v for k, v in optional.items() if k in inspect.signature(co.rerank).parameters}
    for name, value in optional.items():  # accepted and served (a body field fastserve does not read)
        got = co.rerank(model="fastserve", query=QUERY, documents=DOCS, top_n=2, **{name: value})
        assert [x.index for x in got.results] == [e.index for e in expected], name
    if "relevant_spans" in optional:  # asked for, it would be ignored: refused
        with pytest.raises(cohere.core.api_error.ApiError) as e:
            co.rerank(model="fastserve", query=QUERY, documents=DOCS, relevant_spans={"enabled": True})
        assert e.value.status_code == 400 and "relevant_spans" in str(e.value.body)
    with pytest.raises(cohere.core.api_error.ApiError) as e:
        co.rerank(model="fastserve", query=QUERY, documents=DOCS, max_tokens_per_doc=engine.max_length - 1)
    assert e.value.status_code == 400 and "max_tokens_per_doc" in str(e.value.body)


def test_rank_fields_rank_on_the_named_fields_and_documents_come_back_as_sent(reranker):
    """Cohere v1's rank_fields: one field ranks on its text, several on
    "field: value" lines in their order; return_documents sends each object
    back whole. A field missing, rank_fields on strings, or chunking asked
    for, is refused rather than ignored."""
    cohere = pytest.importorskip("cohere")
    engine, srv = reranker
    docs = [{"text": "the same body", "title": t, "id": i} for i, t in enumerate(DOCS[:3])]
    co = cohere.Client(api_key=API_KEY, base_url=srv.url)
    got = co.rerank(model="fastserve", query=QUERY, documents=docs, rank_fields=["title"], return_documents=True)
    expected = engine.rerank(QUERY, DOCS[:3])
    assert [x.index for x in got.results] == [e.index for e in expected]
    np.testing.assert_allclose([x.relevance_score for x in got.results], [e.score for e in expected], atol=1e-6)
    r = post(srv, "/v1/rerank", {"query": QUERY, "documents": docs, "rank_fields": ["title", "text"],
                                 "return_documents": True})
    assert r.status_code == 200, r.text
    joined = [f"title: {d['title']}\ntext: {d['text']}" for d in docs]
    want = {e.index: e.score for e in engine.rerank(QUERY, joined)}
    assert [pytest.approx(want[x["index"]], abs=1e-6) for x in r.json()["results"]] == \
        [x["relevance_score"] for x in r.json()["results"]]
    assert [x["document"] for x in r.json()["results"]] == [docs[x["index"]] for x in r.json()["results"]]
    for body, param in (({"documents": docs, "rank_fields": ["author"]}, "documents"),
                        ({"documents": DOCS, "rank_fields": ["title"]}, "rank_fields"),
                        ({"documents": docs, "rank_fields": []}, "rank_fields"),
                        ({"documents": [{"title": "no text"}]}, "documents"),
                        ({"documents": DOCS, "max_chunks_per_doc": 3}, "max_chunks_per_doc")):
        assert error_of(post(srv, "/v1/rerank", {"query": QUERY, **body}), 400)["param"] == param, body
    assert post(srv, "/v1/rerank", {"query": QUERY, "documents": DOCS, "max_chunks_per_doc": 1}).status_code == 200


def test_a_document_sent_twice_is_scored_once_over_http(reranker):
    engine, srv = reranker
    docs = [DOCS[0], DOCS[1], DOCS[0]]
    body = post(srv, "/v1/rerank", {"query": QUERY, "documents": docs}).json()
    score = {x["index"]: x["relevance_score"] for x in body["results"]}
    assert score[0] == score[2]
    order = [x["index"] for x in body["results"]]
    assert order.index(0) < order.index(2)
    tokens = sum(i.computed_tokens for i in engine.tokenize_pairs([(QUERY, d) for d in DOCS[:2]]).infos)
    assert body["usage"]["prompt_tokens"] == tokens  # two distinct documents computed


def test_the_openapi_document_says_what_the_routes_answer(reranker):
    """No FastAPI 422 (an invalid body is a 400 in the API's error shape),
    lists of inputs are non-empty, a 405 names every method of the path, and
    every POST route declares the headers that set its priority and deadline."""
    _, srv = reranker
    doc = httpx.get(srv.url + "/openapi.json", headers=AUTH).json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], path
            headers = {p["name"]: p["schema"] for p in op.get("parameters", ()) if p["in"] == "header"}
            assert set(headers) == ({"X-Fastserve-Priority", "X-Fastserve-Timeout"} if method == "post" else set()), path
            if headers:
                assert headers["X-Fastserve-Priority"]["maximum"] == 0  # the app's max_priority
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["components"]["schemas"]["RerankRequest"]["properties"]["documents"]["minItems"] == 1
    assert error_of(post(srv, "/v1/rerank", {"query": QUERY, "documents": []}), 400)["message"] == \
        "documents must not be empty"
    for path in ("/health", "/ready", "/metrics", "/v1/models"):
        r = httpx.post(srv.url + path, headers=AUTH)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", path
    assert httpx.get(srv.url + "/v1/rerank", headers=AUTH).headers["allow"] == "POST"


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/rerank", {"query": QUERY, "documents": []}, 400, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": ["d"] * 9}, 413, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}, 400, "top_n"),
    ("/v1/rerank", {"documents": DOCS}, 400, "query"),
    ("/v1/rerank", {"query": QUERY, "documents": [3]}, 400, "documents"),
    ("/rerank", {"query": QUERY, "texts": []}, 400, "texts"),
    ("/rerank", {"query": QUERY}, 400, "texts"),
])
def test_bad_rerank_requests_get_errors_naming_the_field(reranker, path, body, status, param):
    _, srv = reranker
    err = error_of(post(srv, path, body), status)
    assert err["param"] == param


def test_rerank_errors_name_the_sent_document_and_the_field_and_metrics_count_every_document(ce_folder):
    # The route scores the distinct documents (a copy once): an error names
    # the document by its index in the request, with the field it came in;
    # a bad query is the query's error; every document sent is an input.
    def send(srv, path, body):  # json.dumps writes a lone surrogate as its escape
        return httpx.post(srv.url + path, content=json.dumps(body), headers={**AUTH, "content-type": "application/json"},
                          timeout=60)

    long_doc = " ".join(["word"] * 200)
    with fastserve.Engine(str(ce_folder), task="rerank", truncate="error") as engine, served(engine) as srv:
        for path, field in (("/v1/rerank", "documents"), ("/rerank", "texts")):
            for docs, message in (([DOCS[0], DOCS[0], "x\ud800"], "pair at index 2's second text is not valid Unicode"),
                                  ([DOCS[0], DOCS[0], DOCS[1], long_doc], "pair at index 3 is 2")):
                err = error_of(send(srv, path, {"query": QUERY, field: docs}), 400)
                assert err["message"].startswith(message) and err["param"] == field, err
            err = error_of(send(srv, path, {"query": "q\ud800", field: DOCS}), 400)
            assert err["message"].startswith("query is not valid Unicode") and err["param"] == "query", err
        assert send(srv, "/v1/rerank", {"query": QUERY, "documents": [DOCS[0], DOCS[0], DOCS[1]]}).status_code == 200
        metrics = httpx.get(srv.url + "/metrics", headers=AUTH).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in prom_parser.text_string_to_metric_families(metrics) for s in f.samples}
    assert samples[("fastserve_http_inputs_total", (("route", "/v1/rerank"),))] == 3


def test_rerank_needs_the_api_key_and_is_counted_in_metrics(reranker):
    _, srv = reranker
    assert error_of(post(srv, "/v1/rerank", {"query": QUERY, "documents": DOCS}, headers={}), 401)
    assert error_of(post(srv, "/rerank", {"query": QUERY, "texts": DOCS}, headers={}), 401)
    post(srv, "/rerank", {"query": QUERY, "texts": DOCS})
    metrics = httpx.get(srv.url + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in prom_parser.text_string_to_metric_families(metrics) for s in f.samples}
    for route in ("/v1/rerank", "/rerank"):
        assert samples[("fastserve_http_requests_total", (("method", "POST"), ("route", route), ("status", "200")))] >= 1
        assert samples[("fastserve_http_requests_total", (("method", "POST"), ("route", route), ("status", "401")))] >= 1


def test_long_pairs_refused_by_the_engine_get_400_and_a_multi_label_model_cannot_rank(tmp_path, ce_folder):
    with fastserve.Engine(str(ce_folder), task="rerank", truncate="error") as engine, served(engine) as srv:
        err = error_of(post(srv, "/v1/rerank", {"query": QUERY, "documents": DOCS}), 400)
        assert "pair at index 4" in err["message"]
    folder, _ = cross_encoder_folder(tmp_path, "bert", num_labels=3)
    with fastserve.Engine(str(folder), task="rerank") as engine, served(engine) as srv:
        assert "one-logit" in error_of(post(srv, "/v1/rerank", {"query": QUERY, "documents": DOCS}), 400)["message"]


def test_a_rerank_past_its_deadline_gets_504(ce_folder):
    with fastserve.Engine(str(ce_folder), task="rerank") as engine, served(engine, request_timeout=0.2) as srv:
        with tm.held(engine) as gate:
            r = post(srv, "/v1/rerank", {"query": QUERY, "documents": DOCS})
            depth = engine.stats()["queue_depth"]
        assert error_of(r, 504)["type"] == "timeout_error"
        assert depth == 0 and len(gate.seen) == 1  # its pairs never reached the model


# ----------------------------------------------------------------- extract


def test_extract_route_equals_the_engine_and_refuses_bad_requests():
    with fastserve.Engine(token_model("bert"), tm.tokenizer(), task="token-classify") as engine, \
            served(engine) as srv:
        for strategy in ("simple", "none"):
            r = post(srv, "/v1/extract", {"input": TEXTS, "aggregation_strategy": strategy})
            assert r.status_code == 200, r.text
            expected = engine.extract(TEXTS, aggregation_strategy=strategy)
            got = [[(e["label"], e["start"], e["end"], e["text"], e["word"], e.get("index")) for e in d["entities"]]
                   for d in r.json()["data"]]
            assert got == [[(e.label, e.start, e.end, e.text, e.word, e.index) for e in ents] for ents in expected]
            scores = [e["score"] for d in r.json()["data"] for e in d["entities"]]
            np.testing.assert_allclose(scores, [e.score for ents in expected for e in ents], atol=1e-6)
        tokens = sum(len(x) for x in engine.prepare_extract(TEXTS)[1])
        assert r.json()["usage"]["prompt_tokens"] == tokens
        one = post(srv, "/v1/extract", {"input": TEXTS[0], "ignore_labels": []}).json()["data"]
        assert len(one) == 1 and one[0]["entities"]
        assert error_of(post(srv, "/v1/extract", {"input": TEXTS, "aggregation_strategy": "x"}), 400)["param"] == \
            "aggregation_strategy"
        assert error_of(post(srv, "/v1/extract", {"input": []}), 400)["param"] == "input"
        assert "string or a list of strings" in error_of(post(srv, "/v1/extract", {"input": [1]}), 400)["message"]
        assert error_of(post(srv, "/v1/extract", {"input": TEXTS}, headers={}), 401)


def test_the_task_routes_queue_with_the_priority_header(ce_folder, monkeypatch):
    """/v1/rerank, /v2/rerank, /rerank and /v1/extract pass the
    X-Fastserve-Priority header's value to the engine, as /v1/embeddings does
    (test_server); a value above the app's max_priority is a 400 there too."""
    from test_server import _priorities_of

    with fastserve.Engine(str(ce_folder), task="rerank") as engine, served(engine, max_priority=2) as srv:
        priorities = _priorities_of(engine, monkeypatch)
        for i, path in enumerate(("/v1/rerank", "/v2/rerank")):
            r = post(srv, path, {"query": QUERY, "documents": DOCS}, {**AUTH, "X-Fastserve-Priority": str(-i)})
            assert r.status_code == 200, r.text
        r = post(srv, "/rerank", {"query": QUERY, "texts": DOCS}, {**AUTH, "X-Fastserve-Priority": "2"})
        assert r.status_code == 200, r.text
        err = error_of(post(srv, "/v1/rerank", {"query": QUERY, "documents": DOCS},
                            {**AUTH, "X-Fastserve-Priority": "3"}), 400)
        assert err["code"] == "priority_not_allowed"
        assert priorities == [0, -1, 2]
    with fastserve.Engine(token_model("bert"), tm.tokenizer(), task="token-classify") as engine, \
            served(engine) as srv:
        priorities = _priorities_of(engine, monkeypatch)
        r = post(srv, "/v1/extract", {"input": TEXTS}, {**AUTH, "X-Fastserve-Priority": "-3"})
        assert r.status_code == 200, r.text
        assert priorities == [-3]


# ------------------------------------------------------ chunked embeddings


def test_chunked_embeddings_report_their_windows_and_usage_counts_every_computed_token():
    text = long_text(3)
    with fastserve.Engine(tm.model("bert"), tm.tokenizer(), truncate="chunk", chunk_overlap=16) as engine, \
            served(engine) as srv:
        r = post(srv, "/v1/embeddings", {"input": [text, "short"]})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        info = engine.submit(text).info
        assert (data[0]["tokens"], data[0]["chunks"], data[0]["truncated"]) == (info.tokens, info.chunks, False)
        assert info.chunks == 4 and info.computed_tokens > info.tokens  # overlap: some tokens run twice
        assert (data[1]["chunks"], data[1]["truncated"]) == (1, False)
        short = len(tm.tokenizer()("short")["input_ids"])
        assert r.json()["usage"]["prompt_tokens"] == info.computed_tokens + short
        np.testing.assert_allclose(data[0]["embedding"], engine.embed(text), atol=1e-6)
    with fastserve.Engine(tm.model("bert"), tm.tokenizer()) as engine, served(engine) as srv:
        data = post(srv, "/v1/embeddings", {"input": [text]}).json()
        assert (data["data"][0]["truncated"], data["data"][0]["chunks"]) == (True, 1)
        assert data["usage"]["prompt_tokens"] == 128
