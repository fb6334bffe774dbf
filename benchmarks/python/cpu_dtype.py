"""CPU dtypes side by side in one run: the embedded MiniLM offline in float32,
bfloat16 and float32-under-bfloat16-autocast, against plain transformers in
length-sorted padded batches (float32 and bfloat16) and
SentenceTransformer.encode, with the fp32 and bf16 matmul peaks measured in
the same run, on two text mixes:

- corpus: texts drawn from the shipped corpus (fastserve.corpus);
- long-tail: the same, with every tenth text replaced by several corpus texts
  joined (truncated at the model's 256 tokens), so a few long texts carry a
  large share of the tokens.

Rows:
- fastserve <dtype>: `Engine(dtype=..., execution="packed", policy="static",
  max_batch_tokens=2048).embed(list)`, tokenization included;
- fastserve modules float32: the same float32 engine built with
  FASTSERVE_PACKED_ATTENTION=runs, the path before fastserve's CPU layer
  kernels (the model's modules, torch's attention per run of equal lengths);
- fastserve modules bfloat16: the bfloat16 engine built with
  FASTSERVE_PACKED_ATTENTION=runs, torch's bfloat16 path through the
  modules, against "fastserve bfloat16", its layers through fastserve's CPU
  kernels in bfloat16 (the default);
- fastserve AVX2 kernels float32, fastserve AVX2 kernels bfloat16 (only on a
  CPU with AVX-512F): the same engines with the kernels capped at their AVX2
  path (kernels.cpu_isa_cap), against their AVX-512 path in the same run;
- fastserve AVX-512 kernels bfloat16 (only on a CPU with AVX512-BF16): the
  bfloat16 engine with the kernels capped at "avx512": bfloat16 stores
  without vcvtneps2bf16 and attention's products in float32 arithmetic
  instead of vdpbf16ps;
- fastserve mm float32 (only where float32 runs its products through oneDNN
  by default, python/fastserve/gemm.py): the float32 engine built with
  FASTSERVE_CPU_GEMM=mm, its products through torch.mm (MKL);
- transformers sorted <dtype>: AutoModel in that dtype on batches of 32 texts
  sorted by token length, tokenized and padded beforehand (not timed), mean
  pooling and normalisation in float32;
- sentence-transformers: `encode(list, batch_size=32)` in float32.

Model GFLOP/s counts real tokens only (common.model_flops) and is compared
with the matmul peak of the dtype the row computes in. min cosine is against
the fastserve float32 rows of the same texts.

--emulated also times fastserve float32 against bfloat16 and float16 in a
subprocess with oneDNN and ATen capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2,
ATEN_CPU_CAPABILITY=avx2): what a CPU without native bfloat16 or float16 sees.
On a CPU without native bfloat16 (AVX2 only) the cap changes nothing: it
times bf16 against fp32 as that CPU runs them.
--threads times a batch at 1 and 2 torch threads (an Engine per count:
the worker sets its own) for online batch sizes (1 and 8 texts) and an
offline batch (2048 tokens).

The fastserve float32 row runs with torch's oneDNN switch off, as a
float32 engine alone in its process does (process.onednn_for): the bf16
engines alive here would otherwise leave it on.

    python benchmarks/python/cpu_dtype.py --n 400 --repeats 2 --emulated --threads
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import common

TARGETS = {
    "fp32_vs_sentence_transformers": 2.0,
    "fp32_fraction_of_peak": 0.85,
    "bf16_vs_transformers_sorted_bf16": 1.3,
    "bf16_vs_own_fp32": 3.0,
    "min_cosine": 0.999,
}
DTYPES = ("float32", "bfloat16", "autocast")
BUDGET = 2048


def matmul_peak(dtype: torch.dtype, sizes: Sequence[int] = (1024, 2048), repeats: int = 4) -> float:
    """Best GFLOP/s of square torch.mm in `dtype` at the process's thread count."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def long_tail(n: int, seed: int, tokenizer, max_length: int) -> list[str]:
    """n corpus texts, every tenth replaced by corpus texts joined until it
    reaches max_length tokens."""
    texts = common.sample_texts(n, seed)
    pool = common.sample_texts(20 * n, seed + 1)
    k = 0
    for i in range(0, n, 10):
        parts: list[str] = []
        while len(tokenizer(" ".join(parts))["input_ids"]) < max_length:
            parts.append(pool[k % len(pool)])
            k += 1
        texts[i] = " ".join(parts)
    return texts


