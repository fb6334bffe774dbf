"""dtype="autocast" through the CPU layer kernels, A/B in one process: the
default autocast engine (float32 weights; the fused layers' products in
bfloat16 on copies of the weights made once, attention in the kernel's
bfloat16 path, residual stream and LayerNorms in float32) against the same
engine with FASTSERVE_PACKED_ATTENTION=runs (the model's modules under
torch.autocast, per-run SDPA: how autocast ran before) and a bfloat16 engine
for reference, alternating, `embed` of 400 texts per mix (cpu_dtype.py's
corpus and long-tail mixes), static 2,048-token batches; then each arm's min
cosine against a float32 engine's embeddings, and the bytes of the weight
copies. Figures: benchmarks/README.md, "autocast through the CPU kernels".

    python benchmarks/python/autocast_ab.py --rounds 6 --out ab.json

Exits 2 on a CPU without native bfloat16 (AVX512-BF16 or AMX), where both
arms time emulated products, unless given --emulated.
"""
from __future__ import annotations

import sys

import common
import cpu_dtype


def main(argv: list[str] | None = None) -> int:
    p = common.ab_parser(__doc__)
    p.add_argument("--emulated", action="store_true",
                   help="run where this CPU has no native bfloat16 too (it then times emulated products)")
    args = p.parse_args(argv)
    common.quiet()
    from fastserve.precision import cpu_features

    if not (args.emulated or cpu_features()["native_bf16"]):
        print("needs a CPU with native bfloat16 (AVX512-BF16 or AMX); --emulated runs it anyway", file=sys.stderr)
        return 2
    mixes = cpu_dtype.mixes(args.n, 0)
    out: dict = {"rounds": args.rounds, "n": args.n, "machine": common.machine()}
    engines = {"fused": cpu_dtype.static_engine("autocast")}
    with common.env("FASTSERVE_PACKED_ATTENTION", "runs"):  # read when an engine is built
        engines["modules"] = cpu_dtype.static_engine("autocast")
    engines["bfloat16"] = cpu_dtype.static_engine("bfloat16")
    exact = cpu_dtype.static_engine("float32")
    try:
        if engines["fused"].runner.fused is None or engines["modules"].runner.fused is not None:
            print("the autocast engine's layers do not run through the CPU kernels here "
                  f"(kernels: {engines['fused'].stats()['kernels']})", file=sys.stderr)
            return 2
        out["copies_bytes"] = engines["fused"].stats()["memory"]["gemm_weights_bytes"]
        out["cpu"] = engines["fused"].stats()["cpu"]
        for e in engines.values():
            e.embed(mixes["corpus"][:64])
        for name, texts in mixes.items():
            arms = {k: (lambda e=e, t=texts: e.embed(t)) for k, e in engines.items()}
            out[name] = common.alternate(arms, len(texts), args.rounds)
            want = exact.embed(texts)
            for k, e in engines.items():
                out[name][k]["min_cosine_vs_float32"] = float(common.cosines(e.embed(texts), want).min())
            a, b, c = (out[name][k] for k in ("fused", "modules", "bfloat16"))
            print(f"{name}: texts/s autocast fused median {a['median']:.1f} (best {a['best']:.1f}), autocast "
                  f"modules {b['median']:.1f} ({b['best']:.1f}), bfloat16 {c['median']:.1f} ({c['best']:.1f}); "
                  f"{common.versus(a, b, 'fused / modules')}; "
                  f"min cosine vs float32 fused {a['min_cosine_vs_float32']:.6f}, modules "
                  f"{b['min_cosine_vs_float32']:.6f}, bfloat16 {c['min_cosine_vs_float32']:.6f}", flush=True)
        print(f"bfloat16 copies of the weights: {out['copies_bytes'] / 2**20:.1f} MiB", flush=True)
    finally:
        for e in (*engines.values(), exact):
            e.close()
    common.write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
