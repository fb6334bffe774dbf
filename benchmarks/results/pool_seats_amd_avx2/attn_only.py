import json, sys, time
import numpy as np, torch
from fastserve import kernels
torch.manual_seed(0)
lengths = [int(x) for x in np.random.default_rng(0).integers(8, 120, 64)]
cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
qkv = torch.randn(sum(lengths), 3, 12, 32)
out = {}
for threads in (1, 2):
    ts = []
    for _ in range(15):
        t0 = time.perf_counter()
        for _ in range(20):
            kernels.attention(qkv, cu, threads=threads)
        ts.append(time.perf_counter() - t0)
    out[f"t{threads}_best_ms"] = round(min(ts) * 1e3, 1)
    out[f"t{threads}_median_ms"] = round(float(np.median(ts)) * 1e3, 1)
print(sys.argv[1], json.dumps(out))
