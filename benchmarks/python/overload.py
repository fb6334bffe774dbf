"""Overload: what the engine does from light load to 4x its capacity, open
loop (load.run_open_loop), SLO = the default target (50 ms), every request's
deadline = the SLO (Engine(request_timeout_s=...)).

1. capacity: the default engine's throughput with a standing backlog;
2. a sweep over rates 0.1x..4x capacity: the default policy (model), static
   budgets (0.1x..0.9x, for "best static budget"), and plain transformers and
   sentence-transformers behind a one-worker FIFO, on the same arrivals;
   per rate: goodput within the SLO, p50/p99 of accepted requests, fractions
   refused at submit, shed before compute and expired;
3. two priority classes at 2x capacity (a quarter of the requests high);
4. a load step 0.3x -> 0.9x (budget sampled every 50 ms; settling time);
5. a burst to 3x capacity for 1 s between 0.5x phases;
6. long inputs: one text in ten ten times longer, at 0.7x capacity: p99 of
   the short requests next to the same rate without long ones.

    python benchmarks/python/overload.py --out benchmarks/results

writes overload.json, overload.md and (with matplotlib) overload_*.png, and
prints each target as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import common
import load

FIFO = ("transformers", "sentence-transformers")


def fastserve_backend(name: str, slo_s: float, **kwargs: Any) -> common.FastServeBackend:
    return common.FastServeBackend(common.FastServeVariant(name, {"request_timeout_s": slo_s, **kwargs}))


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


def strip(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if not k.startswith("_")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9,2,4")
    p.add_argument("--static", default="256,512,1024,2048", help="static budgets for 0.1x..0.9x")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--drain", type=float, default=1.0)
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--capacity-texts", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--no-baselines", action="store_true")
    args = p.parse_args(argv)
    common.quiet()
    slo = args.slo_ms / 1000
    texts = common.sample_texts(20000, args.seed)
    path = common.model_path()
    t_start = time.time()

    default = fastserve_backend("fastserve/model", slo, target_latency_ms=args.slo_ms)
    statics = [fastserve_backend(f"fastserve/static-{b}", slo, target_latency_ms=args.slo_ms, policy="static",
                                 min_batch_tokens=b, max_batch_tokens=b) for b in map(int, args.static.split(","))]
    baselines: list[common.Backend] = []
    if not args.no_baselines:
        baselines = [common.SerialBackend("transformers", common.HFModel(path, common.max_seq_length(path)).encode),
                     common.SerialBackend("sentence-transformers", common.STModel(path).encode)]
    out: dict[str, Any] = {"machine": common.machine(), "config": vars(args), "slo_s": slo}
    try:
        cap = capacity_rps(default, common.sample_texts(args.capacity_texts, args.seed + 11))
        out["capacity_rps"] = cap
        print(f"capacity {cap:.1f} req/s", flush=True)

        def run(backend, rate_or_phases, seed, **kw):
            offsets = (load.phased_arrivals(rate_or_phases, seed) if isinstance(rate_or_phases, list)
                       else load.poisson_arrivals(rate_or_phases, args.warmup + args.duration, seed))
            return load.run_open_loop(backend, offsets, kw.pop("texts", texts), warmup_s=kw.pop("warmup", args.warmup),
                                      slo_s=slo, drain_s=args.drain, **kw)

        # 2. sweep
        sweep = []
        for x in map(float, args.fractions.split(",")):
            seed = args.seed + int(x * 1000)
            for b in [default, *(statics if x < 1 else []), *baselines]:
                r = run(b, x * cap, seed)
                r["fraction"] = x
                sweep.append(strip(r))
                print(f"{x:4.1f}x {b.name:<24} goodput {r['goodput_rps']:7.1f} accepted p50/p99 "
                      f"{common.fmt_ms(r['accepted_latency_s']['p50'])}/{common.fmt_ms(r['accepted_latency_s']['p99'])} ms "
                      f"refused {r['refused_fraction']:.2f} shed {r['shed_fraction']:.2f} "
                      f"expired {r['expired_fraction']:.2f}", flush=True)
        out["sweep"] = sweep

        # 3. priority classes at 2x
        offsets = load.poisson_arrivals(2 * cap, args.warmup + args.duration, args.seed + 77)
        prio = (np.random.default_rng(args.seed + 78).random(len(offsets)) < 0.25).astype(int)
        r = load.run_open_loop(default, offsets, texts, warmup_s=args.warmup, slo_s=slo, drain_s=args.drain,
                               priorities=prio)
        out["priority"] = strip(r)
        print(f"priority at 2x: within SLO by class {r['slo_met_by_priority']}", flush=True)

        # 4. step 0.3x -> 0.9x, budget sampled
        step_at = 3.0
        r = run(default, [load.Phase(0.3 * cap, step_at), load.Phase(0.9 * cap, 3.0)], args.seed + 91,
                warmup=0.5, sample_budget_every_s=0.05)
        from report import settling  # report imports load; imported here to keep load's import light

        st = settling(r["budget_samples"], step_at, step_at + 3.0)
        out["step"] = {**strip(r), **st}
        print(f"step 0.3x -> 0.9x: settling {st['settling_s']} s", flush=True)

        # 5. burst to 3x for 1 s
        phases = [load.Phase(0.5 * cap, 2.0), load.Phase(3 * cap, 1.0), load.Phase(0.5 * cap, 2.0)]
        r = run(default, phases, args.seed + 93, warmup=0.0, sample_budget_every_s=0.05)
        arr, lat = r["_arrivals"], r["_latency"]
        windows = {"before": (1.0, 2.0), "burst": (2.0, 3.0), "after": (3.0, 5.0), "first_second_after": (3.0, 4.0)}
        burst = {k: {"goodput_rps": float((lat[(arr >= a) & (arr < b)] <= slo).sum() / (b - a)),
                     "slo_met_fraction": float((lat[(arr >= a) & (arr < b)] <= slo).mean())}
                 for k, (a, b) in windows.items()}
        out["burst"] = {**strip(r), "windows": burst}
        print(f"burst: {burst}", flush=True)

        # 6. long inputs
        mixed, is_long = long_tail(texts, args.seed + 5)
        lt = {}
        for name, tx in (("plain", texts), ("long_tail", mixed)):
            r = run(default, 0.7 * cap, args.seed + 95, texts=tx)
            offsets_n = r["requests"]
            first = len(is_long) and (len(load.poisson_arrivals(0.7 * cap, args.warmup + args.duration, args.seed + 95))
                                      - offsets_n)
            short = ~is_long[first: first + offsets_n] if name == "long_tail" else np.ones(offsets_n, bool)
            lt[name] = {**strip(r), "short": short_p99(r, short, slo)}
            print(f"long inputs ({name}) at 0.7x: short p99 {common.fmt_ms(lt[name]['short']['p99_s'])} ms, "
                  f"within SLO {lt[name]['short']['slo_met_fraction']:.3f}", flush=True)
        out["long_inputs"] = lt
    finally:
        for b in [default, *statics, *baselines]:
            b.close()
    out["elapsed_s"] = time.time() - t_start
    targets = evaluate(out)
    out["targets"] = targets
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}: {t['what']}: {t['measured']}")
    if args.out:
        d = Path(args.out)
        (d / "overload.json").write_text(json.dumps(out, indent=1, default=float))
        plots = plot(out, d)
        (d / "overload.md").write_text(markdown(out, plots))
    return 0


def evaluate(out: dict[str, Any]) -> list[dict[str, Any]]:
    slo = out["slo_s"]
    fs = [r for r in out["sweep"] if r["backend"].startswith("fastserve/")]
    peak = max(r["goodput_rps"] for r in fs)
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
    s = out["step"]["settling_s"]
    t.append({"what": "settling after 0.3x -> 0.9x <= 1 s", "measured": f"{s} s", "pass": s is not None and s <= 1.0})
    hi = out["priority"]["slo_met_by_priority"].get(1, float("nan"))
    t.append({"what": "two classes at 2x: high class >= 99% within SLO", "measured": f"{hi:.2%}",
              "pass": hi >= 0.99})
    return t


def plot(out: dict[str, Any], d: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    backends = sorted({r["backend"] for r in out["sweep"]})
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, key, title in ((axes[0], "step", "step 0.3x -> 0.9x at 3 s"), (axes[1], "burst", "burst to 3x, 2-3 s")):
        samples = out[key].get("budget_samples") or []
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
    pr = out["priority"]
    L += ["", "## Two priority classes at 2x capacity (a quarter high)\n",
          f"Within the SLO, by class (1 = high): {pr['slo_met_by_priority']}; goodput {pr['goodput_rps']:.1f} req/s, "
          f"refused {pr['refused_fraction']:.3f}, shed {pr['shed_fraction']:.3f}.\n",
          "## Load step and burst\n",
          f"Step 0.3x -> 0.9x: settling {out['step']['settling_s']} s (budget within +-10% of the median of the "
          f"last second; before the step {out['step'].get('budget_before_step')}, after "
          f"{out['step'].get('reference_tokens')} tokens).\n",
          "Burst (0.5x for 2 s, 3x for 1 s, 0.5x for 2 s), by arrival window:\n",
          "| window | goodput req/s | within SLO |", "|---|---|---|"]
    for k, w in out["burst"]["windows"].items():
        L.append(f"| {k} | {w['goodput_rps']:.1f} | {w['slo_met_fraction']:.3f} |")
    lt = out["long_inputs"]
    L += ["", "## Long inputs (one text in ten, ten times longer) at 0.7x capacity\n",
          "| mix | short requests' p99 ms | short within SLO | goodput req/s |", "|---|---|---|---|"]
    for k, r in lt.items():
        L.append(f"| {k} | {common.fmt_ms(r['short']['p99_s'])} | {r['short']['slo_met_fraction']:.3f} | "
                 f"{r['goodput_rps']:.1f} |")
    L.append("")
    for p in plots:
        L.append(f"![{p}]({p})\n")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
