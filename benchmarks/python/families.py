"""Offline throughput per model family: packed against padded against
SentenceTransformer.encode, side by side in one run.

Tiny configs are no measure of speed: each family is a randomly initialised
model of its base size (BERT-base: hidden 768, 12 layers; DistilBERT 6
layers; T5-base's encoder; ModernBERT-base: 22 layers, local window 128),
saved as a sentence-transformers folder (mean pooling, Normalize) on the
MiniLM WordPiece vocabulary, plus the shipped MiniLM itself. Every backend
embeds the same corpus sample, truncated at 256 tokens:

- fastserve packed / padded: `Engine(folder, execution=...)` with a static
  token budget (2048), `embed(list)`;
- sentence-transformers: `SentenceTransformer(folder).encode(list, batch_size=32)`.

Runs interleave (packed, padded, ST; twice); the best of each counts.

    python benchmarks/python/families.py --n 96 [--families bert,mpnet]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import common

FAMILIES = ("minilm", "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "t5", "modernbert")
TARGET = 1.15  # packed / padded, every family that runs packed
MAX_SEQ_LENGTH = 256


def base_config(family: str) -> Any:
    from transformers import AutoConfig, AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(common.model_path()).vocab_size
    bert = dict(vocab_size=vocab, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, pad_token_id=0)
    if family == "bert":
        return AutoConfig.for_model("bert", max_position_embeddings=512, **bert)
    if family in ("roberta", "xlm-roberta", "mpnet"):
        return AutoConfig.for_model(family, max_position_embeddings=514, **bert)
    if family == "distilbert":
        return AutoConfig.for_model("distilbert", vocab_size=vocab, dim=768, n_layers=6, n_heads=12,
                                    hidden_dim=3072, max_position_embeddings=512, pad_token_id=0)
    if family == "t5":  # t5-base's encoder (sentence-t5-base)
        return AutoConfig.for_model("t5", vocab_size=vocab, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                                    num_heads=12, pad_token_id=0, decoder_start_token_id=0)
    if family == "modernbert":  # ModernBERT-base
        return AutoConfig.for_model("modernbert", vocab_size=vocab, hidden_size=768, intermediate_size=1152,
                                    num_hidden_layers=22, num_attention_heads=12, global_attn_every_n_layers=3,
                                    local_attention=128, max_position_embeddings=8192, pad_token_id=0,
                                    cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102)
    raise ValueError(family)


def st_folder(family: str, root: Path) -> Path:
    """A sentence-transformers folder (mean pooling, Normalize) of the family's base size."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel

    if family == "minilm":
        return common.model_path()
    torch.manual_seed(0)
    cfg = base_config(family)
    model = T5EncoderModel(cfg) if family == "t5" else AutoModel.from_config(cfg)
    hf = root / f"{family}-hf"
    model.save_pretrained(hf)
    AutoTokenizer.from_pretrained(common.model_path()).save_pretrained(hf)
    t = Transformer(str(hf), max_seq_length=MAX_SEQ_LENGTH)
    dim = cfg.d_model if family == "t5" else (cfg.dim if family == "distilbert" else cfg.hidden_size)
    out = root / family
    SentenceTransformer(modules=[t, Pooling(dim, pooling_mode="mean"), Normalize()], device="cpu").save(str(out))
    return out


def run_family(family: str, texts: list[str], root: Path, repeats: int, budget: int) -> dict[str, Any]:
    import fastserve
    from sentence_transformers import SentenceTransformer

    folder = st_folder(family, root)
    engines = {ex: fastserve.Engine(str(folder), execution=ex, policy="static", min_batch_tokens=budget,
                                    max_batch_tokens=budget) for ex in ("packed", "padded")}
    st = SentenceTransformer(str(folder), device="cpu")
    methods = {"packed": engines["packed"].embed, "padded": engines["padded"].embed,
               "sentence-transformers": lambda xs: st.encode(xs, batch_size=32)}
    best: dict[str, float] = {}
    outputs: dict[str, np.ndarray] = {}
    try:
        for fn in methods.values():
            fn(texts[:16])  # warm-up
        for _ in range(repeats):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                outputs[name] = fn(texts)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        families = {ex: e.stats()["family"] for ex, e in engines.items()}
    finally:
        for e in engines.values():
            e.close()
    tps = {name: len(texts) / wall for name, wall in best.items()}
    return {
        "family": family,
        "texts_per_s": tps,
        "packed_vs_padded": tps["packed"] / tps["padded"],
        "packed_vs_sentence_transformers": tps["packed"] / tps["sentence-transformers"],
        "max_abs_diff_vs_st": {n: float(np.abs(outputs[n] - outputs["sentence-transformers"]).max())
                               for n in ("packed", "padded")},
        "adapter": families["packed"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| family | packed texts/s | padded texts/s | ST encode texts/s | packed / padded | packed / ST | "
             "max abs diff vs ST (packed) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["texts_per_s"]
        ok = "met" if r["packed_vs_padded"] >= TARGET else "NOT met"
        lines.append(f"| {r['family']} | {t['packed']:.1f} | {t['padded']:.1f} | {t['sentence-transformers']:.1f} | "
                     f"**{r['packed_vs_padded']:.2f}x** ({ok}) | {r['packed_vs_sentence_transformers']:.2f}x | "
                     f"{r['max_abs_diff_vs_st']['packed']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="corpus texts per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget", type=int, default=2048, help="static token budget of both engines")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=common.RESULTS / "families.json")
    args = p.parse_args(argv)
    common.quiet()
    texts = common.sample_texts(args.n, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            rows.append(run_family(family, texts, Path(tmp), args.repeats, args.budget))
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": common.machine(), "n_texts": args.n, "repeats": args.repeats, "budget": args.budget,
              "max_seq_length": MAX_SEQ_LENGTH, "target_packed_vs_padded": TARGET, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
