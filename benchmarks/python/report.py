"""The load and offline report: one command, `bash
benchmarks/run_all.sh`, runs

1. idle single-text latency of each baseline and of the default engine;
2. fastserve's capacity: the default engine's throughput with a standing
   backlog (N texts submitted at once);
3. an open-loop sweep over arrival rates given as fractions of that capacity
   (the same absolute rates and the same seeded arrivals for every backend);
4. a bursty run (the rate triples for a few seconds, then falls back) with the
   controller's token budget sampled every 50 ms;
5. the offline comparison (benchmarks/python/offline.py);

and writes benchmarks/results/{results.md, results.json, *.png}, printing the
targets (benchmarks/README.md) as PASS/FAIL lines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import common
import load
import offline

BASELINES = ("transformers", "sentence-transformers")
DEFAULT = "fastserve/model"


# ----------------------------------------------------------------- analysis


def settling(samples: Sequence[tuple[float, int]], t_step: float, t_end: float, band: float = 0.10,
             ref_window_s: float = 1.0) -> dict[str, Any]:
    """Settling time of the controller's budget after a load step at t_step.

    Reference: the median budget over the last ref_window_s of the phase that
    ends at t_end. Settled at the first sample time t >= t_step from which
    every sample up to t_end stays within +-band of the reference; the
    settling time is t - t_step (0 when the budget never left the band)."""
    after = [(t, b) for t, b in samples if t_step <= t < t_end]
    ref_samples = [b for t, b in after if t >= t_end - ref_window_s]
    if not after or not ref_samples:
        return {"settling_s": None, "reference_tokens": None}
    ref = float(np.median(ref_samples))
    settled_at = None
    for t, b in reversed(after):
        if abs(b - ref) > band * ref:
            break
        settled_at = t
    before = [b for t, b in samples if t < t_step]
    return {
        "settling_s": None if settled_at is None else settled_at - t_step,
        "reference_tokens": ref,
        "budget_before_step": before[-1] if before else None,
        "band": band,
    }


def best_goodput_within_slo(points: Sequence[dict[str, Any]], slo_s: float) -> tuple[float, dict[str, Any] | None]:
    """Max goodput over the rate points whose p99 latency met the SLO."""
    best, where = 0.0, None
    for r in points:
        if r.get("saturated"):
            continue
        if r["latency_s"]["p99"] <= slo_s and r["goodput_rps"] > best:
            best, where = r["goodput_rps"], r
    return best, where


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLE = {
    "transformers": dict(color="tab:gray", marker="s", ls="--"),
    "sentence-transformers": dict(color="tab:brown", marker="D", ls="--"),
    "fastserve/model": dict(color="tab:red", marker="o", lw=2.5),
    "fastserve/seed": dict(color="tab:purple", marker="^"),
    "fastserve/aimd": dict(color="tab:orange", marker="v"),
}


def _style(name: str, k: int) -> dict[str, Any]:
    if name in STYLE:
        return STYLE[name]
    blues = ["#9ecae1", "#4292c6", "#08519c", "#08306b"]
    return dict(color=blues[k % len(blues)], marker=".", ls=":")


def plot_sweep(sweep: dict[str, list[dict[str, Any]]], capacity: float, slo_s: float, out: Path) -> list[str]:
    plt = _plt()
    files = []
    # p99 against offered load, log y; unfinished p99 drawn at a ceiling.
    fig, ax = plt.subplots(figsize=(8, 5))
    finite = [r["latency_s"]["p99"] for pts in sweep.values() for r in pts if not r.get("saturated")]
    finite = [x for x in finite if math.isfinite(x)]
    ceiling = max(finite + [slo_s]) * 2.0
    for k, (name, pts) in enumerate(sweep.items()):
        run = sorted((r for r in pts if not r.get("saturated")), key=lambda r: r["offered_rps"])
        x = [r["offered_rps"] for r in run]
        y = [r["latency_s"]["p99"] * 1000 if math.isfinite(r["latency_s"]["p99"]) else ceiling * 1000 for r in run]
        st = _style(name, k)
        ax.plot(x, y, label=name, **st)
        for xi, r in zip(x, run):
            if not math.isfinite(r["latency_s"]["p99"]):
                ax.plot([xi], [ceiling * 1000], marker="x", color=st["color"], ms=10, ls="none")
    ax.axhline(slo_s * 1000, color="black", lw=1, ls="-.", label=f"SLO {slo_s * 1000:.0f} ms")
    ax.axhline(ceiling * 1000, color="lightgray", lw=0.8)
    ax.text(ax.get_xlim()[0], ceiling * 1000 * 1.05, " x: >1% unfinished after the drain", fontsize=8, va="bottom")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("offered load (requests/s, Poisson)")
    ax.set_ylabel("p99 latency (ms, arrival to completion)")
    ax.set_title(f"p99 latency vs offered load (fastserve capacity {capacity:.0f} req/s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    _capacity_axis(ax, capacity)
    fig.tight_layout()
    f = out / "p99_vs_load.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(f.name)

    fig, ax = plt.subplots(figsize=(8, 5))
    xmax = 0.0
    for k, (name, pts) in enumerate(sweep.items()):
        run = sorted((r for r in pts if not r.get("saturated")), key=lambda r: r["offered_rps"])
        x = [r["offered_rps"] for r in run]
        xmax = max([xmax] + x)
        ax.plot(x, [r["goodput_rps"] for r in run], label=name, **_style(name, k))
    ax.plot([0, xmax], [0, xmax], color="lightgray", lw=1, label="goodput = offered")
    ax.set_xlabel("offered load (requests/s, Poisson)")
    ax.set_ylabel(f"goodput (requests/s finished within {slo_s * 1000:.0f} ms)")
    ax.set_title("Goodput vs offered load")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    _capacity_axis(ax, capacity)
    fig.tight_layout()
    f = out / "goodput_vs_load.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(f.name)
    return files


def _plain_log_ticks(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _capacity_axis(ax, capacity: float) -> None:
    sec = ax.secondary_xaxis("top", functions=(lambda x: x / capacity, lambda f: f * capacity))
    sec.set_xlabel("fraction of fastserve's capacity", fontsize=8)


def plot_bursty(bursty: dict[str, Any], out: Path) -> str:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    phases = bursty["phases"]
    # Nominal arrival rate (step), on the right axis.
    axr = ax.twinx()
    t, xs, ys = -bursty["warmup_s"], [], []
    for ph in phases:
        xs += [t, t + ph["duration_s"]]
        ys += [ph["rate"], ph["rate"]]
        t += ph["duration_s"]
    axr.plot(xs, ys, color="black", lw=1, ls="--", label="arrival rate (nominal)")
    arr = np.asarray(bursty["arrival_offsets_s"])
    bins = np.arange(-bursty["warmup_s"], arr.max() + 0.5, 0.5)
    h, e = np.histogram(arr, bins=bins)
    axr.step(e[:-1], h / 0.5, where="post", color="darkgray", lw=1, label="arrivals per s (0.5 s bins)")
    axr.set_ylabel("arrival rate (requests/s)")
    for k, (name, run) in enumerate(bursty["runs"].items()):
        s = run["budget_samples"]
        if not s:
            continue
        ts = [x[0] - bursty["warmup_s"] for x in s]
        ax.plot(ts, [x[1] for x in s], label=f"{name} budget", color=_style(name, k)["color"], lw=1.8)
    st = bursty["runs"].get(DEFAULT, {}).get("settling", {})
    if st.get("reference_tokens"):
        ref = st["reference_tokens"]
        t_up = bursty["step_up_s"]
        ax.axhspan(ref * (1 - st["band"]), ref * (1 + st["band"]), xmin=0, xmax=1, color="tab:red", alpha=0.08,
                   label=f"{DEFAULT} reference +-{st['band']:.0%}")
        if st.get("settling_s") is not None:
            ax.axvline(t_up + st["settling_s"], color="tab:red", lw=0.8, ls=":")
    ax.set_ylabel("controller token budget")
    ax.set_title("Bursty load: controller budget (sampled every 50 ms) and arrival rate")
    ax.grid(True, alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = axr.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best", framealpha=0.8)
    # Latency by arrival time.
    for k, (name, run) in enumerate(bursty["runs"].items()):
        arr = np.asarray(run["arrivals_s"])
        lat = np.asarray(run["latency_s"])
        if not len(arr):
            continue
        edges = np.arange(0, arr.max() + 0.5, 0.5)
        xs, ys = [], []
        for a, b in zip(edges[:-1], edges[1:]):
            sel = lat[(arr >= a) & (arr < b)]
            if len(sel):
                q = float(np.percentile(sel, 99, method="inverted_cdf"))
                xs.append(a + 0.25)
                ys.append(q * 1000 if math.isfinite(q) else np.nan)
        ax2.plot(xs, ys, label=name, color=_style(name, k)["color"], marker=".")
    ax2.axhline(bursty["slo_s"] * 1000, color="black", lw=1, ls="-.", label="SLO")
    ax2.set_yscale("log")
    _plain_log_ticks(ax2)
    ax2.set_ylabel("p99 latency (ms) by arrival, 0.5 s bins")
    ax2.set_xlabel("time since the end of warm-up (s)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    f = out / "bursty_budget.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    return f.name


# --------------------------------------------------------------- markdown


def _ms(x: float | None) -> str:
    return common.fmt_ms(x)


def _f(x: Any, fmt: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


def sweep_table(sweep: dict[str, list[dict[str, Any]]], capacity: float) -> str:
    lines = [
        "| load | offered req/s | backend | throughput req/s | goodput req/s | p50 ms | p95 ms | p99 ms | "
        "batch mean / p99 | padding | budget (end) | unfinished |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_rate: dict[float, list[dict[str, Any]]] = {}
    for pts in sweep.values():
        for r in pts:
            by_rate.setdefault(r["fraction"], []).append(r)
    for frac in sorted(by_rate):
        for r in by_rate[frac]:
            if r.get("saturated"):
                lines.append(
                    f"| {frac:.2f} | {r['offered_rps']:.1f} | {r['backend']} | saturated: not run "
                    f"(> {r['skip_factor']:.0f}x its capacity {r['capacity_rps']:.0f} req/s) | | | | | | | | |"
                )
                continue
            lat, b = r["latency_s"], r.get("batches") or {}
            who = r["backend"]
            if "own_capacity_fraction" in r:
                who += f" ({r['own_capacity_fraction']:.2f}x its own capacity)"
            batch = f"{_f(b.get('mean_size'))} / {_f(b.get('p99_size'), '.0f')}" if b else "1 / 1"
            lines.append(
                f"| {frac:.2f} | {r['offered_rps']:.1f} | {who} | {r['throughput_rps']:.1f} | "
                f"{r['goodput_rps']:.1f} | {_ms(lat['p50'])} | {_ms(lat['p95'])} | {_ms(lat['p99'])} | {batch} | "
                f"{_f(b.get('padding_ratio'), '.1%') if b else '-'} | {b.get('budget_tokens_end', '-') if b else '-'} | "
                f"{r['unfinished'] + r['failed']} / {r['requests']} |"
            )
    return "\n".join(lines)


def write_markdown(res: dict[str, Any], out: Path, plots: list[str]) -> None:
    m = res["machine"]
    cfg = res["config"]
    L: list[str] = []
    L.append("# fastserve load and offline benchmarks\n")
    L.append(f"Generated by `bash benchmarks/run_all.sh` on {res['started']} in {res['runtime_s'] / 60:.1f} min "
             f"(git {m.get('git_commit')}{' + uncommitted changes' if m.get('git_dirty') else ''}).\n")
    L.append("## Machine\n")
    L.append("| | |\n|---|---|")
    for k in ("Model name", "Architecture", "CPU(s)", "usable_cores", "Thread(s) per core", "simd", "memory_gb",
              "python", "torch", "torch_threads", "transformers", "sentence_transformers"):
        if k in m:
            L.append(f"| {k} | {m[k]} |")
    L.append(f"| fp32 matmul peak (measured, {m.get('torch_threads')} threads) | {res['offline']['peak_gflops']:.0f} GFLOP/s |")
    L.append(f"| `uptime` at start | `{res['uptime_start']}` |")
    L.append(f"| `uptime` at end | `{res['uptime_end']}` |")
    L.append(f"| CPU used by other processes during the run | {res['other_cpu_fraction']:.0%} of the machine ("
             + ", ".join(f"{k}: {v:.0%}" for k, v in res["other_cpu_fraction_by_stage"].items()) + ") |")
    L.append("")
    if res["noisy"]:
        L.append(f"**Noisy figures.** Other processes used {res['other_cpu_fraction']:.0%} of the machine's CPU "
                 f"during the run (1-minute load average up to {res['max_load']:.1f} on {m.get('usable_cores')} cores, "
                 "this benchmark's own two busy threads included), so "
                 "latencies and throughputs below are noisier, and the baselines and fastserve may have been "
                 "slowed by different amounts. Re-run on a quiet machine for publishable figures.\n")
    L.append("## Targets\n")
    L.append("```")
    L.extend(res["target_lines"])
    L.append("```\n")
    L.append("## Headline\n")
    L.append(f"SLO {cfg['slo_ms']:.0f} ms (arrival to completion, queueing included). Best goodput within the SLO: "
             "the highest goodput over the sweep's rate points whose p99 met the SLO.\n")
    L.append("| backend | idle single-text latency (median) | p50 at 10% load | best goodput within SLO | at offered |")
    L.append("|---|---:|---:|---:|---:|")
    for name, h in res["headline"].items():
        L.append(f"| {name} | {_ms(h.get('idle_median_s'))} ms | {_ms(h.get('p50_low_load_s'))} ms | "
                 f"{h['best_goodput_rps']:.1f} req/s | {_f(h.get('best_at_offered_rps'))} req/s |")
    L.append("")
    L.append("## Method\n")
    L.append(f"""- Model: all-MiniLM-L6-v2 (the embedded default), fp32 on CPU, truncation at 256 tokens for every backend.
