"""Q, K and V's projections on a model the engine shares with its caller
(runners.FusedQKV with own=False), one thread, float32, per token count:

- "fused": one product on a fused weight kept beside the model (what an
  engine-owned model runs, its parameters views of that weight);
- "concat": the three weights concatenated afresh for each product (no
  copy kept, the caller's parameters untouched);
- "three": the three modules' products, then their outputs concatenated
  (what a shared model runs);
- "three-out": the three products written into one output by addmm(out=).

Alternating in one process, best of --rounds. Figures: docs/design.md,
"Memory: where it goes" (the fused Q/K/V weight); results in
benchmarks/results/qkv_products_amd/.

    python benchmarks/python/qkv_products.py --hidden 768 --out qkv.json
"""
from __future__ import annotations

import argparse
import sys
import time

import common


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768, help="H: each projection is [H, H] (768: BERT-base, MPNet)")
    p.add_argument("--tokens", default="8,64,512,2048", help="token counts, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(0)
    H = args.hidden
    lins = [torch.nn.Linear(H, H) for _ in range(3)]
    wf = torch.cat([lin.weight for lin in lins]).detach()
    bf = torch.cat([lin.bias for lin in lins]).detach()

    def three_out(h):
        out = torch.empty(h.shape[0], 3 * H)
        for i, lin in enumerate(lins):
            torch.addmm(lin.bias, h, lin.weight.t(), out=out[:, i * H:(i + 1) * H])
        return out

    arms = {
        "fused": lambda h: F.linear(h, wf, bf),
        "concat": lambda h: F.linear(h, torch.cat([lin.weight for lin in lins]), torch.cat([lin.bias for lin in lins])),
        "three": lambda h: torch.cat([lin(h) for lin in lins], dim=-1),
        "three-out": three_out,
    }
    rows = []
    with torch.inference_mode():
        for T in (int(t) for t in args.tokens.split(",")):
            h = torch.randn(T, H)
            want = arms["fused"](h)
            for name, f in arms.items():
                torch.testing.assert_close(f(h), want, atol=1e-3, rtol=1e-4)
            calls = max(3, 2000 // T)
            best = dict.fromkeys(arms, float("inf"))
            for _ in range(args.rounds):
                for name, f in arms.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        f(h)
                    best[name] = min(best[name], (time.perf_counter() - t0) / calls)
            row = {"tokens": T, **{f"{k}_ms": v * 1e3 for k, v in best.items()},
                   **{f"{k}_over_fused": v / best["fused"] for k, v in best.items() if k != "fused"}}
            rows.append(row)
            print(f"T={T:5d}  " + "  ".join(f"{k} {v * 1e3:8.3f} ms" for k, v in best.items()), flush=True)
    common.write_json(args.out, {"command": "python " + " ".join(sys.argv), "machine": common.machine(),
                                 "hidden": H, "threads": 1, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
