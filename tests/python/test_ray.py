"""fastserve.ray: the Ray Serve deployment, on a two-node Ray cluster that the
tests start and stop on loopback (ray.cluster_utils.Cluster: two raylets,
one CPU each, all on 127.0.0.1).

Marked `ray` (`-m ray` runs them alone; CI installs the `ray` extra, so they
run in the test command with the rest); skipped when Ray Serve is not
installed. Every wait has a bound, so a fault shows as a failure, never as a
hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ray

# Ray swaps a loopback address for the machine's own address when connecting
# (it expects other machines); with this flag it keeps 127.0.0.1 everywhere, so
# every node, worker and request stays on loopback. Read when Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ray = pytest.importorskip("ray", reason="needs the 'ray' extra: pip install '.[ray]'", exc_type=ImportError)
serve = pytest.importorskip("ray.serve", reason="needs the 'ray' extra: pip install '.[ray]'", exc_type=ImportError)
httpx = pytest.importorskip("httpx")

import tiny_models  # noqa: E402

import fastserve  # noqa: E402
import fastserve.ray as fray  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "ray" / "serve_config.yaml"
APP = "fastserve-test"
LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _replica_actors() -> dict[str, object]:
    """The live replica actors of the test app, by actor name (one that dies
    between the listing and its lookup, a killed one, is left out)."""
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA::") and APP in a["name"]:
            try:
                out[a["name"]] = ray.get_actor(a["name"], namespace=a["namespace"])
            except ValueError:  # "Failed to look up actor": it died since the listing
                continue
    return out


def _replica_stats() -> dict[str, dict]:
    """Each live replica's routing stats (its engine's counters and node)."""
    out = {}
    for name, actor in _replica_actors().items():
        try:
            out[name] = ray.get(actor.record_routing_stats.remote(), timeout=30)
        except ray.exceptions.RayError:
            continue  # dying, or a new one still starting
    return out


def _running_replicas() -> int:
    status = serve.status().applications.get(APP)
    if status is None or status.status != "RUNNING":
        return 0
    dep = status.deployments[fray.DEPLOYMENT_NAME]
    return dep.replica_states.get("RUNNING", 0) if dep.status == "HEALTHY" else 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_models.save("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def cluster(model_dir):
    """Two Ray nodes on loopback, one CPU each, with the test app on them:
    two replicas of one CPU, so Ray must place one on each node."""
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=1, node_ip_address=LOOPBACK, object_store_memory=80 * 1024 * 1024)
    c = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    c.add_node(**node)
    c.wait_for_nodes(timeout=120)
    ray.init(address=c.gcs_address, _node_ip_address=LOOPBACK, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": LOOPBACK, "port": port}, proxy_location="HeadOnly")
    serve.run(fray.app(str(model_dir), num_replicas=2, num_cpus=1, routing_stats_period_s=0.5),
              name=APP, route_prefix="/")
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def reference(model_dir):
    engine = fastserve.Engine(str(model_dir))
    yield engine
    engine.close()


async def _embed(client: httpx.AsyncClient, base: str, texts: list[str]) -> httpx.Response:
    return await client.post(f"{base}/v1/embeddings", json={"input": texts}, timeout=60)


def _vectors(response: httpx.Response) -> np.ndarray:
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def test_results_equal_the_in_process_engine(cluster, reference):
    texts = tiny_models.mixed_texts(24, seed=3)

    async def go():
        async with httpx.AsyncClient() as client:
            whole = await _embed(client, cluster, texts)
            singles = await asyncio.gather(*(_embed(client, cluster, [t]) for t in texts))
        return whole, singles

    whole, singles = asyncio.run(asyncio.wait_for(go(), 120))
    expected = reference.embed(texts)
    assert whole.status_code == 200, whole.text
    np.testing.assert_allclose(_vectors(whole), expected, atol=1e-5)
    for r, e in zip(singles, expected):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(_vectors(r)[0], e, atol=1e-5)
    # The rest of the API is the same app's.
    models = httpx.get(f"{cluster}/v1/models", timeout=30).json()
    assert models["data"][0]["dimensions"] == reference.dim
    bad = httpx.post(f"{cluster}/v1/embeddings", json={"input": [1.5]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_requests_spread_over_replicas_on_both_nodes(cluster):
    before = {name: s["completed"] for name, s in _replica_stats().items()}
    texts = tiny_models.mixed_texts(200, seed=4)

    async def go():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(_embed(client, cluster, [t]) for t in texts))

    replies = asyncio.run(asyncio.wait_for(go(), 180))
    assert all(r.status_code == 200 for r in replies)
    after = _replica_stats()
    assert len(after) == 2
    served = {name: s["completed"] - before.get(name, 0) for name, s in after.items()}
    assert sum(served.values()) == len(texts)
    assert all(n > 0 for n in served.values()), served
    assert len({s["node_id"] for s in after.values()}) == 2, "both replicas on one node"
    # The stats the router reads are there and numeric.
    for s in after.values():
        assert s["queued_tokens"] >= 0 and s["tokens_per_request"] > 0


def test_killed_replica_loses_no_accepted_request_and_is_replaced(cluster, reference):
    """Clients keep sending while one replica's actor is killed. Every request
    ends within its timeout: 200 with the right vector, or Serve's 500/503 for
    the requests the dead replica held (safe to retry: embedding is
    idempotent), and the retry succeeds. Serve starts a new replica."""
    texts = tiny_models.mixed_texts(16, seed=5)
    expected = reference.embed(texts)
    original = _replica_actors()
    victim_name, victim = sorted(original.items())[0]
    results: list[tuple[int, int]] = []  # (text index, status)
    failed: list[int] = []
    stop = asyncio.Event()

    async def client_loop(client, k):
        i = k
        while not stop.is_set():
            j = i % len(texts)
            r = await asyncio.wait_for(_embed(client, cluster, [texts[j]]), 90)
            results.append((j, r.status_code))
            if r.status_code == 200:
                np.testing.assert_allclose(_vectors(r)[0], expected[j], atol=1e-5)
            else:
                assert r.status_code in (500, 503), (r.status_code, r.text)
                failed.append(j)
            i += 1

    async def go():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client:
            clients = [asyncio.create_task(client_loop(client, k)) for k in range(16)]
            while len(results) < 50:
                await asyncio.sleep(0.01)
            ray.kill(victim, no_restart=True)
            killed_at = len(results)
            deadline = time.monotonic() + 120
            # Load goes on until Serve runs a new replica in the victim's place.
            while not (set(_replica_stats()) - set(original) and _running_replicas() == 2):
                assert time.monotonic() < deadline, "Serve did not replace the killed replica"
                await asyncio.sleep(0.2)
            served_before_stop = len(results)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*clients)
            retried = await asyncio.gather(*(_embed(client, cluster, [texts[j]]) for j in failed))
            return killed_at, served_before_stop, retried

    killed_at, served_before_stop, retried = asyncio.run(asyncio.wait_for(go(), 300))
    print(f"kill test: {len(results)} requests, killed after {killed_at}, "
          f"{served_before_stop} answered when the replacement ran, {len(failed)} failed and were retried")
    assert served_before_stop > killed_at  # requests kept being served meanwhile
    for j, r in zip(failed, retried):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(_vectors(r)[0], expected[j], atol=1e-5)
    replicas = _replica_stats()
    assert len(replicas) == 2 and victim_name not in replicas
    assert len(set(replicas) - set(original)) == 1


def test_shutdown_is_clean(cluster):
    serve.delete(APP)
    assert not _replica_actors()
    with pytest.raises(httpx.HTTPError):
        r = httpx.get(f"{cluster}/v1/models", timeout=10)
        r.raise_for_status()
    serve.shutdown()
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith("SERVE_")], names


def _cli(model: str, port: int, stderr: Path, *extra: str) -> subprocess.Popen:
    """`fastserve serve MODEL --ray` on the test cluster, on loopback at port;
    its stderr goes to a file (Ray's forwarded logs could fill a pipe)."""
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               # the fastserve this test imported (a source tree with its built extension, or the installed one)
               PYTHONPATH=os.pathsep.join([str(Path(fastserve.__file__).resolve().parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "fastserve.cli", "serve", model, "--ray", "--host", LOOPBACK, "--port", str(port),
           *extra]
    with open(stderr, "w") as err:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _wait_ready(proc: subprocess.Popen, base: str, stderr: Path, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        assert proc.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, "the CLI's app never became ready"
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def _last_line(stderr: Path) -> str:
    lines = [line for line in stderr.read_text().splitlines() if line.strip()]
    assert not [line for line in lines if line.startswith("Traceback")], stderr.read_text()
    return lines[-1]


def _apps() -> dict[str, object]:
    """The cluster's Serve applications, by name (a fresh look-up of the
    controller: a CLI may have stopped the one this process knew)."""
    serve.context._disconnect()
    return dict(serve.status().applications)


def _stop_serve() -> None:
    """Stop Serve on the cluster if it runs (the cluster fixture's, when the
    tests that end it were not selected)."""
    serve.context._disconnect()  # a controller this process knew may be gone (a CLI stopped it)
    if fray._serve_http() is not None:
        serve.shutdown()


def test_cli_serves_with_ray_and_stops_on_sigint(cluster, model_dir, reference, tmp_path):
    """`fastserve serve --ray --replicas 2` on the same cluster, without Serve
    running (the test app is gone): it serves, and on SIGINT deletes its app,
    stops the Serve instance it started, and exits 0. Its --max-priority
    reaches the replicas' apps: a request may ask for priority 1, not 2."""
    _stop_serve()
    port = _free_port()
    stderr = tmp_path / "stderr"
    proc = _cli(str(model_dir), port, stderr, "--replicas", "2", "--max-priority", "1")
    try:
        base = f"http://{LOOPBACK}:{port}"
        _wait_ready(proc, base, stderr)
        texts = tiny_models.mixed_texts(8, seed=6)
        r = httpx.post(f"{base}/v1/embeddings", json={"input": texts}, timeout=60,
                       headers={"X-Fastserve-Priority": "1", "X-Fastserve-Timeout": "30"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(_vectors(r), reference.embed(texts), atol=1e-5)
        r = httpx.post(f"{base}/v1/embeddings", json={"input": texts}, timeout=60, headers={"X-Fastserve-Priority": "2"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "priority_not_allowed", r.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, stderr.read_text()
    finally:
        _stop(proc)
    deadline = time.monotonic() + 60
    while serve_actors := [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                           if a["name"].startswith("SERVE_")]:  # replicas, controller, proxies
        assert time.monotonic() < deadline, serve_actors
        time.sleep(0.2)


@pytest.fixture(scope="module")
def serve_port(cluster):
    """Serve running on the cluster without applications, HTTP on loopback at
    this port (started here, not by a CLI)."""
    _stop_serve()
    port = _free_port()
    # One try at a replica's constructor, not Serve's three, before a deploy
    # fails: each try starts a worker that imports torch (about 12 s here).
    retries = {"runtime_env": {"env_vars": {"RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"}}}
    serve.start(http_options={"host": LOOPBACK, "port": port}, proxy_location="HeadOnly", controller_options=retries)
    try:
        yield port
    finally:
        serve.context._disconnect()
        serve.shutdown()


def test_cli_deletes_its_app_on_sigterm_and_a_second_cli_is_refused(model_dir, serve_port, tmp_path):
    """A second `fastserve serve --ray` on a cluster where one runs is refused
    (exit 2, one line) and changes nothing there; SIGTERM stops the first,
    which deletes its app (leaving Serve, which it did not start) and exits 0."""
    base = f"http://{LOOPBACK}:{serve_port}"
    first_err, second_err = tmp_path / "first", tmp_path / "second"
    first = _cli(str(model_dir), serve_port, first_err)
    second = None
    try:
        _wait_ready(first, base, first_err)
        deployed = _apps()[fray.DEPLOYMENT_NAME]
        assert deployed.status == "RUNNING"
        second = _cli(str(model_dir / "elsewhere"), serve_port, second_err)
        assert second.wait(timeout=120) == 2, second_err.read_text()
        assert "already has a Serve application named 'fastserve'" in _last_line(second_err)
        after = _apps()
        assert list(after) == [fray.DEPLOYMENT_NAME] and after[fray.DEPLOYMENT_NAME].status == "RUNNING"
        assert after[fray.DEPLOYMENT_NAME].last_deployed_time_s == deployed.last_deployed_time_s
        models = httpx.get(f"{base}/v1/models", timeout=30)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == str(model_dir)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0, first_err.read_text()
    finally:
        _stop(first)
        if second is not None:
            _stop(second)
    assert _apps() == {}
    assert fray._serve_http() == (LOOPBACK, serve_port)  # Serve stays: the CLI did not start it


def test_cli_refuses_serve_on_another_http_port(model_dir, serve_port, tmp_path):
    """Serve has one HTTP address per cluster: a CLI asking for another port
    is refused (it would be ignored) and deploys nothing."""
    stderr = tmp_path / "stderr"
    proc = _cli(str(model_dir), _free_port(), stderr)
    try:
        assert proc.wait(timeout=120) == 2, stderr.read_text()
    finally:
        _stop(proc)
    assert f"Ray Serve already runs on this cluster with HTTP on {LOOPBACK}:{serve_port}" in _last_line(stderr)
    assert _apps() == {}
    assert fray._serve_http() == (LOOPBACK, serve_port)


def test_cli_stops_on_sigint_while_still_deploying(model_dir, serve_port, tmp_path):
    """A replica Ray cannot place (8 CPUs on a two-CPU cluster) keeps the app
    deploying; SIGINT still stops the CLI, which deletes the app."""
    stderr = tmp_path / "stderr"
    # --graceful-timeout: the deployment's graceful shutdown (the CLI's default is 30 s).
    proc = _cli(str(model_dir), serve_port, stderr, "--num-cpus", "8", "--graceful-timeout", "5")
    try:
        deadline = time.monotonic() + 120
        while (app := _apps().get(fray.DEPLOYMENT_NAME)) is None:
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "the CLI never deployed its app"
            time.sleep(0.2)
        assert app.status == "DEPLOYING"
        proc.send_signal(signal.SIGINT)
        # Serve waits out the replica's graceful shutdown (5 s) before it is gone.
        assert proc.wait(timeout=120) == 0, stderr.read_text()
    finally:
        _stop(proc)
    assert "fastserve: serving" not in stderr.read_text()
    assert _apps() == {}


def test_cli_failed_deploy_names_the_cause_and_deletes_the_app(serve_port, tmp_path):
    """A model the replicas cannot load: Serve gives up on the deployment, and
    the CLI exits 2 with the replica's error on one line, its app deleted."""
    stderr = tmp_path / "stderr"
    proc = _cli("/nonexistent/model", serve_port, stderr)
    try:
        assert proc.wait(timeout=240) == 2, stderr.read_text()
    finally:
        _stop(proc)
    last = _last_line(stderr)
    assert last.startswith("fastserve serve: deploying on Ray Serve failed: "), last
    assert "could not load model from '/nonexistent/model'" in last
    assert _apps() == {}


class _FakeReplica:
    def __init__(self, rid: str, **stats) -> None:
        self.replica_id = rid
        self.routing_stats = stats


def _router():
    router = fray.QueuedWorkRouter.__new__(fray.QueuedWorkRouter)
    router.initialize_state()
    return router


def test_router_ranks_by_queued_tokens_not_request_counts():
    router = _router()
    light = _FakeReplica("light", queued_tokens=100.0, tokens_per_request=10.0)
    heavy = _FakeReplica("heavy", queued_tokens=5000.0, tokens_per_request=10.0)
    for _ in range(10):  # whichever pair order random.sample picks
        ranks = asyncio.run(router.choose_replicas([heavy, light]))
        assert ranks == [[light], [heavy]]
    # Equal work (or no stats yet): one rank, Serve's live probe decides.
    a, b = _FakeReplica("a"), _FakeReplica("b")
    assert sorted(r.replica_id for r in asyncio.run(router.choose_replicas([a, b]))[0]) == ["a", "b"]
    assert asyncio.run(router.choose_replicas([a])) == [[a]]


def test_router_leaves_out_a_replica_whose_engine_is_down():
    """A replica whose engine died answers 503 at once with an empty queue:
    by its work the least loaded. It drew 60% of the requests (2 replicas)
    for the 25 s Serve took to replace it; now it gets none while a healthy
    replica is there, and still gets them when none is."""
    router = _router()
    dead = _FakeReplica("dead", healthy=False, queued_tokens=0.0, tokens_per_request=10.0)
    busy = _FakeReplica("busy", healthy=True, queued_tokens=5000.0, tokens_per_request=10.0)
    fresh = _FakeReplica("fresh")  # no report yet: counted healthy
    for _ in range(10):
        assert asyncio.run(router.choose_replicas([dead, busy])) == [[busy]]
        ranks = asyncio.run(router.choose_replicas([dead, busy, fresh]))
        assert ranks == [[fresh], [busy]]
    other = _FakeReplica("other", healthy=False)
    assert sorted(r.replica_id for r in asyncio.run(router.choose_replicas([dead, other]))[0]) == ["dead", "other"]


def test_router_counts_what_it_sent_until_answered():
    from types import SimpleNamespace

    router = _router()
    a = _FakeReplica("a", queued_tokens=0.0, tokens_per_request=20.0)
    b = _FakeReplica("b", queued_tokens=30.0, tokens_per_request=20.0)
    assert router.estimated_work(a) == 0.0 and router.estimated_work(b) == 30.0
    for i in range(3):  # sent to a, not yet in its reported stats
        router.on_request_routed(SimpleNamespace(metadata=SimpleNamespace(internal_request_id=f"r{i}")), "a", None)
    assert router.estimated_work(a) == 60.0
    assert asyncio.run(router.choose_replicas([a, b])) == [[b], [a]]
    router.on_request_completed("a", "r0")
    router.on_request_completed("a", "r1")
    assert router.estimated_work(a) == 20.0
    assert asyncio.run(router.choose_replicas([a, b])) == [[a], [b]]


def test_routing_stats_weigh_an_http_request_by_all_its_inputs(model_dir, monkeypatch):
    """tokens_per_request is per HTTP request, the unit the router counts
    unanswered: a request of 32 texts weighs their tokens, not one text's
    (it was real tokens over engine requests, one per input: 32x too small)."""
    from types import SimpleNamespace

    # Outside a cluster: the replica's node id is not this test's subject.
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    replica = fray.Replica(str(model_dir), {"torch_threads": 1}, {})
    try:
        app = replica.__serve_build_asgi_app__()
        texts = [f"this is sentence number {i} of a batch request" for i in range(32)]

        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica") as c:
                return [await c.post("/v1/embeddings", json={"input": texts}) for _ in range(4)]

        async def probes():  # no work: probes, scrapes, refusals (they diluted the weight 5.5x)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica") as c:
                codes = [(await c.get(path)).status_code for path in ("/ready", "/metrics", "/health") * 12]
                codes.append((await c.post("/v1/embeddings", json={"input": []})).status_code)
                codes.append((await c.post("/v1/embeddings", content=b"{")).status_code)
                return codes

        replies = asyncio.run(asyncio.wait_for(go(), 120))
        assert all(r.status_code == 200 for r in replies), replies[0].text
        assert sorted(set(asyncio.run(asyncio.wait_for(probes(), 60)))) == [200, 400]
        tokens = replies[0].json()["usage"]["prompt_tokens"]
        assert tokens > len(texts)
        stats = replica.record_routing_stats()
        assert stats["tokens_per_request"] == tokens and stats["healthy"] is True
        router = _router()
        for i in range(3):  # three such requests sent, unanswered
            router.on_request_routed(SimpleNamespace(metadata=SimpleNamespace(internal_request_id=f"r{i}")), "a",
                                     None)
        assert router.estimated_work(_FakeReplica("a", **stats)) == 3 * tokens
    finally:
        replica.__del__()


def test_app_options():
    with pytest.raises(ValueError, match="router"):
        fray.app("m", router="round_robin")
    with pytest.raises(ValueError, match="min_replicas"):
        fray.app("m", min_replicas=1)
    with pytest.raises(ValueError, match="not both"):  # num_replicas was dropped without a word
        fray.app("m", num_replicas=3, min_replicas=1, max_replicas=4)
    # An Engine option misspelt or bad fails here, not in each replica after the
    # model loads (serve.run said only "Failed to update the deployments").
    with pytest.raises(TypeError, match="max_batch_tokn"):
        fray.app("m", max_batch_tokn=512)
    with pytest.raises(ValueError, match="task must be one of"):
        fray.app("m", task="embedd")
    built = fray.app("m", num_replicas=3, num_cpus=2, max_ongoing_requests=64, api_key="k",
                     target_latency_ms=20.0)
    d = built._bound_deployment
    assert d.num_replicas == 3 and d.max_ongoing_requests == 64
    assert d.ray_actor_options["num_cpus"] == 2
    assert d._deployment_config.request_router_config.request_router_class == fray.ROUTER_PATH
    model, engine_options, server_options, body_timeout_s, drain_timeout_s = d.init_args
    assert body_timeout_s == fray.BODY_TIMEOUT_S
    # Serve's default graceful shutdown, which also bounds the engine's drain.
    assert drain_timeout_s == d._deployment_config.graceful_shutdown_timeout_s == fray.GRACEFUL_SHUTDOWN_TIMEOUT_S
    assert model == "m" and server_options == {"api_key": "k"}
    assert engine_options == {"target_latency_ms": 20.0, "torch_threads": 2}
    # Each of the engine's CPU workers takes torch_threads: num_cpus shared among them.
    assert fray.app("m", num_cpus=4, replicas=2)._bound_deployment.init_args[1]["torch_threads"] == 2
    assert fray.app("m", num_cpus=2, replicas=4)._bound_deployment.init_args[1]["torch_threads"] == 1
    assert fray.app("m", num_cpus=4, devices=["cpu", "cpu"], parallel="pipeline"
                    )._bound_deployment.init_args[1]["torch_threads"] == 2
    for key in ("num_replicas", "max_ongoing_requests", "min_replicas", "body_timeout_s", "num_cpus",
                "graceful_shutdown_timeout_s"):
        bad = {key: "2", **({"max_replicas": 4} if key == "min_replicas" else {})}
        with pytest.raises(ValueError, match=f"{key} must be"):
            fray.app("m", **bad)
    with pytest.raises(ValueError, match="graceful_shutdown_timeout_s must be seconds >= 0"):
        fray.app("m", graceful_shutdown_timeout_s=-1)
    assert fray.app("m", graceful_shutdown_timeout_s=0)._bound_deployment.init_args[4] == 0
    with pytest.raises(ValueError, match="replicas must be at most 4096"):  # Engine.check_options
        fray.app("m", replicas=5000)
    # and the server's, which failed each replica after it loaded the model
    for bad, match in (({"max_inputs": -5}, "max_inputs must be a positive int"),
                       ({"request_timeout": 0}, "request_timeout must be positive seconds"),
                       ({"client_timeout_s": "5"}, "client_timeout_s must be positive seconds"),
                       ({"api_key": 123}, "api_key must be a str"),
                       ({"cors_allow_origins": "*"}, "cors_allow_origins must be a list")):
        with pytest.raises(ValueError, match=match):
            fray.app("m", **bad)
    scaled = fray.app("m", min_replicas=1, max_replicas=4, num_gpus=1)._bound_deployment
    assert scaled._deployment_config.autoscaling_config.max_replicas == 4
    assert scaled.ray_actor_options["num_gpus"] == 1
    assert "torch_threads" not in scaled.init_args[1]  # a GPU replica leaves torch's threads alone


def test_cli_ray_takes_graceful_timeout_and_refuses_the_local_servers_log_options(monkeypatch, capsys):
    """`serve --ray`: --graceful-timeout becomes the deployment's graceful
    shutdown (Serve's bound on a stopping replica) and the engine's drain
    bound (they were dropped: Serve's 20 s, a hard-coded 30 s drain);
    --log-level and --access-log (uvicorn's) are refused, exit 2, as
    --max-header-bytes is. No cluster is touched: ray.init stops the command."""
    from fastserve import cli

    class NoCluster(Exception):
        pass

    def no_cluster(*args, **kwargs):
        raise NoCluster

    built = []
    real_app = fray.app
    monkeypatch.setattr(fray.ray, "init", no_cluster)
    monkeypatch.setattr(fray, "app", lambda *a, **k: built.append(real_app(*a, **k)) or built[-1])
    with pytest.raises(NoCluster):
        cli.main(["serve", "m", "--ray", "--graceful-timeout", "2.5"])
    d = built[-1]._bound_deployment
    assert d._deployment_config.graceful_shutdown_timeout_s == 2.5
    assert d.init_args[4] == 2.5  # the replica's drain bound on its engine's close
    with pytest.raises(NoCluster):  # the default: the local server's 30 s
        cli.main(["serve", "m", "--ray"])
    assert built[-1]._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 30.0
    for extra in (["--log-level", "debug"], ["--access-log"]):
        assert cli.main(["serve", "m", "--ray", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fastserve serve: {extra[0]}"), err
    assert len(built) == 2


def test_replica_drains_its_engine_within_the_graceful_timeout(model_dir, monkeypatch):
    """Replica.__del__ (Serve calls it inside the graceful shutdown) closes
    the engine with drain=True, bounded by the deployment's graceful timeout."""
    replica = fray.Replica(str(model_dir), {"torch_threads": 1}, {}, fray.BODY_TIMEOUT_S, 2.5)
    closes = []
    real_close = replica.engine.close
    monkeypatch.setattr(replica.engine, "close", lambda **k: closes.append(k) or real_close(**k))
    replica.__del__()
    assert closes == [{"drain": True, "timeout": 2.5}]


def test_health_check_fails_when_the_engine_worker_is_dead(model_dir):
    """Serve's health check (Replica.check_health) fails once the engine's
    worker is gone, so Serve replaces the replica; it passes before."""
    replica = fray.Replica(str(model_dir), {"torch_threads": 1}, {})
    try:
        replica.check_health()
        replica.engine.close()
        with pytest.raises(RuntimeError, match="unhealthy"):
            replica.check_health()
    finally:
        replica.__del__()  # what Serve calls on shutdown: closes (again, idempotent)


def _asgi(app, messages: list[dict], *, then_wait: bool = True):
    """Run an ASGI app on one http request whose receive yields `messages`,
    then waits forever (a body that never comes) or reports a disconnect."""
    sent: list[dict] = []
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        if then_wait:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": []}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    return sent


def test_body_guard_answers_a_lost_body_with_a_retryable_503():
    import json

    async def app(scope, receive, send):  # never reached: the body never comes
        raise AssertionError("the app ran without its body")

    guard = fray.BodyGuard(app, 0.05)
    sent = _asgi(guard, [])
    assert sent[0]["status"] == 503 and guard.served == 0  # no work: not the router's unit
    assert (b"retry-after", b"0") in sent[0]["headers"]
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "request_body_lost" and error["type"] == "server_error"


def test_body_guard_hands_the_app_its_body_and_later_messages():
    seen: list[dict] = []

    async def app(scope, receive, send):
        while (m := await receive())["type"] == "http.request" and m.get("more_body"):
            seen.append(m)
        seen.append(m)
        seen.append(await receive())  # the client's disconnect, from the connection itself
        await send({"type": "http.response.start", "status": 200, "headers": []})

    parts = [{"type": "http.request", "body": b"ab", "more_body": True},
             {"type": "http.request", "body": b"cd", "more_body": False}]
    sent = _asgi(fray.BodyGuard(app, 5.0), parts, then_wait=False)
    assert seen == [*parts, {"type": "http.disconnect"}] and sent[0]["status"] == 200
    # A body of many parts reaches the app whole (its size is the app's to bound: its 413).
    seen.clear()
    big = [{"type": "http.request", "body": b"x" * 600, "more_body": True},
           {"type": "http.request", "body": b"x" * 600, "more_body": True},
           {"type": "http.request", "body": b"", "more_body": False}]
    _asgi(fray.BodyGuard(app, 5.0), big, then_wait=False)
    assert seen == [*big, {"type": "http.disconnect"}]


def test_body_guard_leaves_a_slow_body_to_the_app_once_it_has_begun():
    """body_timeout_s bounds only the wait for the body's first message (a
    body lost with a dead replica never begins); a live client's later parts
    are the app's (its client_timeout_s), however late. Here the second part
    comes only once the app has started: a guard that waited for it itself
    would wait past its timeout and answer 503."""
    app_started = asyncio.Event()
    seen: list[dict] = []

    async def app(scope, receive, send):
        app_started.set()
        while (m := await receive())["type"] == "http.request":
            seen.append(m)
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    first = {"type": "http.request", "body": b"ab", "more_body": True}
    second = {"type": "http.request", "body": b"cd", "more_body": False}
    sent: list[dict] = []

    async def go():
        messages = [first]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await app_started.wait()  # the slow client's second part
            return second

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": []}
        await fray.BodyGuard(app, 0.05)(scope, receive, send)

    asyncio.run(asyncio.wait_for(go(), 30))
    assert sent[0]["status"] == 200, sent
    assert seen == [first, second]


def test_body_guard_503_is_counted_in_the_app_metrics(model_dir):
    """The guard's 503 is one of the replica's HTTP answers: /metrics counts
    it (route, method, status) like the app's own."""
    replica = fray.Replica(str(model_dir), {"torch_threads": 1}, {}, body_timeout_s=0.05)
    try:
        app = replica.__serve_build_asgi_app__()
        for _ in range(2):  # bodies that never come
            assert _asgi(app, [])[0]["status"] == 503

        async def scrape():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica") as c:
                return (await c.get("/metrics")).text

        text = asyncio.run(asyncio.wait_for(scrape(), 60))
        counted = [line for line in text.splitlines() if line.startswith("fastserve_http_requests_total{")
                   and 'status="503"' in line]
        assert counted == ['fastserve_http_requests_total{method="POST",route="/v1/embeddings",status="503"} 2.0'], \
            counted
    finally:
        replica.__del__()


def test_a_request_cancelled_under_serve_is_the_clients_499_not_a_503(model_dir):
    """Under Serve a client that leaves reaches the replica as the
    cancellation of its request's task (no http.disconnect): it was answered
    a 503 'shut down' nobody read and counted as a server error. Now it is
    recorded as the client's 499, nothing is sent, the task ends cancelled,
    and what it queued leaves the engine."""
    replica = fray.Replica(str(model_dir), {"torch_threads": 1}, {})
    try:
        app = replica.__serve_build_asgi_app__()
        sent: list[dict] = []
        body = json.dumps({"input": [f"text {i} " * 40 for i in range(400)]}).encode()

        async def go():
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict:
                if messages:
                    return messages.pop()
                await asyncio.Event().wait()  # Serve sends no disconnect

            async def send(message: dict) -> None:
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": [],
                     "query_string": b"", "root_path": ""}
            task = asyncio.ensure_future(app(scope, receive, send))
            while replica.engine.stats()["submitted"] == 0:  # queued in the engine: then the client leaves
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica") as c:
                return (await c.get("/metrics")).text

        text = asyncio.run(asyncio.wait_for(go(), 60))
        assert sent == []
        counted = [line for line in text.splitlines() if line.startswith("fastserve_http_requests_total{")
                   and "/v1/embeddings" in line]
        assert counted == ['fastserve_http_requests_total{method="POST",route="/v1/embeddings",status="499"} 1.0'], \
            counted
        replica.engine.close(drain=True, timeout=60)
        stats = replica.engine.stats()
        assert stats["cancelled"] > 0 and stats["completed"] + stats["cancelled"] == stats["submitted"], stats
        assert app.served == 0  # a request cancelled is no unit of work the router weighs
    finally:
        replica.__del__()


def test_config_file_import_path_resolves():
    """examples/ray/serve_config.yaml is a valid Serve config whose import
    path builds the fastserve app, with the deployment name it configures."""
    import yaml
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (application,) = config.applications
    builder = import_attr(application.import_path)
    assert builder is fray.build
    built = builder(application.args)
    assert built._bound_deployment.name == fray.DEPLOYMENT_NAME
    assert [d.name for d in application.deployments] == [fray.DEPLOYMENT_NAME]