- Texts: drawn with replacement, seeded, from `fastserve.corpus.texts()` (English prose, 11-355 tokens, mean about 39).
- Open loop: arrival times are precomputed (Poisson); one dispatcher thread sleeps until each arrival and submits
  one text. Latency runs from the scheduled arrival to the future's done-callback, so queueing (and any
  dispatcher lateness) counts. Each point runs {cfg['warmup_s']:g} s of unmeasured warm-up at the same rate, then
  measures for max({cfg['min_duration_s']:g} s, {cfg['min_requests']} requests / rate) capped at {cfg['max_duration_s']:g} s.
- Drain: requests not finished {cfg['drain_s']:.1f} s after the last arrival count as unfinished (latency +inf, an SLO
  miss) and are cancelled so the next run starts idle.
- Throughput: completed measured requests / (last completion - window start). Goodput: measured requests finished
  within the SLO / measurement window (s).
- Capacity: the default engine's throughput with a standing backlog ({cfg['capacity_texts']} texts submitted at
  once): {res['capacity_rps']:.1f} req/s. Sweep rates are fractions {cfg['fractions']} of it, the same absolute
  rates and the same seeded arrivals and texts for every backend.
- Baselines are served one request at a time on a single-worker FIFO executor (a model behind a lock);
  a baseline is not run (recorded as saturated) at rates above {cfg['skip_factor']:.0f}x its own capacity
  (1 / its mean idle service time), and runs extra points at {cfg['baseline_fractions']} of its own capacity, so
  its best goodput within the SLO does not depend on fastserve's grid.
