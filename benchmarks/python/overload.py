"""Overload: what the engine does from light load to 4x its capacity, open
loop (load.run_open_loop), SLO = the default target (50 ms), every request's
deadline = the SLO (Engine(request_timeout_s=...)).

1. capacity: the default engine's throughput with a standing backlog;
2. a sweep over rates 0.1x..4x capacity: the default policy (model), static
   budgets (0.1x..0.9x, for "best static budget"), and plain transformers and
   sentence-transformers behind a one-worker FIFO, on the same arrivals;
   per rate: goodput within the SLO, p50/p99 of accepted requests, fractions
   refused at submit, shed before compute and expired;
3. two priority classes at 2x capacity (a quarter of the requests high),
   each class's outcomes (refused, shed, expired, late) and the pauses
   (--preempt on/off compares Engine(preempt=...));
4. a load step 0.3x -> 0.9x (budget sampled every 50 ms; settling time);
5. a burst to 3x capacity for 1 s between 0.5x phases;
6. long inputs: one text in ten ten times longer, at 0.7x capacity: p99 of
   the short requests next to the same rate without long ones, with the
   packed cost counting attention (the default) and by tokens alone;
7. recovery: 4x capacity for 2 s, then 0.5x for 3 s, the controller's and
   admission's state (budget, goal, tail J, fits) sampled every 50 ms.

Every scenario (and every rate of the sweep) runs on a fresh engine, so no
run inherits another's controller state (the first version reused one
engine, and a 4x run's state leaked into the runs after it). The FIFO
baselines keep no state between requests and are reused.

    python benchmarks/python/overload.py --out benchmarks/results

writes overload.json, overload.md and (with matplotlib) overload_*.png, and
prints each target as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import common
import load

FIFO = ("transformers", "sentence-transformers")


# Engine arguments every fastserve engine of the run gets (--replicas).
ENGINE_EXTRA: dict[str, Any] = {}


def fastserve_backend(name: str, slo_s: float, **kwargs: Any) -> common.FastServeBackend:
    return common.FastServeBackend(common.FastServeVariant(name, {"request_timeout_s": slo_s, **ENGINE_EXTRA,
                                                                  **kwargs}))


@contextlib.contextmanager
def scheduler_config(**override: Any):
    """Engines built inside get these SchedulerConfig fields (attention_tokens=0:
    a packed batch charged by tokens alone; long_apart_tokens=N: long inputs
    batched apart). The engine has no switch for them, so the scheduler config
    it builds is patched for the comparison."""
    from fastserve import _core

    orig = _core.SchedulerConfig

    def config(**kw: Any) -> Any:
        return orig(**{**kw, **override})

    _core.SchedulerConfig = config
    try:
        yield
    finally:
        _core.SchedulerConfig = orig


class ControllerTrace:
    """Samples the controller's and admission's state (stats()["controller"]
    and the admission counters) every `every_s` while a run is in progress."""

    KEYS = ("budget_tokens", "model_goal_tokens", "tail_s", "admission_tail_s", "fit_intercept_s",
            "fit_slope_s_per_token", "admission_fit_intercept_s", "admission_fit_slope_s_per_token",
            "arrival_tokens_per_s")

    def __init__(self, backend: common.FastServeBackend, every_s: float = 0.05) -> None:
        self.backend, self.every_s, self.samples = backend, every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            s = self.backend.stats()
            c = s["controller"]
            self.samples.append({"t": time.perf_counter() - t0, **{k: c.get(k) for k in self.KEYS},
                                 **{k: s.get(k) for k in ("refused", "shed", "expired", "completed")}})
            self._stop.wait(self.every_s)

    def __enter__(self) -> "ControllerTrace":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def capacity_rps(backend: common.FastServeBackend, texts: list[str]) -> float:
    """Requests per second with a standing backlog (no deadline)."""
    engine = backend.engine
    engine.embed(texts[:64], timeout=600)  # warm
    t0 = time.perf_counter()
    engine.embed(texts, timeout=600)
    return len(texts) / (time.perf_counter() - t0)


def long_tail(texts: list[str], seed: int) -> tuple[list[str], np.ndarray]:
    """One text in ten made ten times longer; returns texts and the long mask."""
    rng = np.random.default_rng(seed)
    long = rng.random(len(texts)) < 0.1
    return [" ".join([t] * 10) if is_long else t for t, is_long in zip(texts, long)], long


def short_p99(res: dict[str, Any], short: np.ndarray, slo_s: float) -> dict[str, float]:
    lat = res["_latency"][short[: len(res["_latency"])]]
    return {"p99_s": float(np.percentile(lat, 99, method="inverted_cdf")) if len(lat) else float("nan"),
            "slo_met_fraction": float((lat <= slo_s).mean()) if len(lat) else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9,2,4")
    p.add_argument("--static", default="256,512,1024,2048", help="static budgets for 0.1x..0.9x")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--drain", type=float, default=1.0)
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--capacity-texts", type=int, default=400)
    p.add_argument("--capacity", type=float, default=None,
                   help="use this capacity (req/s) instead of measuring it: give both arms of an A/B the same "
                        "arrivals (the measured one moves by up to 2x between runs on a shared VM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--extend-past-budget", action="store_true",
                   help="every engine with SchedulerConfig.extend_past_budget (a short queue runs whole past the budget)")
    p.add_argument("--replicas", type=int, default=None,
                   help="Engine(replicas=N) for every fastserve engine (default: the engine's own default)")
    p.add_argument("--preempt", choices=("on", "off"), default=None,
                   help="Engine(preempt=True/False) for every fastserve engine (default: the engine's own)")
    p.add_argument("--only", default=None,
                   help="comma-separated scenarios to run (capacity always): sweep,priority,step,burst,long,recovery")
    args = p.parse_args(argv)
    common.quiet()
    if args.replicas is not None:
        ENGINE_EXTRA["replicas"] = args.replicas
    if args.preempt is not None:
        ENGINE_EXTRA["preempt"] = args.preempt == "on"
    slo = args.slo_ms / 1000
    texts = common.sample_texts(20000, args.seed)
    path = common.model_path()
    t_start = time.time()

    only = set(args.only.split(",")) if args.only else {"sweep", "priority", "step", "burst", "long", "recovery"}

    def default() -> common.FastServeBackend:
        """A fresh engine of the default policy."""
        return fastserve_backend("fastserve/model", slo, target_latency_ms=args.slo_ms)

    def static(b: int) -> common.FastServeBackend:
        return fastserve_backend(f"fastserve/static-{b}", slo, target_latency_ms=args.slo_ms, policy="static",
                                 min_batch_tokens=b, max_batch_tokens=b)

    @contextlib.contextmanager
    def fresh(make: Any, *a: Any):
        b = make(*a)
        try:
            b.engine.embed(texts[:32], timeout=600)  # load and warm, as every run's engine
            yield b
        finally:
            b.close()

    baselines: list[common.Backend] = []
    if not args.no_baselines:
        baselines = [common.SerialBackend("transformers", common.HFModel(path, common.max_seq_length(path)).encode),
                     common.SerialBackend("sentence-transformers", common.STModel(path).encode)]
    out: dict[str, Any] = {"machine": common.machine(), "config": vars(args), "slo_s": slo}
    patch = scheduler_config(extend_past_budget=True) if args.extend_past_budget else contextlib.nullcontext()
    try:
        patch.__enter__()
        if args.capacity is not None:
            cap = args.capacity
        else:
            with fresh(default) as b:
                cap = capacity_rps(b, common.sample_texts(args.capacity_texts, args.seed + 11))
        out["capacity_rps"] = cap
        print(f"capacity {cap:.1f} req/s{' (given)' if args.capacity is not None else ''}", flush=True)

        def run(backend, rate_or_phases, seed, **kw):
            offsets = (load.phased_arrivals(rate_or_phases, seed) if isinstance(rate_or_phases, list)
                       else load.poisson_arrivals(rate_or_phases, args.warmup + args.duration, seed))
            return load.run_open_loop(backend, offsets, kw.pop("texts", texts), warmup_s=kw.pop("warmup", args.warmup),
                                      slo_s=slo, drain_s=args.drain, **kw)

        # 2. sweep
        sweep = []
        for x in map(float, args.fractions.split(",")) if "sweep" in only else []:
            seed = args.seed + int(x * 1000)
            makers = [(default,), *([(static, b) for b in map(int, args.static.split(","))] if x < 1 else [])]
            for b in [*makers, *baselines]:
                if isinstance(b, tuple):
                    with fresh(*b) as engine:
                        r = run(engine, x * cap, seed)
                        b = engine
                else:
                    r = run(b, x * cap, seed)
                r["fraction"] = x
                sweep.append(load.public(r))
                print(f"{x:4.1f}x {b.name:<24} goodput {r['goodput_rps']:7.1f} accepted p50/p99 "
                      f"{common.fmt_ms(r['accepted_latency_s']['p50'])}/{common.fmt_ms(r['accepted_latency_s']['p99'])} ms "
                      f"refused {r['refused_fraction']:.2f} shed {r['shed_fraction']:.2f} "
                      f"expired {r['expired_fraction']:.2f}", flush=True)
        out["sweep"] = sweep

        # 3. priority classes at 2x
        if "priority" in only:
            offsets = load.poisson_arrivals(2 * cap, args.warmup + args.duration, args.seed + 77)
            prio = (np.random.default_rng(args.seed + 78).random(len(offsets)) < 0.25).astype(int)
            with fresh(default) as b:
                with ControllerTrace(b) as trace:
                    r = load.run_open_loop(b, offsets, texts, warmup_s=args.warmup, slo_s=slo, drain_s=args.drain,
                                           priorities=prio)
                r["trace"] = trace.samples  # the controller and admission every 50 ms
                r["preempted"] = b.stats().get("preempted")
            out["priority"] = load.public(r)
            print(f"priority at 2x: within SLO by class {r['slo_met_by_priority']}", flush=True)
            for c, o in r["outcomes_by_priority"].items():
                print(f"  class {c}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in o.items()), flush=True)

        # 4. step 0.3x -> 0.9x, budget sampled
        if "step" in only:
            step_at, after_s = 3.0, 4.0
            with fresh(default) as b, ControllerTrace(b) as trace:
                r = run(b, [load.Phase(0.3 * cap, step_at), load.Phase(0.9 * cap, after_s)], args.seed + 91,
                        warmup=0.5, sample_budget_every_s=0.05)
            from report import settling  # report imports load; imported here to keep load's import light

            st = settling(r["budget_samples"], step_at, step_at + after_s)
            st20 = settling(r["budget_samples"], step_at, step_at + after_s, band=0.2)
            out["step"] = {**load.public(r), **st, "settling_s_20pct": st20["settling_s"], "trace": trace.samples}
            print(f"step 0.3x -> 0.9x: settling {st['settling_s']} s (+-10%), {st20['settling_s']} s (+-20%)",
                  flush=True)

        # 5. burst to 3x for 1 s
        if "burst" in only:
            burst_run(out, run, default, fresh, cap, args, slo)

        # 6. long inputs
        if "long" in only:
            long_run(out, run, default, fresh, cap, args, slo, texts)

        # 7. recovery after overload, the controller traced
        if "recovery" in only:
            with fresh(default) as b, ControllerTrace(b) as trace:
                r = run(b, [load.Phase(4 * cap, 2.0), load.Phase(0.5 * cap, 3.0)], args.seed + 97, warmup=0.0,
                        sample_budget_every_s=0.05)
            arr, lat = r["_arrivals"], r["_latency"]
            win = (arr >= 3.0) & (arr < 5.0)
            out["recovery"] = {**load.public(r), "trace": trace.samples,
                               "after_within_slo": float((lat[win] <= slo).mean()) if win.any() else float("nan"),
                               "after_goodput_rps": float((lat[win] <= slo).sum() / 2.0),
                               "budget_last_s": float(np.median([s["budget_tokens"] for s in trace.samples
                                                                  if s["t"] >= 4.0] or [np.nan]))}
            print(f"recovery: within SLO 1-3 s after the 4x phase {out['recovery']['after_within_slo']:.3f}, "
                  f"budget in the last second {out['recovery']['budget_last_s']:.0f}", flush=True)
    finally:
        patch.__exit__(None, None, None)
        for b in baselines:
            b.close()
    out["elapsed_s"] = time.time() - t_start
    targets = evaluate(out)
    out["targets"] = targets
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}: {t['what']}: {t['measured']}")
    if args.out:
        write(out, Path(args.out))
    return 0


def write(out: dict[str, Any], d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "overload.json").write_text(json.dumps(out, indent=1, default=float))
    plots = plot(out, d)
    (d / "overload.md").write_text(markdown(out, plots))


def burst_run(out: dict[str, Any], run: Any, default: Any, fresh: Any, cap: float, args: Any, slo: float) -> None:
    """0.5x for 2 s, 3x for 1 s, 0.5x for 2 s: goodput and SLO by arrival window."""
    phases = [load.Phase(0.5 * cap, 2.0), load.Phase(3 * cap, 1.0), load.Phase(0.5 * cap, 2.0)]
    with fresh(default) as b:
        r = run(b, phases, args.seed + 93, warmup=0.0, sample_budget_every_s=0.05)
    arr, lat = r["_arrivals"], r["_latency"]
    windows = {"before": (1.0, 2.0), "burst": (2.0, 3.0), "after": (3.0, 5.0), "first_second_after": (3.0, 4.0)}
    burst = {k: {"goodput_rps": float((lat[(arr >= a) & (arr < b)] <= slo).sum() / (b - a)),
                 "slo_met_fraction": float((lat[(arr >= a) & (arr < b)] <= slo).mean())}
             for k, (a, b) in windows.items()}
    out["burst"] = {**load.public(r), "windows": burst}
    print(f"burst: {burst}", flush=True)


def long_run(out: dict[str, Any], run: Any, default: Any, fresh: Any, cap: float, args: Any, slo: float,
             texts: list[str]) -> None:
    """Short requests' p99 at 0.7x capacity: without long inputs, and with one
    text in ten ten times longer: the packed cost counting attention (the
    engine's default), by tokens alone, and long inputs (over 4x the median
    length) batched apart. Each on a fresh engine."""
    mixed, is_long = long_tail(texts, args.seed + 5)
    n_all = len(load.poisson_arrivals(0.7 * cap, args.warmup + args.duration, args.seed + 95))
    import transformers  # the default model's tokenizer, for the median length

    lens = [len(x) for x in transformers.AutoTokenizer.from_pretrained(common.model_path())(texts[:2000])["input_ids"]]
    apart = int(4 * np.median(lens))
    lt = {}
    for name, tx, patch in (("plain", texts, {}), ("long_tail (attention counted)", mixed, {}),
                            ("long_tail, tokens only", mixed, {"attention_tokens": 0}),
                            (f"long_tail, attention + apart over {apart} tokens", mixed,
                             {"long_apart_tokens": apart})):
        with scheduler_config(**patch), fresh(default) as b:
            r = run(b, 0.7 * cap, args.seed + 95, texts=tx)
        n = r["requests"]
        idx = np.arange(n_all - n, n_all) % len(tx)  # request i sends tx[i % len(tx)]
        short = ~is_long[idx] if tx is mixed else np.ones(n, bool)
        done = np.isfinite(r["_latency"])
        lt[name] = {**load.public(r), "short": short_p99(r, short, slo),
                    "short_accepted_p99_s": short_p99(r, short & done, slo)["p99_s"]}
        print(f"long inputs ({name}) at 0.7x: short p99 {common.fmt_ms(lt[name]['short']['p99_s'])} ms, "
              f"within SLO {lt[name]['short']['slo_met_fraction']:.3f}", flush=True)
    out["long_inputs"] = lt


def evaluate(out: dict[str, Any]) -> list[dict[str, Any]]:
    slo = out["slo_s"]
    fs = [r for r in out.get("sweep", []) if r["backend"].startswith("fastserve/")]
    peak = max((r["goodput_rps"] for r in fs), default=float("nan"))
    model = {r["fraction"]: r for r in fs if r["backend"] == "fastserve/model"}
    t = []
    for x in (2.0, 4.0):
        if x in model:
            r = model[x]
            t.append({"what": f"{x:g}x capacity: goodput >= 90% of peak goodput ({peak:.1f} req/s)",
                      "measured": f"{r['goodput_rps']:.1f} req/s = {r['goodput_rps'] / peak:.1%}",
                      "pass": r["goodput_rps"] >= 0.9 * peak})
            t.append({"what": f"{x:g}x capacity: p99 of accepted <= SLO ({slo * 1e3:.0f} ms)",
                      "measured": f"{r['accepted_latency_s']['p99'] * 1e3:.1f} ms",
                      "pass": r["accepted_latency_s"]["p99"] <= slo})
    for x, r in sorted(model.items()):
        if x >= 1:
            continue
        best = max((s for s in fs if s["fraction"] == x and s["backend"].startswith("fastserve/static")),
                   key=lambda s: s["goodput_rps"], default=None)
        if best is not None:
            t.append({"what": f"{x:g}x: default goodput >= 95% of best static ({best['backend']})",
                      "measured": f"{r['goodput_rps']:.1f} vs {best['goodput_rps']:.1f} req/s = "
                                  f"{r['goodput_rps'] / best['goodput_rps']:.1%}",
                      "pass": r["goodput_rps"] >= 0.95 * best["goodput_rps"]})
    if "step" in out:
        for key, band in (("settling_s", "10"), ("settling_s_20pct", "20")):
            s = out["step"][key]
            t.append({"what": f"settling after 0.3x -> 0.9x <= 1 s (budget within +-{band}% of its final median)",
                      "measured": "never within the band" if s is None else f"{s:.2f} s",
                      "pass": s is not None and s <= 1.0})
    if "priority" in out:
        hi = out["priority"]["slo_met_by_priority"].get(1, float("nan"))
        t.append({"what": "two classes at 2x: high class >= 99% within SLO", "measured": f"{hi:.2%}",
                  "pass": hi >= 0.99})
    if "burst" in out:
        w = out["burst"]["windows"]
        t.append({"what": "after a 3x burst: no backlog (arrivals 0-2 s after it >= 95% within SLO)",
                  "measured": f"{w['after']['slo_met_fraction']:.1%} (first second after: "
                              f"{w['first_second_after']['slo_met_fraction']:.1%})",
                  "pass": w["after"]["slo_met_fraction"] >= 0.95})
    if "long_inputs" in out:
        lt = out["long_inputs"]
        plain = lt["plain"]["short"]["slo_met_fraction"]
        for k, r in lt.items():
            if k == "plain":
                continue
            sh = r["short"]
            t.append({"what": f"long inputs, {k}: short requests keep their share within SLO (plain mix: {plain:.1%})",
                      "measured": f"{sh['slo_met_fraction']:.1%}, p99 of accepted short "
                                  f"{common.fmt_ms(r['short_accepted_p99_s'])} ms",
                      "pass": sh["slo_met_fraction"] >= plain - 0.02 and r["short_accepted_p99_s"] <= slo})
    if "recovery" in out:
        r = out["recovery"]
        fresh = model.get(0.5, {}).get("slo_met_fraction", float("nan"))
        t.append({"what": f"after 2 s at 4x, the 0.5x phase (from 1 s after) within SLO as on a fresh engine at 0.5x "
                          f"({fresh:.1%}, sweep), within 5 points",
                  "measured": f"{r['after_within_slo']:.1%}, budget {r['budget_last_s']:.0f} tokens in its last second",
                  "pass": r["after_within_slo"] >= fresh - 0.05})
    return t


def plot(out: dict[str, Any], d: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    backends = sorted({r["backend"] for r in out.get("sweep", [])})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for b in backends:
        rs = sorted((r for r in out["sweep"] if r["backend"] == b), key=lambda r: r["fraction"])
        xs = [r["fraction"] for r in rs]
        ax1.plot(xs, [r["goodput_rps"] for r in rs], marker="o", label=b)
        ax2.plot(xs, [min(r["accepted_latency_s"]["p99"], 10) * 1e3 for r in rs], marker="o", label=b)
    ax1.set_xscale("log"), ax2.set_xscale("log"), ax2.set_yscale("log")
    ax1.set_xlabel("offered load (x capacity)"), ax2.set_xlabel("offered load (x capacity)")
    ax1.set_ylabel("goodput within SLO (req/s)"), ax2.set_ylabel("p99 of accepted requests (ms)")
    ax2.axhline(out["slo_s"] * 1e3, color="grey", ls="--", lw=1)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(d / "overload_sweep.png", dpi=110)
    names.append("overload_sweep.png")
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
    for ax, key, title in ((axes[0], "step", "step 0.3x -> 0.9x at 3 s"), (axes[1], "burst", "burst to 3x, 2-3 s"),
                           (axes[2], "recovery", "4x for 2 s, then 0.5x")):
        samples = out.get(key, {}).get("budget_samples") or []
        if samples:
            ax.plot([t for t, _ in samples], [b for _, b in samples])
        ax.set_title(f"budget over time: {title}")
        ax.set_xlabel("s"), ax.set_ylabel("token budget")
    fig.tight_layout()
    fig.savefig(d / "overload_budget.png", dpi=110)
    names.append("overload_budget.png")
    plt.close("all")
    return names


def markdown(out: dict[str, Any], plots: list[str]) -> str:
    m = out["machine"]
    L = ["# Overload: goodput within the SLO from 0.1x to 4x capacity\n",
         f"Command: `python benchmarks/python/overload.py --out benchmarks/results` "
         f"(config {json.dumps({k: v for k, v in out['config'].items() if k != 'out'})}).  ",
         f"Machine: {m.get('Model name')}, {m.get('usable_cores')} usable cores, flags {m.get('simd')}; "
         f"torch {m.get('torch')} ({m.get('torch_threads')} threads), transformers {m.get('transformers')}, "
         f"commit {m.get('git_commit')}.  ",
         f"SLO = every request's deadline = {out['slo_s'] * 1e3:.0f} ms (the default target). "
         f"Capacity (default engine, standing backlog): {out['capacity_rps']:.1f} req/s. "
         f"Elapsed {out['elapsed_s']:.0f} s.\n",
         "## Targets\n", "| target | measured | |", "|---|---|---|"]
    for t in out["targets"]:
        L.append(f"| {t['what']} | {t['measured']} | {'PASS' if t['pass'] else 'FAIL'} |")
    L += ["", "## Sweep\n",
          "| load | backend | offered req/s | goodput req/s | accepted p50 ms | accepted p99 ms | refused | shed | "
          "expired | unfinished |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["sweep"]:
        a = r["accepted_latency_s"]
        L.append(f"| {r['fraction']:g}x | {r['backend']} | {r['offered_rps']:.1f} | {r['goodput_rps']:.1f} | "
                 f"{common.fmt_ms(a['p50'])} | {common.fmt_ms(a['p99'])} | {r['refused_fraction']:.3f} | "
                 f"{r['shed_fraction']:.3f} | {r['expired_fraction']:.3f} | {r['unfinished']} |")
    if "priority" in out:
        pr = out["priority"]
        by = {k: f"{v:.3f}" for k, v in pr["slo_met_by_priority"].items()}
        L += ["", "## Two priority classes at 2x capacity (a quarter high)\n",
              f"Within the SLO, by class (1 = high): {by}; goodput {pr['goodput_rps']:.1f} req/s, "
              f"refused {pr['refused_fraction']:.3f}, shed {pr['shed_fraction']:.3f}; "
              f"batches paused for the high class: {pr.get('preempted')}.\n",
              "| class | requests | within SLO | refused | shed | expired | late | accepted p50 | accepted p99 |",
              "|---|---|---|---|---|---|---|---|---|"]
        for c, o in pr.get("outcomes_by_priority", {}).items():
            L.append(f"| {c} | {o['requests']} | {o['within_slo']:.3f} | {o['refused']:.3f} | {o['shed']:.3f} | "
                     f"{o['expired']:.3f} | {o['late']:.3f} | {common.fmt_ms(o['accepted_p50_s'])} | "
                     f"{common.fmt_ms(o['accepted_p99_s'])} |")
    if "step" in out:
        st = out["step"]
        L += ["", "## Load step\n",
              f"Step 0.3x -> 0.9x: settling {st['settling_s']} s within +-10%, {st['settling_s_20pct']} s within "
              f"+-20% of the median budget of the last second (before the step {st.get('budget_before_step')}, "
              f"after {st.get('reference_tokens')} tokens); goodput {st['goodput_rps']:.1f} req/s, accepted p99 "
              f"{common.fmt_ms(st['accepted_latency_s']['p99'])} ms."]
    if "burst" in out:
        L += ["", "## Burst\n", "0.5x for 2 s, 3x for 1 s, 0.5x for 2 s, by arrival window:\n",
              "| window | goodput req/s | within SLO |", "|---|---|---|"]
        for k, w in out["burst"]["windows"].items():
            L.append(f"| {k} | {w['goodput_rps']:.1f} | {w['slo_met_fraction']:.3f} |")
    if "long_inputs" in out:
        L += ["", "## Long inputs (one text in ten, ten times longer) at 0.7x capacity\n",
              "| mix, cost | short requests' p99 ms (refused = inf) | accepted short p99 ms | short within SLO | "
              "goodput req/s | refused | shed |",
              "|---|---|---|---|---|---|---|"]
        for k, r in out["long_inputs"].items():
            L.append(f"| {k} | {common.fmt_ms(r['short']['p99_s'])} | {common.fmt_ms(r['short_accepted_p99_s'])} | "
                     f"{r['short']['slo_met_fraction']:.3f} | "
                     f"{r['goodput_rps']:.1f} | {r['refused_fraction']:.3f} | {r['shed_fraction']:.3f} |")
    if "recovery" in out:
        r = out["recovery"]
        L += ["", "## Recovery after overload (4x for 2 s, then 0.5x for 3 s)\n",
              f"Arrivals 1-3 s into the 0.5x phase: {r['after_within_slo']:.3f} within the SLO "
              f"({r['after_goodput_rps']:.1f} req/s); budget in the last second {r['budget_last_s']:.0f} tokens. "
              "Controller and admission state, every 0.5 s:\n",
              "| t s | budget | goal | tail J ms | fit a ms | fit b us/token | refused | shed |",
              "|---|---|---|---|---|---|---|---|"]
        nxt = 0.0
        for x in r["trace"]:
            if x["t"] < nxt:
                continue
            nxt = x["t"] + 0.5
            L.append(f"| {x['t']:.1f} | {x['budget_tokens']} | {x['model_goal_tokens'] or 0:.0f} | "
                     f"{(x['admission_tail_s'] or 0) * 1e3:.1f} | {(x['fit_intercept_s'] or 0) * 1e3:.1f} | "
                     f"{(x['fit_slope_s_per_token'] or 0) * 1e6:.1f} | {x['refused']} | {x['shed']} |")
    L.append("")
    for p in plots:
        L.append(f"![{p}]({p})\n")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