def mixes(n: int, seed: int, tokenizer=None) -> dict[str, list[str]]:
    """The two text mixes: n corpus texts, and the long-tail mix of the
    same n (long_tail) by the model's tokenizer unless one is given."""
    path = common.model_path()
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return {"corpus": common.sample_texts(n, seed),
            "long-tail": long_tail(n, seed, tokenizer, common.max_seq_length(path))}


def static_engine(dtype: str, **kw: Any):
    """A packed engine of the embedded model in `dtype` with static
    BUDGET-token batches, as every fastserve row here runs (kw: more Engine
    arguments)."""
    import fastserve

    return fastserve.Engine(dtype=dtype, execution="packed", policy="static", min_batch_tokens=BUDGET,
                            max_batch_tokens=BUDGET, **kw)


class SortedHF:
    """Plain transformers on length-sorted padded batches, tokenized beforehand."""

    def __init__(self, path, max_length: int, dtype: torch.dtype, batch: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=dtype).eval()
        self.max_length, self.batch = max_length, batch

    def prepare(self, texts: Sequence[str]) -> tuple[list, np.ndarray]:
        lengths = [len(x) for x in self.tok(list(texts), truncation=True, max_length=self.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        batches = []
        for i in range(0, len(order), self.batch):
            sel = [texts[j] for j in order[i : i + self.batch]]
            batches.append(self.tok(sel, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt"))
        return batches, order

    def run(self, prepared: tuple[list, np.ndarray]) -> np.ndarray:
        batches, order = prepared
        outs = []
        with torch.inference_mode():
            for x in batches:
                h = self.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state.float()
                m = x["attention_mask"].unsqueeze(-1).float()
                outs.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), p=2, dim=-1).numpy())
        out = np.empty((len(order), outs[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(outs)
        return out


def alone_fp32(engine, texts: list[str]) -> np.ndarray:
    """A float32 engine's embed as it runs with no bf16/fp16 engine in the
    process: its batches with torch's oneDNN switch off. process.onednn_for
    leaves the switch on while such an engine is alive (it needs oneDNN), and
    the bfloat16 and autocast engines here are; with it on, fp32 GELU runs in
    oneDNN instead of ATen."""
    with torch.backends.mkldnn.flags(enabled=False):
        return engine.embed(texts)


def run_mix(name: str, texts: list[str], engines: dict, hf: dict, st, flops: float, real_tokens: int,
            peaks: dict[str, float], repeats: int, progress: Callable[[str], None]) -> dict[str, Any]:
    prepared = {k: m.prepare(texts) for k, m in hf.items()}
    methods: dict[str, Callable[[], np.ndarray]] = {f"fastserve {d}": (lambda e=e: e.embed(texts))
                                                    for d, e in engines.items()}
    for d in ("float32", "modules float32", "mm float32"):
        if d in engines:
            methods[f"fastserve {d}"] = lambda e=engines[d]: alone_fp32(e, texts)
    from fastserve import kernels

    if kernels.cpu_isa() in ("avx512", "avx512_bf16"):  # the kernels' AVX-512 path against their AVX2 one
        def capped(isa: str, fn: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
            def run() -> np.ndarray:
                with kernels.cpu_isa_cap(isa):
                    return fn()
            return run
        methods["fastserve AVX2 kernels float32"] = capped("avx2", methods["fastserve float32"])
        methods["fastserve AVX2 kernels bfloat16"] = capped("avx2", methods["fastserve bfloat16"])
        if kernels.cpu_isa() == "avx512_bf16":
            methods["fastserve AVX-512 kernels bfloat16"] = capped("avx512", methods["fastserve bfloat16"])
    for k, m in hf.items():
        methods[f"transformers sorted {k}"] = lambda m=m, p=prepared[k]: m.run(p)
    methods["sentence-transformers float32"] = lambda: st.encode(texts, batch_size=32)
    best: dict[str, float] = {}
    outs: dict[str, np.ndarray] = {}
    for rep in range(repeats):
        for m, fn in methods.items():
            progress(f"{name}: {m} ({rep + 1}/{repeats})")
            t0 = time.perf_counter()
            outs[m] = fn()
            best[m] = min(best.get(m, float("inf")), time.perf_counter() - t0)
    ref = outs["fastserve float32"]
    rows = []
    for m, wall in best.items():
        computes = "float32" if m.endswith("float32") else "bfloat16"
        cos = common.cosines(outs[m], ref)
        gflops = flops / wall / 1e9
        rows.append({"method": m, "wall_s": wall, "texts_per_s": len(texts) / wall,
                     "real_tokens_per_s": real_tokens / wall, "model_gflops": gflops,
                     "peak_dtype": computes, "fraction_of_peak": gflops / peaks[computes],
                     "min_cosine_vs_fastserve_fp32": float(cos.min())})
    by = {r["method"]: r["texts_per_s"] for r in rows}
    frac = {r["method"]: r["fraction_of_peak"] for r in rows}
    cosines = {r["method"]: r["min_cosine_vs_fastserve_fp32"] for r in rows}
    ratios = {
        "fp32_vs_sentence_transformers": by["fastserve float32"] / by["sentence-transformers float32"],
        "fp32_vs_transformers_sorted_fp32": by["fastserve float32"] / by["transformers sorted float32"],
        "fp32_fraction_of_peak": frac["fastserve float32"],
        "fp32_kernels_vs_modules": by["fastserve float32"] / by["fastserve modules float32"],
        "bf16_kernels_vs_modules": by["fastserve bfloat16"] / by["fastserve modules bfloat16"],
        "min_cosine_bf16_modules": cosines["fastserve modules bfloat16"],
        "bf16_vs_transformers_sorted_bf16": by["fastserve bfloat16"] / by["transformers sorted bfloat16"],
        "bf16_vs_own_fp32": by["fastserve bfloat16"] / by["fastserve float32"],
        "bf16_fraction_of_peak": frac["fastserve bfloat16"],
        "autocast_vs_own_fp32": by["fastserve autocast"] / by["fastserve float32"],
        "min_cosine_bf16": cosines["fastserve bfloat16"],
        "min_cosine_autocast": cosines["fastserve autocast"],
    }
    if "fastserve AVX2 kernels float32" in by:
        ratios["fp32_kernels_avx512_vs_avx2"] = by["fastserve float32"] / by["fastserve AVX2 kernels float32"]
        ratios["bf16_kernels_avx512_vs_avx2"] = by["fastserve bfloat16"] / by["fastserve AVX2 kernels bfloat16"]
    if "fastserve mm float32" in by:
        ratios["fp32_onednn_vs_mm"] = by["fastserve float32"] / by["fastserve mm float32"]
    if "fastserve AVX-512 kernels bfloat16" in by:
        ratios["bf16_kernels_bf16_stores"] = by["fastserve bfloat16"] / by["fastserve AVX-512 kernels bfloat16"]
    return {"mix": name, "n_texts": len(texts), "real_tokens": real_tokens,
            "mean_tokens_per_text": real_tokens / len(texts), "max_tokens": None,
            "model_gflop_total": flops / 1e9, "rows": rows, "ratios": ratios}


EMULATED_CHILD = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import common, fastserve
common.quiet()
texts = common.sample_texts({n}, seed=3)
out = {{}}
engines = {{d: fastserve.Engine(dtype=d, execution="packed", policy="static", min_batch_tokens=2048,
                               max_batch_tokens=2048) for d in ("float32", "bfloat16", "float16")}}
for e in engines.values():
    e.embed(texts[:32])
best = {{}}
import torch
for rep in range(2):
    for d, e in engines.items():
        # float32 as it runs alone in a process: oneDNN off (see alone_fp32)
        with torch.backends.mkldnn.flags(enabled=d != "float32"):
            t0 = time.perf_counter(); e.embed(texts); best[d] = min(best.get(d, 1e9), time.perf_counter() - t0)
out = {{"texts_per_s": {{d: len(texts) / w for d, w in best.items()}},
        "cpu": engines["bfloat16"].stats()["cpu"]}}
out["bf16_slowdown_vs_fp32"] = best["bfloat16"] / best["float32"]
out["fp16_slowdown_vs_fp32"] = best["float16"] / best["float32"]
print(json.dumps(out))
"""


def emulated(n: int) -> dict[str, Any]:
    """fp32 vs bf16 and fp16 with oneDNN and ATen capped to AVX2, in a fresh process."""
    import subprocess

    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    code = EMULATED_CHILD.format(bench=str(common.REPO / "benchmarks" / "python"), n=n)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def threads(texts: list[str], repeats: int = 5) -> list[dict[str, Any]]:
    """Per-batch time (`embed(batch)`: runner + scheduler) at 1 and 2 torch
    threads, for batches of 1 and 8 texts (online) and one of ~2048 tokens
    (offline). Each count is its own `Engine(torch_threads=k)`: torch's
    intra-op thread count is per thread, and each worker sets its own when it
    starts (replicas.Replica.enter), so torch.set_num_threads in the caller's
    thread would not reach it. The two engines of a dtype alternate, best of
    `repeats`; the float32 pair runs with no bfloat16 engine alive, as a
    float32 engine serves alone (oneDNN off per batch, process.onednn_for)."""
    rows = []
    before = torch.get_num_threads()
    for d in ("float32", "bfloat16"):
        engines = {k: static_engine(d, torch_threads=k) for k in (1, 2)}
        try:
            ids = engines[1].tokenize(texts)
            offline, tok = [], 0
            for x in ids:
                if tok + len(x) > BUDGET:
                    break
                offline.append(x)
                tok += len(x)
            for label, batch in (("1 text", ids[:1]), ("8 texts", ids[1:9]), (f"offline {tok} tokens", offline)):
                best = {}
                for e in engines.values():
                    e.embed(batch)
                for _ in range(repeats):
                    for k, e in engines.items():
                        t0 = time.perf_counter()
                        e.embed(batch)
                        best[k] = min(best.get(k, float("inf")), time.perf_counter() - t0)
                rows += [{"dtype": d, "batch": label, "threads": k, "ms": best[k] * 1e3} for k in engines]
        finally:
            for e in engines.values():
                e.close()
    torch.set_num_threads(before)
    return rows


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"Machine: {m.get('Model name')}, {m.get('usable_cores')} cores, flags: {m.get('simd')}; "
             f"torch {m.get('torch')} (ATen capability {res['cpu']['capability']}), "
             f"transformers {m.get('transformers')}, commit {m.get('git_commit')}.",
             f"Command: `{res['command']}`", "",
             f"Matmul peak (square torch.mm, best, {m.get('torch_threads')} threads): "
             f"float32 {res['peaks']['float32']:.0f} GFLOP/s, bfloat16 {res['peaks']['bfloat16']:.0f} GFLOP/s"
             + ("." if res["cpu"]["native_bf16"] is not False else
                " (emulated: this CPU has no native bfloat16, so the bfloat16 rows' fractions of it mean little)."),
             "fastserve float32 runs with torch's oneDNN switch off, as a float32 engine alone in its process does"
             + ("; the layers' products (stats()[\"gemm\"]): " + ", ".join(f"{d} {how}" for d, how in res["gemm"].items())
                if "gemm" in res else "") + ".", ""]
    for mix in res["mixes"]:
        lines += [f"**{mix['mix']}**: {mix['n_texts']} texts, {mix['real_tokens']} real tokens "
                  f"(mean {mix['mean_tokens_per_text']:.1f}), {mix['model_gflop_total']:.1f} GFLOP.", "",
                  "| Method | texts/s | real tokens/s | model GFLOP/s | % of its dtype's peak | min cosine vs fastserve fp32 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in mix["rows"]:
            lines.append(f"| {r['method']} | {r['texts_per_s']:.1f} | {r['real_tokens_per_s']:.0f} | "
                         f"{r['model_gflops']:.0f} | {100 * r['fraction_of_peak']:.0f}% ({r['peak_dtype']}) | "
                         f"{r['min_cosine_vs_fastserve_fp32']:.6f} |")
        lines.append("")
        r, t = mix["ratios"], TARGETS
        for key, label in (("fp32_vs_sentence_transformers", "fp32 / sentence-transformers"),
                           ("bf16_vs_transformers_sorted_bf16", "bf16 / transformers sorted bf16"),
                           ("bf16_vs_own_fp32", "bf16 / own fp32")):
            lines.append(f"- {'PASS' if r[key] >= t[key] else 'FAIL'} {label} = {r[key]:.2f}x (target >= {t[key]}x)")
        lines.append(f"- {'PASS' if r['fp32_fraction_of_peak'] >= t['fp32_fraction_of_peak'] else 'FAIL'} "
                     f"fp32 at {100 * r['fp32_fraction_of_peak']:.0f}% of the fp32 matmul peak (target >= 85%); "
                     f"bf16 at {100 * r['bf16_fraction_of_peak']:.0f}% of the bf16 peak")
        for d in ("bf16", "autocast"):
            c = r[f"min_cosine_{d}"]
            lines.append(f"- {'PASS' if c >= t['min_cosine'] else 'FAIL'} min cosine {d} vs fp32 = {c:.6f} (target >= 0.999)")
        lines.append(f"- fp32 / transformers sorted fp32 = {r['fp32_vs_transformers_sorted_fp32']:.2f}x; "
                     f"autocast / own fp32 = {r['autocast_vs_own_fp32']:.2f}x; fp32 through the CPU layer "
                     f"kernels / through the modules = {r['fp32_kernels_vs_modules']:.2f}x; bf16 through the "
                     f"kernels / through the modules = {r['bf16_kernels_vs_modules']:.2f}x (the modules' min cosine vs fp32 "
                     f"{r['min_cosine_bf16_modules']:.6f})")
        if "fp32_kernels_avx512_vs_avx2" in r:
            lines.append(f"- the CPU kernels on AVX-512 / on AVX2: float32 {r['fp32_kernels_avx512_vs_avx2']:.2f}x, "
                         f"bfloat16 {r['bf16_kernels_avx512_vs_avx2']:.2f}x")
        if "fp32_onednn_vs_mm" in r:
            lines.append(f"- float32 products through oneDNN (the default here) / through torch.mm: "
                         f"{r['fp32_onednn_vs_mm']:.2f}x")
        if "bf16_kernels_bf16_stores" in r:
            lines.append(f"- bfloat16 kernels on their AVX512-BF16 path / on their AVX-512 path: "
                         f"{r['bf16_kernels_bf16_stores']:.2f}x")
        lines.append("")
    if res.get("emulated", {}).get("error"):
        lines += [f"bfloat16 without native support: the AVX2-capped run failed: {res['emulated']['error']}", ""]
    elif res.get("emulated"):
        e = res["emulated"]
        lines += [f"**bfloat16 and float16 without native support** (ONEDNN_MAX_CPU_ISA=AVX2, "
                  f"ATEN_CPU_CAPABILITY=avx2, {e['n_texts']} corpus texts): fp32 {e['texts_per_s']['float32']:.1f} "
                  f"texts/s, bf16 {e['texts_per_s']['bfloat16']:.1f} texts/s: bf16 takes "
                  f"{e['bf16_slowdown_vs_fp32']:.2f}x fp32's time"
                  + (f"; fp16 {e['texts_per_s']['float16']:.1f} texts/s, {e['fp16_slowdown_vs_fp32']:.2f}x"
                     if "float16" in e["texts_per_s"] else "") + ".", ""]
    if res.get("threads"):
        lines += ["**Threads per batch** (`Engine(torch_threads=k).embed(batch)`: runner + scheduler, the two "
                  "engines alternating, best of 5):", "",
                  "| dtype | batch | 1 thread (ms) | 2 threads (ms) | 2 / 1 |", "|---|---|---:|---:|---:|"]
        rows = res["threads"]
        for d in ("float32", "bfloat16"):
            for label in dict.fromkeys(r["batch"] for r in rows if r["dtype"] == d):
                one = next(r["ms"] for r in rows if (r["dtype"], r["batch"], r["threads"]) == (d, label, 1))
                two = next(r["ms"] for r in rows if (r["dtype"], r["batch"], r["threads"]) == (d, label, 2))
                lines.append(f"| {d} | {label} | {one:.1f} | {two:.1f} | {two / one:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="texts per mix")
    p.add_argument("--repeats", type=int, default=2, help="runs per method (interleaved); the best counts")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--emulated", action="store_true", help="also time bf16 and fp16 with oneDNN/ATen capped to AVX2")
    p.add_argument("--threads", action="store_true", help="also time batches at 1 and 2 torch threads")
    p.add_argument("--out", default=str(common.RESULTS), help="folder for cpu_dtype.json and cpu_dtype.md")
    args = p.parse_args(argv)
    common.quiet()
    import warnings

    import fastserve

    progress = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    path = common.model_path()
    max_length = common.max_seq_length(path)
    engines = {d: static_engine(d) for d in DTYPES}
    variants = [("modules float32", "float32", "FASTSERVE_PACKED_ATTENTION", "runs"),
                ("modules bfloat16", "bfloat16", "FASTSERVE_PACKED_ATTENTION", "runs")]
    if engines["float32"].stats()["gemm"] == "onednn":
        variants.append(("mm float32", "float32", "FASTSERVE_CPU_GEMM", "mm"))
    for name, dtype, var, value in variants:
        with common.env(var, value):  # read when an engine is built
            engines[name] = static_engine(dtype)
    hf = {k: SortedHF(path, max_length, getattr(torch, k)) for k in ("float32", "bfloat16")}
    st = common.STModel(path)
    tok = hf["float32"].tok
    by_mix = mixes(args.n, args.seed, tok)
    warm = by_mix["corpus"][:64]
    for e in engines.values():
        e.embed(warm)
    for m in hf.values():
        m.run(m.prepare(warm))
    st.encode(warm)
    native = fastserve.precision.cpu_features()["native_bf16"] is not False
    # Emulated bf16 square products run at ~1 GFLOP/s: one size, fewer repeats.
    bf16_peak = (lambda: matmul_peak(torch.bfloat16)) if native else \
        (lambda: matmul_peak(torch.bfloat16, sizes=(1024,), repeats=2))
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": bf16_peak()}
    res: dict[str, Any] = {"command": "python benchmarks/python/cpu_dtype.py " + " ".join(sys.argv[1:] if argv is None else argv),
                           "machine": common.machine(), "cpu": fastserve.precision.cpu_features(),
                           "gemm": {d: engines[d].stats()["gemm"] for d in DTYPES}, "targets": TARGETS, "mixes": []}
    try:
        for name, texts in by_mix.items():
            lengths = [len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
            mix = run_mix(name, texts, engines, hf, st, common.model_flops(hf["float32"].model, lengths),
                          int(sum(lengths)), peaks, args.repeats, progress)
            mix["max_tokens"] = max(lengths)
            res["mixes"].append(mix)
        # the peaks again after the work: the larger of the two counts
        peaks2 = {"float32": matmul_peak(torch.float32), "bfloat16": bf16_peak()}
        for k in peaks:
            if peaks2[k] > peaks[k]:
                for mix in res["mixes"]:
                    for r in mix["rows"]:
                        if r["peak_dtype"] == k:
                            r["fraction_of_peak"] = r["model_gflops"] / peaks2[k]
                    mix["ratios"]["fp32_fraction_of_peak" if k == "float32" else "bf16_fraction_of_peak"] = next(
                        r["fraction_of_peak"] for r in mix["rows"]
                        if r["method"] == ("fastserve float32" if k == "float32" else "fastserve bfloat16"))
                peaks[k] = peaks2[k]
        res["peaks"] = peaks
    finally:
        for e in engines.values():
            e.close()
    if args.threads:
        progress("threads")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res["threads"] = threads(by_mix["corpus"])
    if args.emulated:
        progress("emulated bf16 (AVX2)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res["emulated"] = {"n_texts": 128, **emulated(128)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_dtype.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(args.out, "cpu_dtype.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
