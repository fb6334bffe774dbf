"""The CPU kernels' pool before and after its seat limit (6f93865): the
attention kernel and the fused epilogues on 2 threads, and the default
engine's offline rate on 400 corpus texts. Run once per build (the extension
differs), alternating builds by hand; prints one JSON line.

    python benchmarks/results/pool_seats_amd_avx2/pool_ab.py LABEL
"""
import json
import sys
import time

import numpy as np
import torch

import fastserve
from fastserve import kernels
from fastserve.corpus import texts as corpus


def best(fn, repeats=7):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


torch.manual_seed(0)
lengths = [int(x) for x in np.random.default_rng(0).integers(8, 120, 64)]  # a corpus-like batch
cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
qkv = torch.randn(sum(lengths), 3, 12, 32)
x, b = torch.randn(sum(lengths), 1536), torch.randn(1536)
attn = best(lambda: [kernels.attention(qkv, cu, threads=2) for _ in range(20)])
gelu = best(lambda: [kernels.bias_gelu_(x, b, threads=2) for _ in range(20)])
texts = list(corpus()[:400])
with fastserve.Engine() as e:
    e.embed(texts[:32])
    rate = len(texts) / best(lambda: e.embed(texts), repeats=3)
print(json.dumps({"label": sys.argv[1], "attention_x20_ms": round(attn * 1e3, 2),
                  "bias_gelu_x20_ms": round(gelu * 1e3, 2), "engine_texts_per_s": round(rate, 1)}))
