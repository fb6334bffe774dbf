"""Does each process-wide setting the Engine makes (fastserve/process.py) pay
for itself? Each variant runs in a fresh process, alternating (A B A B ...),
on the same corpus texts, with the embedded MiniLM:

- malloc: Engine(tune_malloc=True) against tune_malloc=False: minor page
  faults per pass and texts per CPU-second (CPU time is less noisy than wall
  time on a shared machine), plus wall texts/s;
- threads: torch_threads = usable cores (the default) against torch's own
  default count (torch_threads=0).

    python benchmarks/python/process_settings.py --n 400 --rounds 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {bench!r})
import common
import fastserve
kw = json.loads(sys.argv[1])
texts = common.sample_texts({n}, seed=0)
with fastserve.Engine(policy="static", max_batch_tokens=2048, **kw) as engine:
    engine.embed(texts[:64])  # warm-up
    out = []
    for _ in range({passes}):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, w0 = time.process_time(), time.perf_counter()
        engine.embed(texts)
        c1, w1 = time.process_time(), time.perf_counter()
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out.append({{"faults": f1 - f0, "cpu_s": c1 - c0, "wall_s": w1 - w0}})
    print(json.dumps({{"passes": out, "process": engine.stats()["process"]}}))
"""

VARIANTS = {
    "malloc": {"tuned": {"tune_malloc": True}, "untuned": {"tune_malloc": False}},
    "threads": {"usable cores": {}, "torch default": {"torch_threads": 0}},
}


def run_child(kw: dict, n: int, passes: int) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent), n=n, passes=passes)
    return common.run_python_json(code, json.dumps(kw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=sorted(VARIANTS), default=None)
    ap.add_argument("--out", default=str(common.RESULTS / "process_settings.json"))
    args = ap.parse_args()
    results: dict = {"machine": common.machine(), "n": args.n, "passes": args.passes, "settings": {}}
    for name, variants in VARIANTS.items():
        if args.only and name != args.only:
            continue
        rows: dict[str, list] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for label, kw in variants.items():
                rows[label].append(run_child(kw, args.n, args.passes))
        summary = {}
        for label, runs in rows.items():
            passes = [p for r in runs for p in r["passes"]]
            summary[label] = {
                "faults_per_pass": sorted(p["faults"] for p in passes)[len(passes) // 2],
                "texts_per_cpu_s": args.n * len(passes) / sum(p["cpu_s"] for p in passes),
                "texts_per_s": args.n * len(passes) / sum(p["wall_s"] for p in passes),
                "texts_per_cpu_s_by_round": [round(args.n * len(r["passes"]) / sum(p["cpu_s"] for p in r["passes"]), 1)
                                             for r in runs],
                "process": runs[-1]["process"],
            }
            print(f"{name:8s} {label:14s} faults/pass {summary[label]['faults_per_pass']:>8,d}  "
                  f"texts/CPU-s {summary[label]['texts_per_cpu_s']:7.1f} {summary[label]['texts_per_cpu_s_by_round']}  "
                  f"texts/s {summary[label]['texts_per_s']:7.1f}")
        results["settings"][name] = summary
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
