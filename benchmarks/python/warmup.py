"""A fresh default Engine's first calls with and without its warm-up
(Engine(warmup=...)): `one`, four single-text calls in turn; `big`, three
embed calls of 120 corpus texts. Run one process per case, alternating:

    for r in 1 2 3; do for m in cold warm; do for w in one big; do
      python benchmarks/python/warmup.py $m $w; done; done; done
"""

import sys
import time

import fastserve
from fastserve import corpus

texts = list(corpus.texts())
mode = sys.argv[1]
t = time.perf_counter(); e = fastserve.Engine(warmup=(mode == "warm")); c = time.perf_counter() - t
what = sys.argv[2]
if what == "one":
    ds = []
    for i in range(4):
        s = time.perf_counter(); e.embed(f"one short request number {i}"); ds.append(time.perf_counter() - s)
else:
    big = texts[:120]; ds = []
    for i in range(3):
        s = time.perf_counter(); e.embed(big); ds.append(time.perf_counter() - s)
print(f"{mode} {what}: construct {c:.2f} s, warmup_s {[round(x, 3) if x else x for x in e.stats()['warmup_s']]}, calls ms {[round(d * 1e3) for d in ds]}", flush=True)
e.close()
