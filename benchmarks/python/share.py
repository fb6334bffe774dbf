"""Sharing a short queue between replicas (SchedulerConfig.balance_workers):
the default CPU engine (two one-thread replicas) with it on and off, in one
process, the two engines taking turns (the order alternating per round).

1. offline: `embed(list)` of 400 texts, on the corpus and on cpu_dtype.py's
   long-tail mix (every tenth text joined to 256 tokens), at a static
   2,048-token budget as cpu_dtype.py runs it. Per run: wall time; the tail
   gap (the last batch's end on one replica to the last on the other, what
   sharing closes); utilisation (the replicas' model time over replicas x
   wall).
2. online (--rates): load.py's open loop (Poisson arrivals of single corpus
   texts, SLO 100 ms) against the default engine (policy "model") with it on
   and off: goodput, share within the SLO, p50 and p99.

    python benchmarks/python/share.py --rounds 10 --rates 30,60,90 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common
import cpu_dtype
import load
import overload

BUDGET = 2048


def engines(kwargs: dict[str, Any]) -> dict[str, Any]:
    import fastserve

    out = {"on": fastserve.Engine(common.model_path(), **kwargs)}
    with overload.scheduler_config(balance_workers=False):
        out["off"] = fastserve.Engine(common.model_path(), **kwargs)
    return out


def offline(texts_by_mix: dict[str, list[str]], rounds: int) -> dict[str, Any]:
    es = engines({"execution": "packed", "policy": "static", "min_batch_tokens": BUDGET,
                  "max_batch_tokens": BUDGET})
    ends: dict[tuple[str, int], float] = {}
    for name, e in es.items():  # each replica's last batch end, per run
        for r in e._replicas:
            def record(size, seconds, failed=False, orig=r.record, key=(name, r.index)):
                ends[key] = time.perf_counter()
                return orig(size, seconds, failed)
            r.record = record
    res: dict[str, Any] = {}
    try:
        for e in es.values():
            e.embed(texts_by_mix["corpus"][:64])
        for mix, texts in texts_by_mix.items():
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in es}
            for i in range(rounds):
                for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    e = es[name]
                    busy0 = sum(r.busy_s for r in e._replicas)
                    ends.clear()
                    t0 = time.perf_counter()
                    e.embed(texts)
                    wall = time.perf_counter() - t0
                    last = [v for (n, _), v in ends.items() if n == name]
                    runs[name].append({"wall_s": wall, "tail_gap_s": max(last) - min(last),
                                       "utilisation": (sum(r.busy_s for r in e._replicas) - busy0)
                                       / (len(e._replicas) * wall)})
            res[mix] = {"runs": runs, "off_over_on": [b["wall_s"] / a["wall_s"]
                                                       for a, b in zip(runs["on"], runs["off"])]}
        res["balanced_batches"] = {name: e.stats()["balanced"] for name, e in es.items()}
    finally:
        for e in es.values():
            e.close()
    return res


def online(rates: list[float], rounds: int, texts: list[str]) -> list[dict[str, Any]]:
    v = {x.name: x for x in common.fastserve_variants([], "auto", 50.0)}["fastserve/model"]
    backends = {"on": common.FastServeBackend(common.FastServeVariant("on", v.kwargs))}
    with overload.scheduler_config(balance_workers=False):
        backends["off"] = common.FastServeBackend(common.FastServeVariant("off", v.kwargs))
    rows = []
    try:
        for b in backends.values():
            b.engine.embed(texts[:64])
        for rate in rates:
            for i in range(rounds):
                offsets = load.poisson_arrivals(rate, 5.0, int(rate * 1000) + i)
                for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    r = load.run_open_loop(backends[name], offsets, texts, warmup_s=1.0, slo_s=0.1, drain_s=2.0)
                    rows.append({"balance": name, "rate": rate, "round": i, "goodput_rps": r["goodput_rps"],
                                 "slo_met_fraction": r["slo_met_fraction"], "p50_s": r["latency_s"]["p50"],
                                 "p99_s": r["latency_s"]["p99"], "mean_batch_size": r["batches"]["mean_size"]})
                    print(rows[-1], file=sys.stderr, flush=True)
    finally:
        for b in backends.values():
            b.close()
    return rows


def markdown(res: dict[str, Any]) -> str:
    med = statistics.median
    lines = [f"Machine: {res['machine'].get('Model name')}, {res['machine'].get('usable_cores')} cores, "
             f"flags: {res['machine'].get('simd')}; commit {res['machine'].get('git_commit')}.", f"Command: `{res['command']}`", "",
             "| mix | wall on / off (median s) | off / on per round (median, range) | tail gap on / off (median s) "
             "| utilisation on / off (median) |", "|---|---:|---:|---:|---:|"]
    for mix in ("corpus", "long-tail"):
        r = res["offline"][mix]
        on, off = r["runs"]["on"], r["runs"]["off"]
        ratio = r["off_over_on"]
        lines.append(f"| {mix} | {med(x['wall_s'] for x in on):.3f} / {med(x['wall_s'] for x in off):.3f} | "
                     f"{med(ratio):.3f} ({min(ratio):.2f}-{max(ratio):.2f}) | "
                     f"{med(x['tail_gap_s'] for x in on):.3f} / {med(x['tail_gap_s'] for x in off):.3f} | "
                     f"{med(x['utilisation'] for x in on):.3f} / {med(x['utilisation'] for x in off):.3f} |")
    lines.append(f"\nBatches cut to their share: {res['offline']['balanced_batches']}.")
    if res.get("online"):
        lines += ["", "| offered req/s | goodput on / off (median) | within SLO on / off | p50 on / off (ms) "
                  "| p99 on / off (ms) |", "|---:|---:|---:|---:|---:|"]
        for rate in sorted({r["rate"] for r in res["online"]}):
            by = {k: [r for r in res["online"] if r["rate"] == rate and r["balance"] == k] for k in ("on", "off")}
            f = lambda k, key, s=1.0: med(r[key] for r in by[k]) * s  # noqa: E731
            lines.append(f"| {rate:g} | {f('on', 'goodput_rps'):.1f} / {f('off', 'goodput_rps'):.1f} | "
                         f"{f('on', 'slo_met_fraction'):.3f} / {f('off', 'slo_met_fraction'):.3f} | "
                         f"{f('on', 'p50_s', 1e3):.1f} / {f('off', 'p50_s', 1e3):.1f} | "
                         f"{f('on', 'p99_s', 1e3):.1f} / {f('off', 'p99_s', 1e3):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="texts per offline mix")
    p.add_argument("--rounds", type=int, default=10, help="runs per setting (alternating)")
    p.add_argument("--rates", default="", help="comma-separated arrival rates for the online part (none: skip)")
    p.add_argument("--online-rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(common.RESULTS), help="folder for share.json and share.md")
    args = p.parse_args(argv)
    common.quiet()
    mixes = cpu_dtype.mixes(args.n, args.seed)
    res: dict[str, Any] = {"command": "python benchmarks/python/share.py " + " ".join(sys.argv[1:] if argv is None else argv),
                           "machine": common.machine()}
    res["offline"] = offline(mixes, args.rounds)
    if args.rates:
        res["online"] = online([float(x) for x in args.rates.split(",")], args.online_rounds,
                               common.sample_texts(20000, 0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "share.json").write_text(json.dumps(res, indent=1, default=float))
    md = markdown(res)
    (out / "share.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
