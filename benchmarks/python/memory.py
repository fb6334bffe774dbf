"""Resident memory for the same work, each backend in its own process.

Offline: the embedded MiniLM (fp32, CPU) embeds the same corpus texts
(`common.sample_texts`: mean 38 tokens, up to 256) `--passes` times in lists
of `--list` texts. Reported per backend: RSS
after construction, RSS after the work, peak RSS (the kernel's high-water mark,
VmHWM) and texts/s. Backends:

- fastserve with its default batch bound (2048 tokens on a CPU), with and
  without tune_malloc, with the heap's trim threshold capped at `--trim-mib`
  (the free top of the heap returned to the kernel past that size), with 1024
  and 8192 tokens, and with max_batch_memory_mb=8;
- sentence-transformers `encode(batch_size=32)`;
- plain transformers, padded batches of 32 in arrival order, mean pooling.

Under load (`--load-seconds`, 0 to skip): open-loop Poisson arrivals at
`--load-rates` times the engine's offline texts/s of this run, one text per
request (benchmarks/python/load.py's driver), for the default engine and for
sentence-transformers and transformers behind a FIFO: peak RSS, throughput,
goodput within the default SLO and latency percentiles.

Activations (`--activations`): each batch's peak tensor bytes, from torch's
allocation record, against the formula of python/fastserve/footprint.py, for
the packed and the padded runner at several batch sizes.

    python benchmarks/python/memory.py --n 1000 --passes 4 --rounds 1 --activations
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common

# Each child's start: the benchmarks' helpers, and its RSS and peak RSS.
PRELUDE = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import common
common.quiet()

def status():
    out = {{}}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out
"""

CHILD = PRELUDE + r"""
backend, trim = sys.argv[1], int(sys.argv[2])
texts = common.sample_texts({n}, seed=0)
if backend.startswith("fastserve"):
    import fastserve
    kw = {{"max_batch_tokens": int(backend.split()[1])}}
    if "tune_malloc=False" in backend:
        kw["tune_malloc"] = False
    if "tune_onednn=False" in backend:
        kw["tune_onednn"] = False
    if "bfloat16" in backend:
        kw["dtype"] = "bfloat16"
    if "replicas=1" in backend:
        kw["replicas"] = 1
    if "max_batch_memory_mb=" in backend:
        kw["max_batch_memory_mb"] = float(backend.split("max_batch_memory_mb=")[1])
    engine = fastserve.Engine(**kw)
    if backend.endswith("trim cap"):
        import ctypes, ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        assert libc.mallopt(-1, trim << 20) == 1
    run = lambda batch: engine.embed(batch)
elif backend == "sentence-transformers":
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(common.model_path()), device="cpu")
    run = lambda batch: st.encode(batch, batch_size=32)
else:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(common.model_path()))
    model = AutoModel.from_pretrained(str(common.model_path())).eval()
    limit = common.max_seq_length(common.model_path())

    @torch.inference_mode()
    def run(batch):
        for i in range(0, len(batch), 32):
            enc = tok(batch[i:i + 32], padding=True, truncation=True, max_length=limit, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

run(texts[:32])  # warm-up
after_build = status()
t0 = time.perf_counter()
for _ in range({passes}):
    run(texts)
elapsed = time.perf_counter() - t0
after = status()
stats = engine.stats()["batch_tokens"]["max"] if backend.startswith("fastserve") else None
print(json.dumps({{"max_batch_tokens_seen": stats, "rss_built": after_build["VmRSS"], "rss_after": after["VmRSS"], "peak": after["VmHWM"],
                   "texts_per_s": {n} * {passes} / elapsed}}))
"""

BACKENDS = ("fastserve 2048", "fastserve 2048 replicas=1", "fastserve 2048 tune_onednn=False", "fastserve 2048 tune_malloc=False",
            "fastserve 2048 trim cap", "fastserve 1024", "fastserve 8192", "fastserve 2048 max_batch_memory_mb=8",
            "fastserve 2048 bfloat16", "fastserve 2048 bfloat16 tune_onednn=False", "sentence-transformers",
            "transformers")

LOAD_CHILD = PRELUDE + r"""
import load

name, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
backend = load.make_backends([name], "auto", 50.0)[0]
texts = common.sample_texts(2000, seed=1)
backend.submit(texts[0]).result()  # warm-up
built = status()
r = load.run_open_loop(backend, load.poisson_arrivals(rate, seconds, seed=0), texts,
                       warmup_s=1.0, slo_s=0.05, drain_s=2.0)
after = status()
backend.close()
print(json.dumps({{"rss_built": built["VmRSS"], "rss_after": after["VmRSS"], "peak": after["VmHWM"],
                   "offered_rps": r["offered_rps"], "throughput_rps": r["throughput_rps"],
                   "goodput_rps": r["goodput_rps"], "p50_s": r["latency_s"]["p50"], "p99_s": r["latency_s"]["p99"],
                   "failed": r["failed"], "unfinished": r["unfinished"]}}))
"""

