# Where one text's embed goes: Engine(replicas=1, torch_threads=1), the
# products (gemm.Gemm) and the layer kernels timed per call, 200 calls.
#   python benchmarks/results/gemm_kernel_amd_avx2/one_text_profile.py
# benchmarks/README.md, "Own float32 GEMM against MKL (AMD EPYC, AVX2)".
import time, statistics, collections, torch, numpy as np
from fastserve import Engine, gemm, kernels, runners
tm = collections.defaultdict(float); cnt=collections.Counter()
def wrap(owner, name, key=None):
    f = getattr(owner, name)
    def g(*a, **k):
        t=time.perf_counter(); r=f(*a, **k); tm[key or name]+=time.perf_counter()-t; cnt[key or name]+=1; return r
    setattr(owner, name, g)
wrap(gemm.Gemm, "__call__", "gemm")
for n in ("attention","bias_gelu_","add_layer_norm_"): wrap(kernels, n)
wrap(runners.PackedRunner, "run", "runner")
e = Engine(replicas=1, torch_threads=1)
text = "A man is playing a guitar on the street while people walk by."
for _ in range(20): e.embed([text])
tm.clear(); cnt.clear()
N=200; ts=[]
for _ in range(N):
    t=time.perf_counter(); e.embed([text]); ts.append(time.perf_counter()-t)
print("embed p50 %.2f ms mean %.2f" % (1e3*statistics.median(ts), 1e3*sum(ts)/N))
for k,v in sorted(tm.items(), key=lambda x:-x[1]): print(f"  {k}: {1e3*v/N:.2f} ms per call of embed ({cnt[k]//N} calls)")
e.close()
