"""Open-loop load: requests arrive at precomputed times whatever the server
does (Poisson at a fixed rate, or a rate that triples for a few seconds), so
queueing shows up in latency instead of slowing the client down.

One dispatcher thread sleeps until each arrival and submits one text drawn
(seeded) from the shipped corpus. A request's latency runs from its scheduled
arrival to its future's completion (a done-callback timestamp), queueing
included; a request still unfinished after a bounded drain counts as an SLO
miss with infinite latency.

    python benchmarks/python/load.py --rates 20,60 --duration 4

runs a small sweep and prints a table; `benchmarks/run_all.sh` runs the full
report (benchmarks/python/report.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import numpy as np

import common

# ---------------------------------------------------------------- arrivals


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> np.ndarray:
    """Arrival offsets (seconds from the start) of a Poisson process."""
    rng = np.random.default_rng(seed)
    n = int(rate * duration_s * 1.5) + 16
    t = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while t[-1] < duration_s:  # rare: draw more
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n))])
    return t[t < duration_s]


@dataclass
class Phase:
    rate: float
    duration_s: float


def phased_arrivals(phases: Sequence[Phase], seed: int) -> np.ndarray:
    """Poisson arrivals whose rate is piecewise constant (a load step)."""
    out, start = [], 0.0
    for k, ph in enumerate(phases):
        out.append(start + poisson_arrivals(ph.rate, ph.duration_s, seed * 1000 + k))
        start += ph.duration_s
    return np.concatenate(out)


def bursty_phases(base_rate: float, factor: float, low_s: float, high_s: float, warmup_s: float) -> list[Phase]:
    """Warm-up and low phase at base_rate, factor x base_rate for high_s, back down."""
    return [Phase(base_rate, warmup_s + low_s), Phase(base_rate * factor, high_s), Phase(base_rate, low_s)]


# ------------------------------------------------------------------ a run


def _percentile(a: np.ndarray, q: float) -> float:
    """Percentile without interpolation, so unfinished requests (inf) count."""
    if len(a) == 0:
        return float("nan")
    return float(np.percentile(a, q, method="inverted_cdf"))


def _batch_sizes(futures: Sequence[cf.Future | None], done_at: np.ndarray, since: float) -> list[int]:
    """Sizes of the batches completed after `since`, recovered from the
    futures: every request of a batch carries the batch's compute time in
    future.timing["inference_s"] (one float per batch)."""
    groups: dict[float, list[float]] = {}
    for f, d in zip(futures, done_at):
        timing = getattr(f, "timing", None) if f is not None else None
        if timing is None or np.isnan(d):
            continue
        groups.setdefault(timing["inference_s"], []).append(d)
    return [len(v) for v in groups.values() if min(v) >= since]


def run_open_loop(
    backend: common.Backend,
    offsets: np.ndarray,
    texts: Sequence[str],
    *,
    warmup_s: float,
    slo_s: float,
    drain_s: float,
    sample_budget_every_s: float | None = None,
    progress: Any = None,
    priorities: np.ndarray | None = None,
) -> dict[str, Any]:
    """Drive `backend` with arrivals at `offsets` (seconds) and measure the
    requests that arrive at or after `warmup_s`.

    Returned figures (all over the measured requests; the window runs from
    warmup_s to the last arrival's offset):
    - throughput_rps: completed / (last completion - window start)
    - goodput_rps: requests with latency <= slo_s / window length
    - latency percentiles, with unfinished and refused requests as +inf
    - batch statistics from engine.stats() deltas and the futures' timings
    - refused (at submit: QueueFullError / OverloadedError), shed (the
      future failed with OverloadedError: dropped before compute) and
      expired (RequestTimeoutError) fractions; latency of accepted
      (completed) requests; with `priorities` (one int per arrival), the
      fraction within the SLO per priority class
    """
    n = len(offsets)
    done_at = np.full(n, np.nan)
    failed = np.zeros(n, dtype=bool)
    refused = np.zeros(n, dtype=bool)
    error: list[str | None] = [None] * n
    futures: list[cf.Future | None] = [None] * n
    first = int(np.searchsorted(offsets, warmup_s))
    window_s = float(offsets[-1] - warmup_s) if n > first else 0.0

    def on_done(i: int, f: cf.Future) -> None:
        now = time.perf_counter()
        if f.cancelled():
            return  # cancelled by us after the drain: counted as unfinished
        if f.exception() is not None:
            failed[i] = True
            error[i] = type(f.exception()).__name__
        else:
            done_at[i] = now

    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.perf_counter() + 0.02

    def sampler() -> None:
        while not stop.is_set():
            s = backend.stats()
            if s is not None:
                samples.append((time.perf_counter() - t0, int(s["controller"]["budget_tokens"])))
            stop.wait(sample_budget_every_s)

    sampler_thread = None
    if sample_budget_every_s and backend.kind == "fastserve":
        sampler_thread = threading.Thread(target=sampler, daemon=True)
        sampler_thread.start()

    before = None
    late = 0.0
    for i in range(n):
        target = t0 + offsets[i]
        if not backend.own_dispatch:
            now = time.perf_counter()
            if target > now:
                time.sleep(target - now)
            else:
                late = max(late, now - target)
        if i == first:
            before = backend.stats()
        try:
            text = texts[i % len(texts)]
            if backend.own_dispatch:
                f = backend.submit_at(target, text)
            elif priorities is not None and priorities[i]:
                f = backend.submit(text, priority=int(priorities[i]))
            else:
                f = backend.submit(text)
        except Exception:  # a refusal (QueueFullError, OverloadedError) is a miss
            failed[i] = refused[i] = True
            continue
        futures[i] = f
        f.add_done_callback(partial(on_done, i))
        if progress is not None and i % 64 == 0:
            progress.refresh()

    window_start = t0 + warmup_s
    deadline = t0 + offsets[-1] + drain_s
    measured = [f for f in futures[first:] if f is not None]
    cf.wait(measured, timeout=max(0.0, deadline - time.perf_counter()))
    after = backend.stats()
    stop.set()
    # Leave the backend idle for the next run: whatever is still queued is
    # cancelled (counted unfinished above); what runs now completes.
    for f in futures:
        if f is not None and not f.done():
            f.cancel()
    cf.wait([f for f in futures if f is not None], timeout=30)
    if sampler_thread is not None:
        sampler_thread.join()

    m = slice(first, n)
    lat = done_at[m] - (t0 + offsets[m])
    completed_mask = ~np.isnan(lat) & (done_at[m] <= deadline)
    lat_all = np.where(completed_mask, lat, np.inf)
    completed = int(completed_mask.sum())
    measured_n = n - first
    if completed:
        span = float(np.nanmax(done_at[m][completed_mask]) - window_start)
    else:
        span = float("nan")
    res: dict[str, Any] = {
        "backend": backend.name,
        "offered_rps": measured_n / window_s if window_s > 0 else float("nan"),
        "window_s": window_s,
        "requests": measured_n,
        "completed": completed,
        "unfinished": measured_n - completed - int(failed[m].sum()),
        "failed": int(failed[m].sum()),
        "throughput_rps": completed / span if completed and span > 0 else 0.0,
        "goodput_rps": float((lat_all <= slo_s).sum()) / window_s if window_s > 0 else 0.0,
        "slo_s": slo_s,
        "slo_met_fraction": float((lat_all <= slo_s).mean()) if measured_n else float("nan"),
        "latency_s": {
            "p50": _percentile(lat_all, 50),
            "p95": _percentile(lat_all, 95),
            "p99": _percentile(lat_all, 99),
            "max_finished": float(np.max(lat[completed_mask])) if completed else float("nan"),
        },
        "dispatcher_max_late_s": getattr(backend, "max_late_s", late) if backend.own_dispatch else late,
    }
    errors = np.array([e or "" for e in error[first:]])
    res["refused_fraction"] = float(refused[m].mean()) if measured_n else float("nan")
    res["shed_fraction"] = float((errors == "OverloadedError").mean()) if measured_n else float("nan")
    res["expired_fraction"] = float((errors == "RequestTimeoutError").mean()) if measured_n else float("nan")
    accepted = lat[completed_mask]
    res["accepted_latency_s"] = {
        "p50": _percentile(accepted, 50),
        "p99": _percentile(accepted, 99),
    }
    if priorities is not None:
        res["slo_met_by_priority"] = {
            int(p): float((lat_all[priorities[m] == p] <= slo_s).mean()) for p in np.unique(priorities[m])
        }
        # Where each class's misses went: refused at submit, shed before
        # compute, expired, or completed past the SLO.
        outcome = np.where(refused[m], "refused", errors)
        res["outcomes_by_priority"] = {}
        for p in np.unique(priorities[m]):
            c = priorities[m] == p
            done = completed_mask & c
            res["outcomes_by_priority"][int(p)] = {
                "requests": int(c.sum()),
                "within_slo": float((lat_all[c] <= slo_s).mean()),
                "refused": float((outcome[c] == "refused").mean()),
                "shed": float((outcome[c] == "OverloadedError").mean()),
                "expired": float((outcome[c] == "RequestTimeoutError").mean()),
                "late": float((done & (lat > slo_s)).sum() / c.sum()),
                "accepted_p50_s": _percentile(lat[done], 50),
                "accepted_p99_s": _percentile(lat[done], 99),
            }
    if before is not None and after is not None:
        d = {k: after[k] - before[k] for k in ("batches", "completed", "real_tokens", "padded_tokens")}
        sizes = _batch_sizes(futures, done_at, window_start)
        res["batches"] = {
            "count": d["batches"],
            "mean_size": d["completed"] / d["batches"] if d["batches"] else float("nan"),
            "p50_size": float(np.median(sizes)) if sizes else float("nan"),
            "p99_size": _percentile(np.array(sizes, dtype=float), 99) if sizes else float("nan"),
            "max_size": int(max(sizes)) if sizes else 0,
            "mean_tokens": d["padded_tokens"] / d["batches"] if d["batches"] else float("nan"),
            "padding_ratio": (d["padded_tokens"] - d["real_tokens"]) / d["padded_tokens"] if d["padded_tokens"] else 0.0,
            "budget_tokens_end": int(after["controller"]["budget_tokens"]),
            "execution": after.get("execution"),
        }
    if sampler_thread is not None:
        res["budget_samples"] = samples
    # Per-request arrival offsets and latencies for time-resolved plots.
    res["_arrivals"] = offsets[m] - warmup_s
    res["_latency"] = lat_all
    res["_errors"] = np.where(refused[m], "refused", errors)  # "" (completed or unfinished), "refused", or the failure's type
    return res


def public(r: dict[str, Any]) -> dict[str, Any]:
    """A run's result without its per-request arrays (the keys starting with
    "_": arrivals, latencies, errors), which callers that save JSON drop."""
    return {k: v for k, v in r.items() if not k.startswith("_")}


# -------------------------------------------------------------------- cli


def _row(r: dict[str, Any]) -> str:
    lat = r["latency_s"]
    b = r.get("batches", {})
    return (
        f"{r['backend']:<24} {r['offered_rps']:7.1f} {r['throughput_rps']:7.1f} {r['goodput_rps']:7.1f} "
        f"{common.fmt_ms(lat['p50']):>9} {common.fmt_ms(lat['p95']):>9} {common.fmt_ms(lat['p99']):>9} "
        f"{b.get('mean_size', float('nan')):6.1f} {b.get('padding_ratio', float('nan')):6.3f} {r['unfinished']:5d}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="20,60", help="comma-separated arrival rates (requests/s)")
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    p.add_argument("--drain", type=float, default=2.0, help="seconds after the last arrival before unfinished requests count as missed")
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--backends", default="transformers,sentence-transformers,fastserve/model",
                   help="comma-separated: transformers, sentence-transformers, fastserve/<model|seed|aimd|static-N>, "
                        "and fastserve/<variant>@<dtype> (e.g. fastserve/model@bfloat16)")
    p.add_argument("--execution", default="auto", choices=["auto", "packed", "padded"])
    p.add_argument("--target-latency-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    common.quiet()

    names = args.backends.split(",")
    backends = make_backends(names, args.execution, args.target_latency_ms)
    texts = common.sample_texts(20000, args.seed)
    print(f"{'backend':<24} {'offered':>7} {'thru':>7} {'goodput':>7} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
          f"{'batch':>6} {'pad':>6} {'unfin':>5}")
    out = []
    try:
        for rate in (float(x) for x in args.rates.split(",")):
            offsets = poisson_arrivals(rate, args.warmup + args.duration, args.seed + int(rate * 1000))
            for b in backends:
                r = run_open_loop(b, offsets, texts, warmup_s=args.warmup, slo_s=args.slo_ms / 1000, drain_s=args.drain)
                print(_row(r), flush=True)
                out.append(public(r))
    finally:
        for b in backends:
            b.close()
    if args.json:
        json.dump(out, sys.stdout, default=float)
    return 0


def make_backends(names: Sequence[str], execution: str, target_latency_ms: float) -> list[common.Backend]:
    path = common.model_path()
    out: list[common.Backend] = []
    variants = {v.name: v for v in common.fastserve_variants([], execution, target_latency_ms)}
    for name in names:
        name, _, dtype = name.partition("@")  # fastserve/model@bfloat16: that variant in another dtype
        if dtype:
            if name not in variants:
                raise SystemExit(f"a dtype suffix needs a fastserve variant, got {name!r}")
            v = variants[name]
            out.append(common.FastServeBackend(common.FastServeVariant(f"{name}@{dtype}", {**v.kwargs, "dtype": dtype})))
        elif name == "transformers":
            out.append(common.SerialBackend(name, common.HFModel(path, common.max_seq_length(path)).encode))
        elif name == "sentence-transformers":
            out.append(common.SerialBackend(name, common.STModel(path).encode))
        elif name.startswith("fastserve/static-"):
            budget = int(name.rsplit("-", 1)[1])
            out.append(common.FastServeBackend(common.fastserve_variants([budget], execution, target_latency_ms)[-1]))
        elif name in variants:
            out.append(common.FastServeBackend(variants[name]))
        else:
            raise SystemExit(f"unknown backend {name!r}")
    return out


if __name__ == "__main__":
    sys.exit(main())
