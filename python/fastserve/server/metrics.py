"""Prometheus metrics: the HTTP metrics (a registry per app) and a collector
that reads the engine's own counters and histograms at each scrape."""

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..engine import Engine

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   30.0)


class EngineCollector:
    """The engine's own counters and summaries, read from engine.stats() at
    each scrape (the C++ core already keeps them; nothing is double-counted)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list:
        return []  # collected lazily: the stats dict decides what exists

    def collect(self):
        s = self.engine.stats()
        outcomes = CounterMetricFamily("fastserve_engine_requests", "Engine requests by outcome", labels=["outcome"])
        # admitted (= submitted), refused at admission (predicted late), shed
        # before compute (predicted late), expired (deadline passed), rejected (queue full).
        for key in ("submitted", "admitted", "refused", "shed", "completed", "failed", "expired", "cancelled",
                    "rejected", "closed_unserved"):
            if key in s:
                outcomes.add_metric([key], float(s[key]))
        yield outcomes
        yield CounterMetricFamily("fastserve_engine_batches", "Batches run", value=float(s.get("batches", 0)))
        yield CounterMetricFamily("fastserve_engine_failed_batches", "Batches whose model call raised",
                                  value=float(s.get("failed_batches", 0)))
        yield CounterMetricFamily("fastserve_engine_balanced_batches", "Batches that took only their replica's "
                                  "share of a short queue, so the replicas end it together", value=float(s.get("balanced", 0)))
        yield CounterMetricFamily("fastserve_engine_pauses", "Running batches paused between layers for urgent "
                                  "requests (Engine(preempt=...))", value=float(s.get("preempted", 0)))
        tokens = CounterMetricFamily("fastserve_engine_tokens", "Tokens run, real and with padding", labels=["kind"])
        tokens.add_metric(["real"], float(s.get("real_tokens", 0)))
        tokens.add_metric(["padded"], float(s.get("padded_tokens", 0)))
        yield tokens
        yield GaugeMetricFamily("fastserve_engine_queue_depth", "Requests waiting in the queue",
                                value=float(s.get("queue_depth", 0)))
        yield GaugeMetricFamily("fastserve_engine_queued_tokens", "Tokens waiting in the queue",
                                value=float(s.get("queued_tokens", 0)))
        yield GaugeMetricFamily("fastserve_engine_padding_ratio", "Share of computed tokens that were padding",
                                value=float(s.get("padding_ratio", 0.0)))
        ctl = s.get("controller", {})
        yield GaugeMetricFamily("fastserve_engine_controller_budget_tokens",
                                "The adaptive controller's current token budget per batch",
                                value=float(ctl.get("budget_tokens", 0)))
        for key, name, doc in (
            ("latency_s", "fastserve_engine_latency_seconds", "Engine latency per request, submit to result"),
            ("queue_s", "fastserve_engine_queue_seconds", "Time a request waited in the queue"),
            ("batch_compute_s", "fastserve_engine_batch_compute_seconds", "Model time per batch"),
            ("batch_size", "fastserve_engine_batch_size", "Requests per batch"),
            ("batch_tokens", "fastserve_engine_batch_tokens", "Real tokens per batch (padding not included)"),
        ):
            if key in s:
                yield _summary(name, doc, s[key])
        # Named fastserve_engine_*: the app's registry has no ProcessCollector,
        # but a process that adds one (process_resident_memory_bytes) gets no clash.
        mem = s.get("memory", {})
        for key, name, doc in (
            ("rss_bytes", "fastserve_engine_rss_bytes", "Resident memory of the serving process"),
            ("peak_rss_bytes", "fastserve_engine_peak_rss_bytes", "Peak resident memory of the serving process"),
        ):
            if mem.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=float(mem[key]))
        if mem.get("cuda_allocated_bytes") is not None:
            cuda = GaugeMetricFamily("fastserve_engine_cuda_memory_bytes",
                                     "torch's memory on the engine's CUDA device", labels=["kind"])
            for kind in ("allocated", "reserved", "peak_allocated"):
                value = mem.get(f"cuda_{kind}_bytes")
                if value is not None:
                    cuda.add_metric([kind], float(value))
            yield cuda
        health = s.get("health", {})
        yield GaugeMetricFamily("fastserve_engine_healthy", "1 while the engine serves",
                                value=1.0 if health.get("healthy") else 0.0)
        labels = ["model", "task", "device", "dtype", "execution", "kernels", "attention", "gemm", "activation"]
        info = GaugeMetricFamily("fastserve_engine_info", "The served model and how it runs",
                                 labels=[*labels, "policy"])
        info.add_metric([str(s.get(k) or "") for k in labels] + [str(ctl.get("policy", ""))], 1.0)
        yield info
        if s.get("attention_batches") is not None:
            runs = CounterMetricFamily("fastserve_engine_attention_batches",
                                       "Packed batches by the attention method that ran them", labels=["method"])
            for method, n in s["attention_batches"].items():
                runs.add_metric([method], float(n))
            yield runs
        yield from _replica_metrics(s.get("replicas") or [])


def _replica_metrics(replicas: list) -> list[Metric]:
    """Per worker (replica, or pipeline stage worker): up, batches, failures,
    requests and its controller's budget, labelled by index and device."""
    labels = ["replica", "device"]
    up = GaugeMetricFamily("fastserve_engine_replica_up", "1 while the replica's worker serves", labels=labels)
    batches = CounterMetricFamily("fastserve_engine_replica_batches", "Batches run by the replica", labels=labels)
    failed = CounterMetricFamily("fastserve_engine_replica_failed_batches", "The replica's batches that failed",
                                 labels=labels)
    requests = CounterMetricFamily("fastserve_engine_replica_requests", "Requests in the replica's batches",
                                   labels=labels)
    budget = GaugeMetricFamily("fastserve_engine_replica_budget_tokens", "The replica controller's token budget",
                               labels=labels)
    for r in replicas:
        key = [str(r["index"]), str(r["device"])]
        up.add_metric(key, 1.0 if r["alive"] else 0.0)
        batches.add_metric(key, float(r["batches"]))
        failed.add_metric(key, float(r["failed_batches"]))
        requests.add_metric(key, float(r["requests"]))
        if r.get("controller"):
            budget.add_metric(key, float(r["controller"].get("budget_tokens", 0)))
    return [up, batches, failed, requests, budget] if replicas else []