LOAD_BACKENDS = ("fastserve/model", "sentence-transformers", "transformers")

ACTIVATIONS_CHILD = r"""
import json, sys
sys.path.insert(0, {bench!r})
import common
common.quiet()
import numpy as np
import fastserve
from fastserve import footprint

texts = common.sample_texts(1500, seed=2)
out = []
for execution in ("packed", "padded"):
    for tokens in (512, 2048, 8192):
        engine = fastserve.Engine(execution=execution, policy="static", min_batch_tokens=tokens,
                                  max_batch_tokens=tokens, tune_malloc=False)
        inner, rows = engine.runner.run, []

        def run(batch, inner=inner, rows=rows):
            res, peak = footprint.measured_peak_bytes(lambda: inner(batch))
            lengths = np.asarray(batch.lengths)
            rows.append((int(lengths.sum()), len(lengths) * int(lengths.max()), peak))
            return res

        engine.runner.run = run
        engine.embed(texts[: tokens // 10])
        per = engine.stats()["memory"]["activations"]["bytes_per_token"]
        engine.close()
        real, padded, peak = max(rows, key=lambda r: r[2])
        counted = real if execution == "packed" else padded
        out.append({{"execution": execution, "budget": tokens, "real_tokens": real, "padded_tokens": padded,
                     "measured_peak": peak, "formula": per * counted, "bytes_per_token": per}})
print(json.dumps(out))
"""


def run_child(backend: str, n: int, passes: int, trim_mib: int) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent), n=n, passes=passes)
    return common.run_python_json(code, backend, str(trim_mib))


def run_load(name: str, rate: float, seconds: float) -> dict:
    return common.run_python_json(LOAD_CHILD.format(bench=str(Path(__file__).parent)), name, str(rate), str(seconds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trim-mib", type=int, default=64)
    ap.add_argument("--load-seconds", type=float, default=15.0)
    ap.add_argument("--load-rates", default="0.5,2", help="multiples of the engine's offline texts/s")
    ap.add_argument("--activations", action="store_true")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help="comma-separated subset of the offline backends (the first fastserve one sets the load's capacity)")
    ap.add_argument("--out", default=str(common.RESULTS / "memory.json"))
    args = ap.parse_args()
    chosen = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
    rows: dict[str, list[dict]] = {b: [] for b in chosen}
    for _ in range(args.rounds):
        for b in chosen:
            rows[b].append(run_child(b, args.n, args.passes, args.trim_mib))
    mib = 1 << 20
    summary = {}
    print(f"{'backend':30s} {'RSS built':>10s} {'RSS after':>10s} {'peak':>10s} {'texts/s':>8s}")
    for b, runs in rows.items():
        s = {k: sorted(r[k] for r in runs)[len(runs) // 2] if k == "texts_per_s" else max(r[k] or 0 for r in runs)
             for k in runs[0]}
        s["rounds"] = runs
        summary[b] = s
        print(f"{b:30s} {s['rss_built'] / mib:9.0f}M {s['rss_after'] / mib:9.0f}M {s['peak'] / mib:9.0f}M "
              f"{s['texts_per_s']:8.1f}")
    result = {"machine": common.machine(), "n": args.n, "passes": args.passes, "trim_mib": args.trim_mib,
              "backends": summary}
    if args.load_seconds > 0:
        capacity = summary[next(b for b in chosen if b.startswith("fastserve"))]["texts_per_s"]
        result["load"] = {"capacity_texts_per_s": capacity, "seconds": args.load_seconds, "rows": []}
        print(f"\nopen loop ({args.load_seconds:g} s per rate; capacity {capacity:.1f} texts/s)")
        print(f"{'backend':24s} {'rate':>6s} {'peak':>8s} {'done/s':>7s} {'good/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s}")
        for x in (float(v) for v in args.load_rates.split(",")):
            for b in LOAD_BACKENDS:
                r = run_load(b, x * capacity, args.load_seconds)
                r.update(backend=b, rate_x=x)
                result["load"]["rows"].append(r)
                print(f"{b:24s} {x:5.1f}x {r['peak'] / mib:7.0f}M {r['throughput_rps']:7.1f} {r['goodput_rps']:7.1f} "
                      f"{r['p50_s'] * 1e3:8.1f} {r['p99_s'] * 1e3:8.1f}")
    if args.activations:
        rows_a = common.run_python_json(ACTIVATIONS_CHILD.format(bench=str(Path(__file__).parent)))
        result["activations"] = rows_a
        print("\nactivations: measured peak of the largest batch against the formula")
        for r in rows_a:
            print(f"{r['execution']:7s} budget {r['budget']:5d}: {r['real_tokens']:5d} real / {r['padded_tokens']:5d} "
                  f"padded tokens, measured {r['measured_peak'] / mib:6.1f} MiB, formula {r['formula'] / mib:6.1f} MiB "
                  f"({r['measured_peak'] / r['formula']:.3f})")
    Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
