"""Rerank and long-input throughput, side by side in one run.

Rerank: query-passage pairs built from the shipped corpus (a query is the
first words of one corpus text, its passages other corpus texts), scored by
sentence-transformers' `CrossEncoder.predict(pairs, batch_size=32)` and by
`fastserve.Engine(task="rerank")`: all pairs in one `score()` call, and
`rerank()` calls from concurrent callers (one query and its passages each),
whose pairs share the engine's batches. The model is all-MiniLM-L6-v2's
encoder with a seeded random one-logit head, saved as a CrossEncoder folder
(max_length 512): the compute of a MiniLM-L6 cross-encoder, no download. The
scores of both are compared (max absolute difference).

Long inputs: corpus prose joined into texts of about `--long-factor` times
the model's 256-token limit, embedded with truncate="right" (the first 256
tokens) and truncate="chunk" (every token, in windows): texts/s and tokens
computed per text, what the full text costs.

    python benchmarks/python/tasks_bench.py --queries 32 --passages 16 --long 48
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import common


def cross_encoder_folder(out: Path) -> Path:
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(str(common.model_path()), num_labels=1)
    raw = out / "raw"
    m.save_pretrained(raw)
    AutoTokenizer.from_pretrained(str(common.model_path())).save_pretrained(raw)
    CrossEncoder(str(raw), max_length=512).save(str(out / "ce"))
    return out / "ce"


def rerank_queries(n_queries: int, passages: int, seed: int) -> list[tuple[str, list[str]]]:
    texts = common.corpus()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_queries):
        q = " ".join(texts[int(rng.integers(len(texts)))].split()[:10])
        out.append((q, [texts[int(i)] for i in rng.integers(len(texts), size=passages)]))
    return out


def best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_rerank(folder: Path, queries, repeats: int) -> dict[str, Any]:
    from sentence_transformers import CrossEncoder

    import fastserve

    pairs = [(q, d) for q, docs in queries for d in docs]
    ce = CrossEncoder(str(folder))
    engine = fastserve.Engine(str(folder), task="rerank")
    engine.score(pairs[:64])  # warm-up
    ce.predict(pairs[:64], batch_size=32, show_progress_bar=False)
    pool = cf.ThreadPoolExecutor(len(queries))

    def callers():
        return list(pool.map(lambda qd: engine.rerank(qd[0], qd[1]), queries))

    runs: dict[str, list[float]] = {"cross_encoder_predict": [], "fastserve_score": [], "fastserve_rerank_callers": []}
    outs: dict[str, Any] = {}
    for _ in range(repeats):  # interleaved: drift on a shared machine hits all alike
        for name, fn in (("cross_encoder_predict", lambda: ce.predict(pairs, batch_size=32, show_progress_bar=False)),
                         ("fastserve_score", lambda: engine.score(pairs)),
                         ("fastserve_rerank_callers", callers)):
            t, outs[name] = best(fn, 1)
            runs[name].append(t)
    pool.shutdown()
    tokens = sum(i.computed_tokens for i in engine.tokenize_pairs(pairs).infos)
    engine.close()
    diff = float(np.abs(outs["fastserve_score"] - outs["cross_encoder_predict"]).max())
    rows = {name: {"seconds": min(ts), "pairs_per_s": len(pairs) / min(ts)} for name, ts in runs.items()}
    base = rows["cross_encoder_predict"]["pairs_per_s"]
    for r in rows.values():
        r["vs_cross_encoder"] = r["pairs_per_s"] / base
    return {"pairs": len(pairs), "queries": len(queries), "tokens": tokens, "max_abs_score_diff": diff,
            "rows": rows}


def long_texts(n: int, factor: float, seed: int) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(common.model_path()))
    texts = common.corpus()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        parts, count = [], 0
        while count < factor * 256:
            t = texts[int(rng.integers(len(texts)))]
            parts.append(t)
            count += len(tok.tokenize(t))
        out.append(" ".join(parts))
    return out


def bench_long(texts: list[str], overlap: int, repeats: int) -> dict[str, Any]:
    import fastserve

    engines = {"truncate_right": fastserve.Engine(truncate="right"),
               "chunk": fastserve.Engine(truncate="chunk", chunk_overlap=overlap)}
    for e in engines.values():
        e.embed(texts[:4])
    runs: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(repeats):
        for name, e in engines.items():
            runs[name].append(best(lambda: e.embed(texts), 1)[0])
    rows = {}
    for name, e in engines.items():
        infos = [f.info for f in e.submit_many(texts)]
        rows[name] = {"seconds": min(runs[name]), "texts_per_s": len(texts) / min(runs[name]),
                      "computed_tokens_per_text": float(np.mean([i.computed_tokens for i in infos])),
                      "windows_per_text": float(np.mean([i.chunks for i in infos]))}
        rows[name]["computed_tokens_per_s"] = rows[name]["computed_tokens_per_text"] * rows[name]["texts_per_s"]
        e.close()
    full = float(np.mean([i.tokens for i in infos]))
    return {"texts": len(texts), "full_tokens_per_text": full, "chunk_overlap": overlap, "rows": rows,
            "chunk_vs_truncate_texts_per_s": rows["chunk"]["texts_per_s"] / rows["truncate_right"]["texts_per_s"]}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    r, lg = result["rerank"], result["long"]
    lines = [
        "# Rerank and long inputs", "",
        f"Command: `{result['command']}`", "",
        f"Machine: {m.get('Model name')}, {m.get('usable_cores')} usable cores, flags {m.get('simd')}, "
        f"torch {m.get('torch')} ({m.get('torch_threads')} threads), transformers {m.get('transformers')}, "
        f"sentence-transformers {m.get('sentence_transformers')}; commit {m.get('git_commit')}.", "",
        f"## Rerank: {r['pairs']} query-passage pairs ({r['queries']} queries), {r['tokens']} tokens", "",
        "| method | s | pairs/s | vs CrossEncoder.predict |", "|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['pairs_per_s']:.0f} | {row['vs_cross_encoder']:.2f}x |")
    lines += ["", f"Largest score difference from CrossEncoder.predict: {r['max_abs_score_diff']:.1e}.", "",
              f"## Long inputs: {lg['texts']} texts of {lg['full_tokens_per_text']:.0f} tokens on average "
              f"(limit 256, chunk_overlap {lg['chunk_overlap']})", "",
              "| truncate | s | texts/s | windows/text | tokens computed/text | tokens/s |", "|---|---|---|---|---|---|"]
    for name, row in lg["rows"].items():
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['texts_per_s']:.1f} | {row['windows_per_text']:.1f} | "
                     f"{row['computed_tokens_per_text']:.0f} | {row['computed_tokens_per_s']:.0f} |")
    lines += ["", f"Chunked texts/s relative to truncated: {lg['chunk_vs_truncate_texts_per_s']:.2f}x."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--passages", type=int, default=16, help="passages per query")
    p.add_argument("--long", type=int, default=48, help="long texts")
    p.add_argument("--long-factor", type=float, default=4.0, help="long texts' length in units of the 256 limit")
    p.add_argument("--overlap", type=int, default=32, help="chunk_overlap")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write tasks.json and tasks.md here")
    args = p.parse_args(argv)
    common.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        folder = cross_encoder_folder(Path(tmp))
        rerank = bench_rerank(folder, rerank_queries(args.queries, args.passages, args.seed), args.repeats)
    long = bench_long(long_texts(args.long, args.long_factor, args.seed), args.overlap, args.repeats)
    result = {"command": "python benchmarks/python/tasks_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": common.machine(), "rerank": rerank, "long": long}
    print(markdown(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tasks.json").write_text(json.dumps(result, indent=1))
        (args.out / "tasks.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
