"""fastserve on Ray Serve: one Engine per replica, across the nodes of a Ray
cluster, behind the same OpenAI-compatible HTTP app as `fastserve serve`.

    from ray import serve
    import fastserve.ray

    serve.run(fastserve.ray.app("path/to/model", num_replicas=2, num_cpus=1))

Each replica holds one `fastserve.Engine`, which does the batching (no
`@serve.batch`): Serve hands a replica every request it routes there at once
(up to `max_ongoing_requests`), and the engine's scheduler batches them under
its latency controller. The replica's HTTP app is `fastserve.server.create_app`
of that engine, served through Serve's ASGI ingress, so the routes, errors and
limits are those of `fastserve serve`.

Routing (`QueuedWorkRouter`): power of two choices on each replica's queued
work. Each replica reports its engine's health, queued tokens and mean tokens
per HTTP request served (`record_routing_stats`, every `routing_stats_period_s`);
the router leaves out a replica whose engine is down (it would answer 503 at
once, and so look the least loaded, until Serve's health check replaces it)
and adds what it has itself sent each replica and not yet seen answered, so
its view is live for its own traffic and at most one period old for the rest.
docs/design.md ("Ray Serve") gives the reasons.

Needs the `ray` extra (`pip install "fastserve[ray]"`). This module is named
`ray` inside the `fastserve` package; every import of Ray here is absolute,
so it never shadows the real `ray`.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import os
import random
import signal
import sys
import threading
import time
from typing import Any, Mapping, Optional

try:
    import ray  # noqa: F401  (absolute: the real Ray, never this module)
    from ray import serve
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig
    from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"fastserve.ray needs the 'ray' extra (missing module {e.name!r}): pip install \".[ray]\" in fastserve's "
        "source folder (from an index: pip install \"fastserve[ray]\")"
    ) from e

__all__ = ["app", "build", "serve_cli", "Replica", "QueuedWorkRouter", "DEPLOYMENT_NAME"]

DEPLOYMENT_NAME = "fastserve"
# Seconds a replica waits for the first part of a request's body (BodyGuard).
BODY_TIMEOUT_S = 10.0
# Serve's default bound on a stopping replica (its drain, then __del__),
# which also bounds the engine's drain in __del__.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0
# Seconds between Serve's health checks of a replica (Replica.check_health:
# a cheap read of the engine's state). Serve replaces a replica after 3
# failed checks in a row: with its default 10 s, a replica whose engine died
# answered 503 for 25 s (the router leaves it out within a routing period).
HEALTH_CHECK_PERIOD_S = 2.0
ROUTER_PATH = "fastserve.ray:QueuedWorkRouter"
# Keys of the server's create_app; every other option goes to the Engine.
SERVER_OPTIONS = ("api_key", "max_payload_bytes", "max_inputs", "request_timeout", "model_name", "client_timeout_s",
                  "cors_allow_origins", "max_priority")


class Replica:
    """One Serve replica: an Engine and the HTTP app serving it."""

    def __init__(self, model: Any, engine_options: Mapping[str, Any], server_options: Mapping[str, Any],
                 body_timeout_s: float = BODY_TIMEOUT_S,
                 drain_timeout_s: float = GRACEFUL_SHUTDOWN_TIMEOUT_S) -> None:
        from fastserve.engine import Engine

        self.engine = Engine(model, **dict(engine_options))
        self._server_options = dict(server_options)
        self._body_timeout_s = body_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._guard: Optional[BodyGuard] = None

    def __serve_build_asgi_app__(self):
        # Serve calls this once the constructor has run: the app needs the engine.
        from fastserve.server import create_app

        app = create_app(self.engine, **self._server_options)
        self._guard = BodyGuard(app, self._body_timeout_s, metrics=app.state.metrics)
        return self._guard

    def record_routing_stats(self) -> dict[str, Any]:
        """The replica's queued work, read by QueuedWorkRouter (and where it
        runs and what it served, for operators and tests)."""
        s = self.engine.stats()
        # HTTP requests, the unit the router counts unanswered (an engine
        # request is one input: a request of 2,048 inputs is 2,048 of them).
        served = self._guard.served if self._guard is not None else 0
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            # False once the engine is down: the router sends it nothing
            # while Serve's health check replaces it.
            "healthy": bool(self.engine.health()["healthy"]),
            "completed": s["completed"],
            "queued_tokens": float(s["queued_tokens"]),
            "queued_requests": float(s["queue_depth"]),
            # Mean real tokens the engine ran per HTTP request of work the
            # replica served: the router's cost of a request it sent and
            # has not seen answered (1 before any).
            "tokens_per_request": s["real_tokens"] / served if served else 1.0,
        }

    def check_health(self) -> None:
        """Serve's health check: a dead engine worker fails it, and Serve
        replaces the replica."""
        h = self.engine.health()
        if not h["healthy"]:
            raise RuntimeError(f"fastserve engine unhealthy: {h}")

    def __del__(self) -> None:
        # Serve calls this on shutdown, after its graceful wait for the
        # requests in flight; drain=True serves anything still queued, within
        # the deployment's graceful_shutdown_timeout_s (Serve kills the actor then).
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(drain=True, timeout=getattr(self, "_drain_timeout_s", GRACEFUL_SHUTDOWN_TIMEOUT_S))


class BodyGuard:
    """The replica's ASGI app behind a bound on the wait for a request's body
    to begin, and the count of the HTTP requests of work it served.

    When a replica dies holding a request, Serve's proxy may send the request
    again to another replica, but the body went to the dead one: the new
    replica would wait for it until the client gives up. The guard waits for
    the body's first message, and a body that has not begun within timeout_s
    is answered with a 503 in OpenAI's shape (code "request_body_lost": safe
    to retry) instead, counted in `metrics` (the app's) as the app counts its
    own answers. Once it has begun the body is the app's: a slow client's
    later parts are bounded by the app's client_timeout_s (408), its size by
    the app's max_payload_bytes (413). The app reads that first message, then
    the connection's later messages (the rest of the body, a client's
    disconnect) as before.

    `served` counts the POST requests answered 2xx: QueuedWorkRouter's unit
    of work (the tokens the engine ran over it). Probes, scrapes and
    refusals run nothing: counted, 36 GETs of /ready and /metrics beside 8
    requests of 352 tokens made a request weigh 64.

    Under Serve a client that leaves, or the proxy's request timeout, reaches
    the replica as the cancellation of its task (no http.disconnect): the
    guard marks the scope (CANCEL_IS_CLIENT) so that the app's edge records
    it as the client's 499, not as a 503 'shut down' answer nobody reads.
    (Serve does not cancel requests at shutdown: it waits for them.)"""

    def __init__(self, app: Any, timeout_s: float, metrics: Any = None) -> None:
        self.app, self.timeout_s, self.metrics = app, timeout_s, metrics
        self.served = 0
        # Serve's ingress reads these off the app (docs path, exception handlers).
        self.docs_url = getattr(app, "docs_url", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastserve.server.edge import CANCEL_IS_CLIENT, StatusRecorder

        t0 = time.perf_counter()
        try:
            first = await asyncio.wait_for(receive(), self.timeout_s)
        except asyncio.TimeoutError:
            return await self._lost(scope, receive, send, t0)
        pending = [first]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        answer = StatusRecorder(send)
        try:
            await self.app({**scope, CANCEL_IS_CLIENT: True}, replay, answer)
        finally:
            if scope.get("method") == "POST" and 200 <= (answer.status or 0) < 300:
                self.served += 1

    async def _lost(self, scope: dict, receive: Any, send: Any, t0: float) -> None:
        from fastserve.server.edge import count_answer
        from fastserve.server.errors import ApiError

        lost = ApiError(503, f"the request's body did not arrive within {self.timeout_s:g} s (a replica "
                             "that held it was lost); retry the request", type="server_error",
                        code="request_body_lost", headers={"Retry-After": "0"})
        try:
            await lost.response()(scope, receive, send)
        finally:
            if self.metrics is not None:  # as the app's edge counts its answers
                count_answer(self.metrics, scope, 503, t0)


class QueuedWorkRouter(FIFOMixin, RequestRouter):
    """Power of two choices on queued work (tokens), not on request counts.

    Two replicas are drawn at random; the one with less estimated queued work
    ranks first, and Serve sends the request there unless it is at
    max_ongoing_requests (then to the other). A replica's estimated work is the
    larger of two lower bounds on it: the queued tokens its engine last
    reported, and the (HTTP) requests this router sent it that are unanswered
    times its mean tokens per HTTP request. Equal estimates (an idle cluster, replicas
    without stats yet) leave both in one rank, where Serve takes the one with
    fewer ongoing requests from its live probe.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._outstanding: dict[ReplicaID, set[str]] = {}

    @staticmethod
    def healthy(replica: RunningReplica) -> bool:
        """False where the replica reported its engine down (True before any
        report)."""
        return bool((replica.routing_stats or {}).get("healthy", True))

    def estimated_work(self, replica: RunningReplica) -> float:
        stats = replica.routing_stats or {}
        reported = float(stats.get("queued_tokens", 0.0))
        per_request = float(stats.get("tokens_per_request", 1.0))
        mine = len(self._outstanding.get(replica.replica_id, ()))
        return max(reported, mine * per_request)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> list[list[RunningReplica]]:
        # A replica whose engine is down answers 503 at once, its queue
        # empty: the least loaded in appearance. It gets nothing while a
        # healthy one is there (with 2 replicas and one engine dead, it drew
        # 60% of the requests for the 25 s Serve took to replace it).
        candidates = [r for r in candidate_replicas if self.healthy(r)] or list(candidate_replicas)
        if len(candidates) <= 1:
            return [candidates]
        a, b = random.sample(candidates, 2)
        wa, wb = self.estimated_work(a), self.estimated_work(b)
        if math.isclose(wa, wb):
            return [[a, b]]
        return [[a], [b]] if wa < wb else [[b], [a]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._outstanding.setdefault(replica_id, set()).add(pending_request.metadata.internal_request_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        ids = self._outstanding.get(replica_id)
        if ids is not None:
            ids.discard(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._outstanding.pop(replica_id, None)


def app(
    model: Any = None,
    *,
    num_replicas: Optional[int] = None,
    min_replicas: Optional[int] = None,
    max_replicas: Optional[int] = None,
    target_ongoing_requests: float = 64.0,
    num_cpus: Optional[float] = 1.0,
    num_gpus: Optional[float] = None,
    max_ongoing_requests: int = 256,
    router: str = "queued_work",
    routing_stats_period_s: float = 1.0,
    body_timeout_s: float = BODY_TIMEOUT_S,
    graceful_shutdown_timeout_s: float = GRACEFUL_SHUTDOWN_TIMEOUT_S,
    health_check_period_s: float = HEALTH_CHECK_PERIOD_S,
    name: str = DEPLOYMENT_NAME,
    **options: Any,
):
    """A Serve application: `num_replicas` replicas, each one Engine serving
    `model` behind fastserve's HTTP app. Run it with `serve.run(app(...))`.

    num_replicas: a fixed replica count (default 1); or min_replicas/max_replicas for
    Serve's autoscaling between those bounds (aiming at
    target_ongoing_requests per replica).
    num_cpus, num_gpus: resources of each replica. On the CPU, a replica's
    engine's CPU workers (its replicas, on each listed device) share
    int(num_cpus) torch threads, at least one each, unless torch_threads is given.
    max_ongoing_requests: requests Serve sends a replica at once; the engine
    batches them, so this is far above Serve's default of 5.
    router: "queued_work" (QueuedWorkRouter) or "pow2" (Serve's default:
    power of two choices on ongoing request counts).
    body_timeout_s: a request whose body has not begun to reach its replica by
    then gets a 503 to retry (BodyGuard: a body lost with a dead replica).
    graceful_shutdown_timeout_s: Serve's bound on a stopping replica (it waits
    for the requests in flight, then the replica closes its engine with
    drain=True within the same bound); Serve's default, 20 s.
    health_check_period_s: seconds between Serve's health checks of a
    replica (its engine's health; Serve replaces it after 3 failures in a
    row): 2 s, where Serve's default 10 s left a dead engine 25 s in place.
    options: the server's create_app options (SERVER_OPTIONS: api_key,
    max_payload_bytes, max_inputs, request_timeout, model_name,
    client_timeout_s, cors_allow_origins, max_priority); every other one is an Engine
    keyword (task, device, target_latency_ms, max_batch_tokens, ...),
    checked here (Engine.check_options: TypeError for one Engine does not
    take, ValueError for a bad value) rather than in every replica.
    """
    if router not in ("queued_work", "pow2"):
        raise ValueError(f"router must be 'queued_work' or 'pow2', got {router!r}")
    for key, value, kind in (("num_replicas", num_replicas, "int"), ("min_replicas", min_replicas, "int"),
                             ("max_replicas", max_replicas, "int"),
                             ("max_ongoing_requests", max_ongoing_requests, "int"),
                             ("num_cpus", num_cpus, "number"), ("num_gpus", num_gpus, "number"),
                             ("body_timeout_s", body_timeout_s, "number"),
                             ("graceful_shutdown_timeout_s", graceful_shutdown_timeout_s, "number"),
                             ("health_check_period_s", health_check_period_s, "number"),
                             ("target_ongoing_requests", target_ongoing_requests, "number"),
                             ("routing_stats_period_s", routing_stats_period_s, "number")):
        number = isinstance(value, (numbers.Integral if kind == "int" else numbers.Real)) and \
            not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value)):
            raise ValueError(f"{key} must be {'an int' if kind == 'int' else 'a number'}, got {value!r}")
    if (min_replicas is None) != (max_replicas is None):
        raise ValueError("give both min_replicas and max_replicas (autoscaling), or neither")
    if num_replicas is not None and min_replicas is not None:  # was ignored
        raise ValueError("give num_replicas (a fixed count) or min_replicas/max_replicas (autoscaling), not both")
    num_replicas = 1 if num_replicas is None else num_replicas
    if num_replicas < 1 or max_ongoing_requests < 1:
        raise ValueError("num_replicas and max_ongoing_requests must be at least 1")
    server_options = {k: options.pop(k) for k in SERVER_OPTIONS if k in options}
    engine_options = dict(options)
    from fastserve.server.app import check_app_options

    # The server's options too: a bad one failed each replica after it loaded the model.
    check_app_options(**server_options)
    # A misspelt or bad option fails here, not in every replica after it loads the model.
    from fastserve.engine import Engine

    Engine.check_options(**engine_options)
    if num_cpus and engine_options.get("torch_threads") is None and not num_gpus:
        # Each of the engine's CPU workers (its replicas, on each listed
        # device) sets torch_threads: a share of the replica's CPUs each.
        devices = engine_options.get("devices")
        listed = len(devices) if isinstance(devices, (list, tuple)) else 1  # (checked above)
        workers = (engine_options.get("replicas") or 1) * listed
        engine_options["torch_threads"] = max(1, int(num_cpus) // workers)
    actor_options: dict[str, Any] = {}
    if num_cpus is not None:
        actor_options["num_cpus"] = num_cpus
    if num_gpus:
        actor_options["num_gpus"] = num_gpus
    deployment_options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": max_ongoing_requests,
        "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
        "health_check_period_s": health_check_period_s,
    }
    if min_replicas is not None:
        deployment_options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=min_replicas, max_replicas=max_replicas, target_ongoing_requests=target_ongoing_requests
        )
    else:
        deployment_options["num_replicas"] = num_replicas
    if router == "queued_work":
        deployment_options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_PATH, request_routing_stats_period_s=routing_stats_period_s
        )
    if not body_timeout_s > 0:
        raise ValueError("body_timeout_s must be positive seconds")
    if graceful_shutdown_timeout_s is None or not graceful_shutdown_timeout_s >= 0:
        raise ValueError("graceful_shutdown_timeout_s must be seconds >= 0")
    if not health_check_period_s > 0:
        raise ValueError("health_check_period_s must be positive seconds")
    return Deployment.options(**deployment_options).bind(model, engine_options, server_options, body_timeout_s,
                                                         graceful_shutdown_timeout_s)