- fastserve variants: `model` (default), `seed`, `aimd` with target_latency_ms={cfg['target_latency_ms']:.0f}
  (each batch's compute aimed at half of it), and `static-X` (min_batch_tokens = max_batch_tokens = X);
  execution={cfg['execution']!r}. Batch sizes come from engine.stats() deltas (mean) and from the futures'
  per-batch compute time (p99); padding is (computed - real) / computed tokens.
- Settling (target d): the bursty run's rate steps from {cfg['bursty_base_fraction']:.1f}x to
  {cfg['bursty_base_fraction'] * cfg['bursty_factor']:.1f}x capacity for {cfg['bursty_high_s']:g} s. The
  reference budget is the median of the budget samples (every 50 ms) over the last second of the high phase; the
  controller has settled at the first sample after the step from which every sample until the end of the high
  phase stays within +-10% of the reference. The settling time is that sample's time minus the step's.
""")
    L.append("## Load sweep\n")
    L.append(sweep_table(res["sweep"], res["capacity_rps"]))
    L.append("")
    for p in plots:
        L.append(f"![{p}]({p})\n")
    L.append("## Bursty load\n")
    b = res["bursty"]
    L.append("Phases: " + ", ".join(f"{ph['rate']:.0f} req/s for {ph['duration_s']:g} s" for ph in b["phases"])
             + f" (the first {b['warmup_s']:g} s unmeasured).\n")
    L.append("| policy | budget before step | reference (last 1 s of high phase) | settling time | p99 low | p99 high | "
             "p99 after | goodput req/s |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in b["runs"].items():
        st = run["settling"]
        ph = run["phase_p99_s"]
        L.append(f"| {name} | {_f(st.get('budget_before_step'), '.0f')} | {_f(st.get('reference_tokens'), '.0f')} | "
                 f"{_f(st.get('settling_s'), '.2f')} s | {_ms(ph['low'])} ms | {_ms(ph['high'])} ms | "
                 f"{_ms(ph['after'])} ms | {run['goodput_rps']:.1f} |")
    L.append("")
    L.append("## Offline throughput\n")
    o = res["offline"]
    L.append(f"{o['n_texts']} texts ({o['real_tokens']} real tokens, {o['mean_tokens_per_text']:.1f} per text), "
             f"best of {o['repeats']} interleaved runs each. fastserve engines: static budget "
             f"{o['static_budget_tokens']} tokens. Model FLOPs over real tokens only: {o['model_gflop_total']:.1f} GFLOP; "
             f"% of peak = model GFLOP/s / measured fp32 matmul peak ({o['peak_gflops']:.0f} GFLOP/s).\n")
    L.append(offline.table(o))
    L.append("")
    (out / "results.md").write_text("\n".join(L) + "\n")


# -------------------------------------------------------------------- json


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist() if x.dtype.kind in "USO" else [_clean(float(v)) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9,1.1,1.3", help="arrival rates, fractions of capacity")
    p.add_argument("--static-budgets", default="128,512,2048")
    p.add_argument("--execution", default="auto", choices=["auto", "packed", "padded"])
    p.add_argument("--target-latency-ms", type=float, default=50.0)
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--min-duration", type=float, default=3.0)
    # Enough requests per point that its p99 is not its slowest request (a
    # p99 of n < 100 requests is their maximum): 500 put five above it.
    p.add_argument("--max-duration", type=float, default=40.0)
    p.add_argument("--min-requests", type=int, default=500)
    p.add_argument("--drain", type=float, default=1.5)
    p.add_argument("--skip-factor", type=float, default=2.0, help="skip a baseline above this multiple of its capacity")
    p.add_argument("--capacity-texts", type=int, default=300)
    p.add_argument("--baseline-fractions", default="0.5,0.7,0.85",
                   help="extra rate points per baseline, fractions of its own capacity")
    p.add_argument("--idle-calls", type=int, default=50)
    p.add_argument("--bursty-base", type=float, default=0.3, help="bursty low rate, fraction of capacity")
    p.add_argument("--bursty-factor", type=float, default=3.0)
    p.add_argument("--bursty-low", type=float, default=3.0)
    p.add_argument("--bursty-high", type=float, default=4.0)
    p.add_argument("--offline-n", type=int, default=320)
    p.add_argument("--offline-repeats", type=int, default=2)
    p.add_argument("--offline-budget", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(common.RESULTS))
    p.add_argument("--quick", action="store_true", help="a short smoke run (a few seconds per stage)")
    args = p.parse_args(argv)
    if args.quick:
        args.fractions, args.static_budgets = "0.1,0.7,1.3", "512"
        args.min_duration = args.max_duration = 1.5
        args.min_requests, args.warmup, args.drain = 0, 0.5, 1.0
        args.capacity_texts, args.idle_calls = 100, 10
        args.bursty_low, args.bursty_high = 1.0, 2.5
        args.offline_n, args.offline_repeats = 96, 1
        args.baseline_fractions = "0.7"
    common.quiet()
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone()
    t_start = time.perf_counter()
    up0 = common.uptime()
    max_load = [common.load_average()[0]]
    other = common.OtherCpu()
    other_stage: dict[str, float] = {}
    fractions = [float(x) for x in args.fractions.split(",")]
    budgets = [int(x) for x in args.static_budgets.split(",") if x]
    slo = args.slo_ms / 1000.0
    log = lambda s: tqdm.write(s, file=sys.stderr)  # noqa: E731

    variants = common.fastserve_variants(budgets, args.execution, args.target_latency_ms)
    bursty_names = [DEFAULT, "fastserve/seed", "fastserve/aimd"]
    args.baseline_fractions = [float(x) for x in args.baseline_fractions.split(",") if x]
    steps = 3 + len(fractions) * (2 + len(variants)) + 2 * len(args.baseline_fractions) + len(bursty_names) + 1
    bar = tqdm(total=steps, desc="setup", unit="step", file=sys.stderr, dynamic_ncols=True)

    path = common.model_path()
    hf = common.HFModel(path, common.max_seq_length(path))
    st = common.STModel(path)
    backends: dict[str, common.Backend] = {
        "transformers": common.SerialBackend("transformers", hf.encode),
        "sentence-transformers": common.SerialBackend("sentence-transformers", st.encode),
    }
    for v in variants:
        backends[v.name] = common.FastServeBackend(v)
    machine = common.machine()
    peak_setup = common.matmul_peak_gflops()
    bar.update(1)
    res: dict[str, Any] = {"config": {
        "fractions": fractions, "static_budgets": budgets, "execution": args.execution,
        "target_latency_ms": args.target_latency_ms, "slo_ms": args.slo_ms, "warmup_s": args.warmup,
        "min_duration_s": args.min_duration, "max_duration_s": args.max_duration, "min_requests": args.min_requests,
        "drain_s": args.drain, "skip_factor": args.skip_factor, "capacity_texts": args.capacity_texts,
        "idle_calls": args.idle_calls, "bursty_base_fraction": args.bursty_base, "bursty_factor": args.bursty_factor,
        "bursty_low_s": args.bursty_low, "bursty_high_s": args.bursty_high,
        "baseline_fractions": args.baseline_fractions, "seed": args.seed, "quick": args.quick,
    }}
    try:
        # 1. idle single-text latency
        bar.set_description("idle latency")
        idle_texts = common.sample_texts(args.idle_calls, args.seed + 7)
        idle = common.idle_latency({name: backends[name] for name in (*BASELINES, DEFAULT)}, idle_texts)
        for name, v in idle.items():
            log(f"idle {name}: median {v['median_s'] * 1000:.1f} ms, mean {v['mean_s'] * 1000:.1f} ms")
        bar.update(1)

        # 2. capacity
        bar.set_description("capacity")
        eng = backends[DEFAULT].engine  # type: ignore[attr-defined]
        cap_texts = common.sample_texts(args.capacity_texts, args.seed + 11)
        eng.embed(cap_texts[:32])
        t0 = time.perf_counter()
        eng.embed(cap_texts)
        capacity = len(cap_texts) / (time.perf_counter() - t0)
        log(f"capacity ({DEFAULT}, backlog of {len(cap_texts)}): {capacity:.1f} req/s")
        bar.update(1)
        base_capacity = {name: 1.0 / idle[name]["mean_s"] for name in BASELINES}

        # 3. sweep
        texts = common.sample_texts(50000, args.seed)
        sweep: dict[str, list[dict[str, Any]]] = {name: [] for name in backends}
        for k, frac in enumerate(fractions):
            rate = frac * capacity
            duration = min(args.max_duration, max(args.min_duration, args.min_requests / rate))
            offsets = load.poisson_arrivals(rate, args.warmup + duration, args.seed * 100 + k)
            for name, b in backends.items():
                bar.set_description(f"load {frac:.1f}x {rate:.0f}/s {name}")
                if name in base_capacity and rate > args.skip_factor * base_capacity[name]:
                    sweep[name].append({"backend": name, "fraction": frac, "offered_rps": rate, "saturated": True,
                                        "capacity_rps": base_capacity[name], "skip_factor": args.skip_factor})
                    bar.update(1)
                    continue
                r = load.run_open_loop(b, offsets, texts, warmup_s=args.warmup, slo_s=slo, drain_s=args.drain,
                                       progress=bar)
                r["fraction"] = frac
                r["nominal_rps"] = rate
                r["latencies_s"] = r["_latency"]
                sweep[name].append(load.public(r))
                max_load.append(common.load_average()[0])
                lat = r["latency_s"]
                log(f"{frac:.1f}x {r['offered_rps']:6.1f}/s {name:<24} thru {r['throughput_rps']:6.1f} "
                    f"good {r['goodput_rps']:6.1f} p50 {_ms(lat['p50']):>8} p99 {_ms(lat['p99']):>10} ms "
                    f"batch {_f((r.get('batches') or {}).get('mean_size'))}")
                bar.update(1)
                time.sleep(0.2)

        other_stage["setup, idle, capacity, sweep"] = other.fraction()
        other_sweep = common.OtherCpu()
        # Extra points for each baseline around its own capacity, so its best
        # goodput within the SLO is not an artefact of a grid set by
        # fastserve's capacity.
        for name in BASELINES:
            for j, bf in enumerate(args.baseline_fractions):
                rate = bf * base_capacity[name]
                duration = min(args.max_duration, max(args.min_duration, args.min_requests / rate))
                offsets = load.poisson_arrivals(rate, args.warmup + duration, args.seed * 100 + 50 + j)
                bar.set_description(f"load {bf:.2f}x of own capacity {rate:.0f}/s {name}")
                r = load.run_open_loop(backends[name], offsets, texts, warmup_s=args.warmup, slo_s=slo,
                                       drain_s=args.drain, progress=bar)
                r["fraction"] = rate / capacity
                r["nominal_rps"] = rate
                r["own_capacity_fraction"] = bf
                r["latencies_s"] = r["_latency"]
                sweep[name].append(load.public(r))
                lat = r["latency_s"]
                log(f"{bf:.2f}x own {r['offered_rps']:6.1f}/s {name:<24} thru {r['throughput_rps']:6.1f} "
                    f"good {r['goodput_rps']:6.1f} p50 {_ms(lat['p50']):>8} p99 {_ms(lat['p99']):>10} ms")
                bar.update(1)
                time.sleep(0.2)
        # 4. bursty
        base = args.bursty_base * capacity
        phases = load.bursty_phases(base, args.bursty_factor, args.bursty_low, args.bursty_high, args.warmup)
        offsets = load.phased_arrivals(phases, args.seed + 99)
        step_up = args.bursty_low  # seconds after warm-up
        bursty: dict[str, Any] = {
            "phases": [{"rate": ph.rate, "duration_s": ph.duration_s} for ph in phases],
            "warmup_s": args.warmup, "step_up_s": step_up, "step_down_s": step_up + args.bursty_high,
            "slo_s": slo, "runs": {}, "arrival_offsets_s": offsets - args.warmup,
        }
        for name in bursty_names:
            bar.set_description(f"bursty {name}")
            r = load.run_open_loop(backends[name], offsets, texts, warmup_s=args.warmup, slo_s=slo,
                                   drain_s=args.drain, sample_budget_every_s=0.05, progress=bar)
            arr, lat = r["_arrivals"], r["_latency"]
            r = load.public(r)
            w = args.warmup
            r["settling"] = settling(r["budget_samples"], w + step_up, w + step_up + args.bursty_high)
            r["settling_down"] = settling(r["budget_samples"], w + step_up + args.bursty_high,
                                          w + 2 * args.bursty_low + args.bursty_high)
            r["arrivals_s"], r["latency_s_all"] = arr, lat
            r["latency_s"] = lat  # per request, for the plot
            r["phase_p99_s"] = {
                "low": load._percentile(lat[arr < step_up], 99),
                "high": load._percentile(lat[(arr >= step_up) & (arr < step_up + args.bursty_high)], 99),
                "after": load._percentile(lat[arr >= step_up + args.bursty_high], 99),
            }
            bursty["runs"][name] = r
            max_load.append(common.load_average()[0])
            stl = r["settling"]
            log(f"bursty {name}: settling {_f(stl.get('settling_s'), '.2f')} s to {_f(stl.get('reference_tokens'), '.0f')} "
                f"tokens; p99 low/high/after {_ms(r['phase_p99_s']['low'])}/{_ms(r['phase_p99_s']['high'])}/"
                f"{_ms(r['phase_p99_s']['after'])} ms")
            bar.update(1)
    finally:
        for b in backends.values():
            b.close()

    other_stage["bursty"] = other_sweep.fraction()
    other_off = common.OtherCpu()
    # 5. offline (its own engines; the load engines are closed)
    bar.set_description("offline")
    off = offline.run_offline(args.offline_n, seed=args.seed + 1, repeats=args.offline_repeats,
                              budget=args.offline_budget, hf=hf, st=st,
                              progress=lambda s: bar.set_description(s))
    bar.update(1)
    bar.close()
    other_stage["offline"] = other_off.fraction()
    # The peak is the best the machine did: a measurement taken while other
    # processes ran is only lower.
    off["peak_gflops_samples"] = [peak_setup, off["peak_gflops"]]
    if peak_setup > off["peak_gflops"]:
        off["peak_gflops"] = peak_setup
        for row in off["rows"]:
            row["fraction_of_peak"] = row["model_gflops"] / peak_setup
        off["ratios"]["fraction_of_peak"] = next(
            r["fraction_of_peak"] for r in off["rows"] if r["method"] == "fastserve packed")
    max_load.append(common.load_average()[0])
    other_all = other.fraction()

    # ------------------------------------------------------------ targets
    best = {name: best_goodput_within_slo(pts, slo) for name, pts in sweep.items()}
    low = {name: [r for r in pts if r["fraction"] <= 0.1 + 1e-9 and not r.get("saturated")] for name, pts in sweep.items()}
    headline: dict[str, Any] = {}
    for name in sweep:
        g, where = best[name]
        headline[name] = {
            "idle_median_s": idle.get(name, {}).get("median_s"),
            "p50_low_load_s": low[name][0]["latency_s"]["p50"] if low[name] else None,
            "best_goodput_rps": g,
            "best_at_offered_rps": where["offered_rps"] if where else None,
        }
    g_fs, g_hf, g_st = best[DEFAULT][0], best["transformers"][0], best["sentence-transformers"][0]
    r_hf = g_fs / g_hf if g_hf else float("inf")
    r_st = g_fs / g_st if g_st else float("inf")
    lines = [
        f"{verdict(r_hf >= 2.5 and r_st >= 2.0)} (a) best goodput within a {args.slo_ms:.0f} ms p99 SLO: {DEFAULT} "
        f"{g_fs:.1f} req/s = {r_hf:.2f}x transformers ({g_hf:.1f}; target >= 2.5x) and {r_st:.2f}x "
        f"sentence-transformers ({g_st:.1f}; target >= 2x)",
    ]
    hf_idle = idle["transformers"]["median_s"]
    if low[DEFAULT]:
        worst = max(r["latency_s"]["p50"] for r in low[DEFAULT])
        lines.append(
            f"{verdict(worst <= hf_idle + 0.001)} (b) p50 at <= 10% load: {DEFAULT} {worst * 1000:.2f} ms vs plain "
            f"transformers idle single-text {hf_idle * 1000:.2f} ms + 1 ms (fastserve idle: "
            f"{idle[DEFAULT]['median_s'] * 1000:.2f} ms)"
        )
    else:
        lines.append("FAIL (b) no rate point at <= 10% of capacity was run")
    statics = [f"fastserve/static-{b}" for b in budgets]
    worst_ratio, worst_at, per_level = float("inf"), None, []
    for i, frac in enumerate(fractions):
        best_static = max(sweep[s][i]["goodput_rps"] for s in statics) if statics else 0.0
        ratio = sweep[DEFAULT][i]["goodput_rps"] / best_static if best_static > 0 else float("inf")
        per_level.append({"fraction": frac, "default": sweep[DEFAULT][i]["goodput_rps"], "best_static": best_static,
                          "ratio": ratio})
        if ratio < worst_ratio:
            worst_ratio, worst_at = ratio, frac
    lines.append(
        f"{verdict(worst_ratio >= 0.95)} (c) {DEFAULT} goodput / best static budget's goodput >= 0.95 at every load: "
        f"worst {worst_ratio:.3f} at {worst_at:.1f}x capacity ("
        + ", ".join(f"{p['fraction']:.1f}x: {p['ratio']:.2f}" for p in per_level) + ")"
    )
    st_d = bursty["runs"][DEFAULT]["settling"]
    s_val = st_d.get("settling_s")
    lines.append(
        f"{verdict(s_val is not None and s_val <= 2.0)} (d) after the bursty run's step up the {DEFAULT} budget "
        f"settles (stays within +-10% of its median over the last 1 s of the high phase) after "
        f"{_f(s_val, '.2f')} s (target <= 2 s; reference {_f(st_d.get('reference_tokens'), '.0f')} tokens)"
    )
    lines += offline.target_lines(off)

    res.update({
        "started": started.isoformat(timespec="seconds"),
        "runtime_s": time.perf_counter() - t_start,
        "uptime_start": up0,
        "uptime_end": common.uptime(),
        "max_load": max(max_load),
        "other_cpu_fraction": other_all,
        "other_cpu_fraction_by_stage": other_stage,
        "noisy": other_all > 0.05 or max(other_stage.values()) > 0.10,
        "machine": machine,
        "idle": idle,
        "capacity_rps": capacity,
        "baseline_capacity_rps": base_capacity,
        "sweep": sweep,
        "bursty": bursty,
        "offline": off,
        "headline": headline,
        "goodput_vs_static": per_level,
        "target_lines": lines,
    })
    plots = plot_sweep(sweep, capacity, slo, out) + [plot_bursty(bursty, out)]
    write_markdown(res, out, plots)
    for r in bursty["runs"].values():
        r.pop("latency_s_all", None)
    (out / "results.json").write_text(json.dumps(_clean(res), indent=1) + "\n")
    print("\n".join(lines))
    print(f"results: {out}/results.md, results.json, {', '.join(plots)}; {res['runtime_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
