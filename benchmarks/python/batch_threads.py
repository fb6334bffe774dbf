"""Threads per batch, A/B in one process: a one-replica CPU engine of
--threads torch threads (float32, static 2,048-token batches) that gives a
batch one thread per replicas.tokens_per_thread() tokens ("per batch", the
default) against the same engine with FASTSERVE_TOKENS_PER_THREAD=0 (every
batch on all the worker's threads, as before), and, for reference, a
one-thread engine. Batches of 1, 2, 4, 8 and 16 corpus texts and one of
about 2,000 tokens: `embed(batch)` per arm, alternating, --rounds rounds,
median and best milliseconds. With --base, the same for a BERT-base-sized
random model (hidden 768, 12 layers) with MiniLM's tokenizer.
Figures: benchmarks/README.md, "Threads per batch".

    python benchmarks/python/batch_threads.py --rounds 9 [--base] --out FILE
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import common
import cpu_dtype

SIZES = (1, 2, 4, 8, 16)


def batches(ids: list[list[int]]) -> list[tuple[str, list[list[int]]]]:
    """(label, token ids) of the batches timed: SIZES texts from the 11th
    text on, and the first texts that fit in cpu_dtype.BUDGET tokens."""
    out = [(f"{n} text{'s' if n > 1 else ''}", ids[10:10 + n]) for n in SIZES]
    offline, tok = [], 0
    for x in ids:
        if tok + len(x) > cpu_dtype.BUDGET:
            break
        offline.append(x)
        tok += len(x)
    return out + [("offline", offline)]


def measure(make: Any, ids: list[list[int]], threads: int, rounds: int) -> list[dict[str, Any]]:
    arms = {}
    with common.env("FASTSERVE_TOKENS_PER_THREAD", "0"):  # read when an engine is built
        arms["all threads"] = make(threads)
    arms["per batch"] = make(threads)
    arms["1 thread"] = make(1)
    rows = []
    try:
        for label, batch in batches(ids):
            times: dict[str, list[float]] = {k: [] for k in arms}
            for e in arms.values():
                e.embed(batch)
            seen = dict(arms["per batch"].stats()["replicas"][0]["batches_by_threads"])
            names = list(arms)
            for r in range(rounds):
                for k in (names if r % 2 == 0 else names[::-1]):
                    t0 = time.perf_counter()
                    arms[k].embed(batch)
                    times[k].append(time.perf_counter() - t0)
            ran = arms["per batch"].stats()["replicas"][0]["batches_by_threads"]
            used = sorted(k for k, v in ran.items() if v > seen.get(k, 0))  # the counts this batch ran on
            row = {"batch": label, "texts": len(batch), "tokens": sum(len(x) for x in batch),
                   "threads_per_batch": used[0] if len(used) == 1 else used,
                   "ms": {k: {"median": statistics.median(v) * 1e3, "best": min(v) * 1e3} for k, v in times.items()}}
            rows.append(row)
            m = row["ms"]
            print(f"{label:>9} ({row['tokens']:>4} tokens, {row['threads_per_batch']} thread(s) per batch): "
                  + ", ".join(f"{k} {v['median']:.1f} ms (best {v['best']:.1f})" for k, v in m.items())
                  + f"; per batch / all threads {m['per batch']['median'] / m['all threads']['median']:.2f}",
                  flush=True)
    finally:
        for e in arms.values():
            e.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2, help="the worker's torch threads (default 2)")
    p.add_argument("--n", type=int, default=400, help="corpus texts to draw the batches from")
    p.add_argument("--base", action="store_true", help="also a BERT-base-sized random model")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    common.quiet()
    import fastserve
    from fastserve import replicas

    texts = cpu_dtype.mixes(args.n, 0)["corpus"]
    res: dict[str, Any] = {"command": "python benchmarks/python/batch_threads.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "machine": common.machine(), "threads": args.threads,
        "tokens_per_thread_at_384": replicas.TOKENS_PER_THREAD, "models": []}

    def minilm(k: int) -> Any:
        return cpu_dtype.static_engine("float32", torch_threads=k, replicas=1)

    models = [("all-MiniLM-L6-v2", minilm)]
    if args.base:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        cfg = AutoConfig.for_model("bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, vocab_size=30522)
        model = AutoModel.from_config(cfg).eval()
        tok = AutoTokenizer.from_pretrained(str(common.model_path()))

        def base(k: int) -> Any:
            return fastserve.Engine(model, tok, policy="static", min_batch_tokens=cpu_dtype.BUDGET,
                                    max_batch_tokens=cpu_dtype.BUDGET, torch_threads=k, replicas=1)

        models.append(("BERT-base-sized (random)", base))
    for name, make in models:
        probe = make(1)
        ids = probe.tokenize(texts)
        probe.close()
        print(f"{name}:", flush=True)
        res["models"].append({"model": name, "rows": measure(make, ids, args.threads, args.rounds)})
    common.write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