def _summary(name: str, doc: str, h: dict[str, float]) -> Metric:
    """An engine histogram snapshot (count, mean, p50/p95/p99) as a Prometheus summary."""
    m = Metric(name, doc, "summary")
    for key, q in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
        if key in h:
            m.add_sample(name, {"quantile": q}, float(h[key]))
    count = float(h.get("count", 0))
    m.add_sample(name + "_count", {}, count)
    m.add_sample(name + "_sum", {}, float(h.get("mean", 0.0)) * count)
    return m


class Metrics:
    """One app's HTTP metrics, in a registry of its own that also holds the
    engine's collector."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("fastserve_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("fastserve_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_progress = Gauge("fastserve_http_requests_in_progress", "HTTP requests being served",
                                 registry=self.registry)
        self.inputs = Counter("fastserve_http_inputs", "Inputs (texts or token lists) received, by route",
                              ["route"], registry=self.registry)
        self.prompt_tokens = Counter("fastserve_http_prompt_tokens", "Tokens of the inputs served, by route",
                                     ["route"], registry=self.registry)
        self.registry.register(EngineCollector(engine))
        # The children of each label set, looked up once (bounded label sets).
        self.requests_for = functools.lru_cache(maxsize=None)(self.requests.labels)
        self.latency_for = functools.lru_cache(maxsize=None)(self.latency.labels)
        self.inputs_for = functools.lru_cache(maxsize=None)(self.inputs.labels)
        self.prompt_tokens_for = functools.lru_cache(maxsize=None)(self.prompt_tokens.labels)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

