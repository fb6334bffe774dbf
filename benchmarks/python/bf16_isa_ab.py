"""The CPU kernels' AVX512-BF16 path through a bfloat16 engine, A/B in one
process: the default engine (kernel_isa "avx512_bf16": bfloat16 stores by
vcvtneps2bf16, and attention's products in bfloat16 by vdpbf16ps) against
the same engine under kernels.cpu_isa_cap("avx512") (the same kernels in
float32 arithmetic with the integer rounding), alternating, `embed` of 400
texts per mix (cpu_dtype.py's corpus and long-tail mixes), static 2,048-token
batches; then each arm's min cosine against a float32 engine's embeddings.
Needs a CPU with AVX512-BF16. Figures: benchmarks/README.md, "AMD EPYC with
AVX-512 and AVX512-BF16" (this script was bf16_stores_ab.py before the
attention's bfloat16 arithmetic) and "bfloat16 attention in bfloat16
arithmetic".

    python benchmarks/python/bf16_isa_ab.py --rounds 6 --out ab.json
"""
from __future__ import annotations

import sys

import common
import cpu_dtype


def main(argv: list[str] | None = None) -> int:
    p = common.ab_parser(__doc__)
    args = p.parse_args(argv)
    common.quiet()
    from fastserve import kernels

    if kernels.cpu_isa() != "avx512_bf16":
        print(f"needs a CPU with AVX-512F and AVX512-BF16; the kernels here run {kernels.cpu_isa()}", file=sys.stderr)
        return 2
    mixes = cpu_dtype.mixes(args.n, 0)
    out: dict = {"rounds": args.rounds, "n": args.n}
    with cpu_dtype.static_engine("bfloat16") as engine:
        engine.embed(mixes["corpus"][:64])
        for name, texts in mixes.items():
            def arm(isa: str, texts: list[str] = texts):
                def run() -> None:
                    with kernels.cpu_isa_cap(isa):
                        engine.embed(texts)
                return run
            out[name] = common.alternate({isa: arm(isa) for isa in ("avx512_bf16", "avx512")}, len(texts),
                                         args.rounds)
            a, b = out[name]["avx512_bf16"], out[name]["avx512"]
            print(f"{name}: texts/s on the AVX512-BF16 path median {a['median']:.1f} (best {a['best']:.1f}), "
                  f"on the AVX-512 path {b['median']:.1f} ({b['best']:.1f}); "
                  f"{common.versus(a, b, 'AVX512-BF16 / AVX-512')}", flush=True)
    # Accuracy: each arm against float32 (the same texts, one process).
    with cpu_dtype.static_engine("float32") as exact, cpu_dtype.static_engine("bfloat16") as engine:
        for name, texts in mixes.items():
            want = exact.embed(texts)
            for isa in ("avx512_bf16", "avx512"):
                with kernels.cpu_isa_cap(isa):
                    got = engine.embed(texts)
                out[name][isa]["min_cosine_vs_float32"] = float(common.cosines(got, want).min())
            print(f"{name}: min cosine against float32 on the AVX512-BF16 path "
                  f"{out[name]['avx512_bf16']['min_cosine_vs_float32']:.6f}, on the AVX-512 path "
                  f"{out[name]['avx512']['min_cosine_vs_float32']:.6f}", flush=True)
    common.write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
