# MiniLM's product shapes through gemm.Gemm "mm" (MKL) and "kernel" (the own
# GEMM of commit b0baa31, reverted by the next commit), one thread, best of 5;
# with an argument, two threads at once (the two replicas' case).
#   git checkout b0baa31 && pip install --no-build-isolation --no-deps -e . &&
#   python benchmarks/results/gemm_kernel_amd_avx2/products_at_b0baa31.py [c]
# benchmarks/README.md, "Own float32 GEMM against MKL (AMD EPYC, AVX2)".
import torch, time, threading, sys
from fastserve import gemm
torch.set_num_threads(1)
shapes=[(2048,384,1152),(2048,384,384),(2048,384,1536),(2048,1536,384),(300,384,1152),(40,384,1536)]
def bench(fn, reps):
    fn()
    best=1e9
    for _ in range(5):
        t=time.perf_counter()
        for _ in range(reps): fn()
        best=min(best,(time.perf_counter()-t)/reps)
    return best
conc = len(sys.argv)>1
for (m,k,n) in shapes:
    x=torch.randn(m,k); w=torch.randn(n,k)
    gm=gemm.Gemm(w,"mm"); gk=gemm.Gemm(w,"kernel")
    fl=2*m*k*n
    res={}
    for name,g in (("mm",gm),("kernel",gk),("mm2",gm),("kernel2",gk)):
        reps=max(3,int(3e8/fl))
        if not conc:
            res[name]=fl/bench(lambda: g(x),reps)/1e9
        else:
            out=[]
            def run():
                torch.set_num_threads(1)
                out.append(bench(lambda: g(x),reps))
            ts=[threading.Thread(target=run) for _ in range(2)]
            [t.start() for t in ts]; [t.join() for t in ts]
            res[name]=sum(fl/o/1e9 for o in out)/2
    print(m,k,n, " ".join(f"{a} {b:.1f}" for a,b in res.items()), flush=True)
