"""Resident memory for the same offline work, each backend in its own
process: the embedded MiniLM (fp32, CPU) embeds the same long-tail corpus
texts `--passes` times in lists of `--list` texts. Reported per backend: RSS
after construction, RSS after the work, peak RSS (the kernel's high-water mark,
VmHWM) and texts/s. Backends:

- fastserve with max_batch_tokens=8192 and 2048 (the CPU default; about
  sentence-transformers' batch of 32 corpus texts), with and without
  tune_malloc;
- fastserve at 8192 with a trim threshold of `--trim-mib` (mmap threshold as
  tune_malloc's, but the heap's free top returned to the kernel past that size);
- sentence-transformers `encode(batch_size=32)`;
- plain transformers, padded batches of 32 in arrival order, mean pooling.

    python benchmarks/python/memory.py --n 1000 --passes 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common

CHILD = r"""
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

backend, trim = sys.argv[1], int(sys.argv[2])
texts = common.sample_texts({n}, seed=0)
if backend.startswith("fastserve"):
    import fastserve
    kw = {{"max_batch_tokens": int(backend.split()[1])}}
    if "tune_malloc=False" in backend:
        kw["tune_malloc"] = False
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

BACKENDS = ("fastserve 8192", "fastserve 8192 tune_malloc=False", "fastserve 2048",
            "fastserve 2048 tune_malloc=False", "fastserve 8192 trim cap",
            "sentence-transformers", "transformers")


def run_child(backend: str, n: int, passes: int, trim_mib: int) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent), n=n, passes=passes)
    return common.run_python_json(code, backend, str(trim_mib))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trim-mib", type=int, default=64)
    ap.add_argument("--out", default=str(common.RESULTS / "memory.json"))
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    for _ in range(args.rounds):
        for b in BACKENDS:
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
    Path(args.out).write_text(json.dumps({"machine": common.machine(), "n": args.n, "passes": args.passes,
                                          "trim_mib": args.trim_mib, "backends": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
