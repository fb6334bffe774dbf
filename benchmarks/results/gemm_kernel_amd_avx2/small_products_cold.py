# MiniLM's 24 layer products (six layers of distinct weights, 42.5 MB: more
# than the 32 MiB L3, so each call finds its weights cold) through torch.mm
# (MKL), one thread, at 1-128 rows, best of 10; and one core's read bandwidth.
#   python benchmarks/results/gemm_kernel_amd_avx2/small_products_cold.py
# benchmarks/README.md, "Own float32 GEMM against MKL (AMD EPYC, AVX2)".
import torch, time, numpy as np
torch.set_num_threads(1)
# 6 layers of MiniLM weights, distinct (42 MB), x of M rows
L=6; shapes=[(1152,384),(384,384),(1536,384),(384,1536)]
Ws=[[torch.randn(n,k) for (n,k) in shapes] for _ in range(L)]
big=torch.randn(64*2**20//4)
t=time.perf_counter(); 
for _ in range(5): s=big.sum()
bw=5*big.numel()*4/(time.perf_counter()-t)/1e9
print(f"read bandwidth (sum of 64MB) {bw:.1f} GB/s")
for M in (1,4,16,40,128):
    xs={k: torch.randn(M,k) for k in (384,1536)}
    def once():
        for l in range(L):
            for W in Ws[l]: torch.mm(xs[W.shape[1]], W.t())
    for _ in range(3): once()
    best=1e9
    for _ in range(10):
        t=time.perf_counter(); once(); best=min(best,time.perf_counter()-t)
    fl=2*M*sum(n*k for n,k in shapes)*L
    print(f"M={M}: 24 products {best*1e3:.2f} ms, {fl/best/1e9:.1f} GFLOP/s, weights {42.5e6/best/1e9:.1f} GB/s")
