import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np, torch
from bench import capture, OLD, NEW, CLS
import tiny_models as tm
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
N = int(os.environ.get("N", 20))
for arch in sys.argv[1].split(","):
    eng, b = capture(arch, 2048, tm.mixed_texts(400, seed=7))
    T = int(np.asarray(b.lengths).sum())
    cls = type(eng.runner)
    o, n = [], []
    with torch.inference_mode():
        for f in (OLD[arch], NEW[arch]):
            cls.forward = f; eng.runner.hidden(b)
        for i in range(N):
            for f, acc in ((OLD[arch], o), (NEW[arch], n)) if i % 2 == 0 else ((NEW[arch], n), (OLD[arch], o)):
                cls.forward = f
                t = time.perf_counter(); eng.runner.hidden(b); acc.append(time.perf_counter() - t)
    ratio = np.median(np.array(n) / np.array(o))
    o5 = sorted(o)[:5]; n5 = sorted(n)[:5]
    print(f"{arch:16s} T={T} old min {min(o)*1e3:.1f} ms (5 best mean {np.mean(o5)*1e3:.1f}) new min {min(n)*1e3:.1f} ms "
          f"(5 best mean {np.mean(n5)*1e3:.1f})  median paired new/old {ratio:.3f}", flush=True)
    cls.forward = NEW[arch]
    eng.close()
