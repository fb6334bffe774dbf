"""Tokenizing while the model runs: `engine.embed(list)` of N corpus texts
with the list tokenized in pieces of engine.TOKENIZE_PIECE_TEXTS, each queued
once tokenized ("pieces", the default), against the whole list tokenized
before anything is queued ("whole", as before), A/B in one process (the
module constant switched between arms, arms alternating; the same engine).

Two models: "fast model", BERT's layout at 2 layers of 32 with random
weights and the embedded model's tokenizer, whose compute is small beside
tokenizing (what a fast GPU sees of a host's tokenizing); and the embedded
all-MiniLM-L6-v2 in float32, where the model's time dominates on a CPU (the
pieces must not cost it anything). One replica on one torch thread, so that
the tokenizer has the other cores; RAYON_NUM_THREADS (the tokenizer's
threads, read once per process) is recorded. Texts/s per round, the median.
Figures: benchmarks/README.md, "Tokenizing while the model runs".

    RAYON_NUM_THREADS=1 python benchmarks/python/tokenize_overlap.py [--n 4096] [--n-minilm 1024] [--rounds 6] [--out FILE]
"""
from __future__ import annotations

import os
import sys
from typing import Any

import common


def fast_model(path: Any):
    """BERT's layout, 2 layers of 32, random weights (seeded), the vocabulary of `path`'s tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    return BertModel(cfg).eval(), tok


def main(argv: list[str] | None = None) -> int:
    p = common.ab_parser(__doc__)
    p.set_defaults(n=4096)
    p.add_argument("--n-minilm", type=int, default=1024, help="texts per call for MiniLM (its calls take longer)")
    args = p.parse_args(argv)
    common.quiet()
    import fastserve
    from fastserve import engine as engine_mod

    path = common.model_path()
    texts = common.sample_texts(args.n, seed=1)
    piece = engine_mod.TOKENIZE_PIECE_TEXTS
    model, tok = fast_model(path)
    engines = {"fast model": fastserve.Engine(model, tokenizer=tok, max_length=common.max_seq_length(path),
                                              replicas=1, torch_threads=1),
               "MiniLM float32": fastserve.Engine(path, replicas=1, torch_threads=1)}
    counts = {"fast model": args.n, "MiniLM float32": args.n_minilm}
    out: dict[str, Any] = {"n": counts, "rounds": args.rounds, "piece_texts": piece,
                           "rayon_threads": os.environ.get("RAYON_NUM_THREADS"), "results": {}}
    for name, engine in engines.items():
        engine.embed(texts[:256])
        n = counts[name]

        def arm(size: int):
            def run() -> None:
                engine_mod.TOKENIZE_PIECE_TEXTS = size
                try:
                    engine.embed(texts[:n])
                finally:
                    engine_mod.TOKENIZE_PIECE_TEXTS = piece
            return run

        res = common.alternate({"pieces": arm(piece), "whole": arm(10**9)}, n, args.rounds)
        res["pieces / whole"] = res["pieces"]["median"] / res["whole"]["median"]
        out["results"][name] = res
        engine.close()
    result = common.save_result("tokenize_overlap.py", argv, out, None, "")
    common.write_json(args.out, result)
    m = result["machine"]
    print(f"{m.get('Model name')} ({m.get('simd')}), RAYON_NUM_THREADS={out['rayon_threads']}, "
          f"{args.rounds} rounds, median texts/s")
    print("model | texts | pieces | whole | pieces / whole")
    for name, res in out["results"].items():
        print(f"{name} | {counts[name]} | {res['pieces']['median']:.0f} | {res['whole']['median']:.0f} | {res['pieces / whole']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