def build(args: Mapping[str, Any]):
    """The application builder for a Serve config file
    (`import_path: fastserve.ray:build`): `args` are app()'s keywords, with
    the model under "model"."""
    kwargs = dict(args)
    return app(kwargs.pop("model", None), **kwargs)


def _serve_http() -> Optional[tuple[str, int]]:
    """(host, port) of the HTTP proxies of the Serve instance running on the
    connected cluster, or None when Serve does not run there. Ray 2.60 has no
    public call for it: this reads the controller client's HTTP config (what
    `serve.start` itself compares new options with)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    return client.http_config.host, client.http_config.port


def _failure(status: Any) -> str:
    """One line naming why an application failed to deploy: the last line of
    its failed deployment's message (the exception a replica's constructor
    raised), else the application's message."""
    for dep in status.deployments.values():
        lines = [line.strip() for line in (dep.message or "").splitlines() if line.strip()]
        if lines and dep.status in ("DEPLOY_FAILED", "UNHEALTHY"):  # str enums
            return lines[-1]
    lines = [line.strip() for line in (status.message or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


def serve_cli(args: Any, engine_kwargs: dict[str, Any], app_options: dict[str, Any]) -> int:
    """`fastserve serve --ray`: app() of the engine's keywords (the model
    under "model") and create_app's app_options, deployed as the Serve
    application DEPLOYMENT_NAME on the Ray cluster ($RAY_ADDRESS, the one
    `ray start` began on this machine, or else a new local one) until
    SIGINT/SIGTERM; then delete the app (Serve lets its requests finish, and
    each replica drain its engine, within --graceful-timeout: the deployment's
    graceful_shutdown_timeout_s), stop Serve if this command started it and
    no other application is left, and disconnect (stopping Ray if this
    command started it).

    Refuses (exit 2, the cluster unchanged) when the cluster already has an
    application of that name (another `fastserve serve --ray`, say), or runs
    Serve with HTTP on another host or port than --host/--port. A deploy that
    fails (a replica's constructor raised) ends with exit 2, its cause on one
    line, and the app deleted. The deploy does not block: a signal stops the
    command while replicas are still being placed or loaded."""
    engine_kwargs = dict(engine_kwargs)
    model = engine_kwargs.pop("model")
    try:
        built = app(
            model,
            num_replicas=args.replicas,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus or None,
            graceful_shutdown_timeout_s=args.graceful_timeout,
            **app_options,
            **engine_kwargs,
        )
    except ValueError as e:
        print(f"fastserve serve: {e}", file=sys.stderr)
        return 2
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")
    # After ray.init, which installs its own SIGTERM handler (a sys.exit that
    # would skip the cleanup below).
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    name = DEPLOYMENT_NAME
    error: Optional[str] = None
    rc = 0
    deployed = started_serve = False
    try:
        running = _serve_http()
        if running is not None and running != (args.host, args.port):
            host, port = running
            error = (f"Ray Serve already runs on this cluster with HTTP on {host}:{port}, not "
                     f"{args.host}:{args.port} (Serve has one HTTP address per cluster): use --host {host} "
                     f"--port {port}, or stop that Serve instance (`serve.shutdown()`)")
            return 2
        if name in serve.status().applications:
            error = (f"the Ray cluster already has a Serve application named {name!r} (another "
                     f"`fastserve serve --ray`?): stop it, or delete it (`serve.delete({name!r})`)")
            return 2
        if running is None:
            started_serve = True
            try:
                serve.start(http_options={"host": args.host, "port": args.port})
            except Exception as e:  # a port in use, proxies that do not start
                error = f"could not start Ray Serve on {args.host}:{args.port}: {_first_line(e)}"
                return 2
        deployed = True
        try:
            serve.run_many([serve.RunTarget(target=built, name=name, route_prefix="/")],
                           wait_for_applications_running=False)
        except Exception as e:  # e.g. route prefix "/" taken by another application
            error = f"deploying on Ray Serve failed: {_first_line(e)}"
            return 2
        announced = False
        while not stop.wait(0.5):
            status = serve.status().applications.get(name)
            if status is None or status.status == "DELETING":
                deployed = False
                error = f"the Serve application {name!r} was deleted from the Ray cluster"
                rc = 1
                break
            if status.status == "DEPLOY_FAILED":
                error = f"deploying on Ray Serve failed: {_failure(status)}"
                rc = 2
                break
            if status.status == "RUNNING" and not announced:
                announced = True
                print(f"fastserve: serving {model or 'the default model'} with Ray Serve ({args.replicas} "
                      f"replicas) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        return rc
    finally:
        try:
            if deployed:
                serve.delete(name)
            if started_serve and not serve.status().applications:
                serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if error is not None:
                print(f"fastserve serve: {error}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


Deployment = serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress()(Replica))
