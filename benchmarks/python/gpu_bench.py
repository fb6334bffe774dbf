"""GPU benchmark, side by side in one run on one CUDA device:

1. Kernels: pack / unpack / segment_pool / gather against a device-to-device
   copy of the same bytes (bench_kernels.py on CUDA).
2. Latency: one request at a time of exactly --tokens tokens, end to end
   in-process: fastserve with CUDA graphs, without, as before (padded-copy
   attention, no graphs), and plain transformers called directly.
3. Offline: embed N corpus texts as fast as possible. Plain transformers
   (padded batches of 64, in arrival order and sorted by length),
   sentence-transformers `encode(batch_size=64)`, and fastserve
   `engine.embed(list)`: the default engine (with and without CUDA graphs,
   with the list tokenized whole before anything is queued, and as before),
   the tokenizing alone (`engine.tokenize`), and static token budgets with packed execution (each
   attention method) and padded execution. Then a set with about 50%
   padding in transformers' batches (lengths uniform in 8-248 tokens).
4. Online, closed loop: C client threads each send one text at a time (C = 1
   is the low-load latency); plain transformers one request at a time behind a
   lock against the default fastserve engine. Latency from submit to result.

Models: `bert-base` is BERT-base's architecture (12 layers, 768 wide) with
random weights (seeded) and the bert-base-uncased vocabulary that
all-MiniLM-L6-v2 ships: the speed of BERT-base without a download. `minilm`
is the real all-MiniLM-L6-v2. Every backend runs the same dtype (default
float16) and truncates at the same length.

    python benchmarks/python/gpu_bench.py [--models bert-base minilm] [--dtype float16] [--n 4096] [--tokens 128]
                                          [--seconds 3] [--concurrency 1 16 64] [--out benchmarks/results]

Writes gpu.md and gpu.json to --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import bench_kernels
import common

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BATCH = 64


DEVICE = "cuda"  # --device cpu: a dry run of the script on a machine without a GPU


def _sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def gpu_info() -> dict[str, Any]:
    if DEVICE == "cpu":
        return {"gpu": "none (dry run on the CPU)", "torch": torch.__version__, "cpu_cores": os.cpu_count()}
    p = torch.cuda.get_device_properties(0)
    info = {
        "gpu": p.name,
        "gpu_memory_gb": round(p.total_memory / 2**30, 1),
        "multiprocessors": p.multi_processor_count,
        "capability": f"{p.major}.{p.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
    }
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import transformers

    info["transformers"] = transformers.__version__
    try:
        import flash_attn  # noqa: F401

        info["flash_attn"] = True
    except ImportError:
        info["flash_attn"] = False
    return info


def bert_base_folder(root: Path) -> Path:
    """BERT-base's architecture with seeded random weights, the MiniLM
    tokenizer (bert-base-uncased's vocabulary), and a sentence-transformers
    mean-pooling config so every backend loads the same folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = root / "bert-base-random"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    BertModel(BertConfig(), add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(common.model_path())).save_pretrained(folder)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 768, "pooling_mode_mean_tokens": True}))
    return folder


def make_engine(path: Path, dtype: torch.dtype, max_len: int, attention: str | None = None, graphs: bool = True,
                epilogues: bool = True, **kw: Any) -> Any:
    """A fastserve Engine over `path`, with packed attention forced where
    `attention` is given, and CUDA graphs and the CUDA epilogue kernels on
    or off (all read when the runner is made)."""
    import fastserve

    env = {"FASTSERVE_PACKED_ATTENTION": attention, "FASTSERVE_CUDA_GRAPHS": None if graphs else "0",
           "FASTSERVE_CUDA_EPILOGUES": None if epilogues else "0"}
    old = {k: os.environ.pop(k, None) for k in env}
    try:
        os.environ.update({k: v for k, v in env.items() if v is not None})
        return fastserve.Engine(str(path), device=DEVICE, dtype=str(dtype).removeprefix("torch."),
                                max_length=max_len, **kw)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def latency(path: Path, dtype: torch.dtype, tokens: int, requests: int,
            log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One request at a time of exactly `tokens` tokens, end to end in-process
    (submit to result, tokenization included): fastserve with CUDA graphs,
    without, and as before (padded-copy attention, no graphs), and plain
    transformers, interleaved in rounds."""
    max_len = common.max_seq_length(path)
    hf = common.HFModel(path, max_len, DEVICE, dtype)
    text = common.text_of(hf.tokenizer, tokens)
    engines = {"fastserve default (CUDA graphs)": make_engine(path, dtype, max_len),
               "fastserve, no CUDA graphs": make_engine(path, dtype, max_len, graphs=False),
               "fastserve, padded-copy attention, no graphs (before)": make_engine(path, dtype, max_len, "pad",
                                                                                   graphs=False, epilogues=False)}
    calls: dict[str, Callable[[], Any]] = {name: (lambda e=e: e.embed(text)) for name, e in engines.items()}
    calls["transformers (direct call)"] = lambda: hf.encode([text])
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():  # warm-up: capture, allocator, autotuning
        for _ in range(20):
            fn()
    rounds = 5
    for _ in range(rounds):
        for name, fn in calls.items():
            for _ in range(requests // rounds):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    rows = []
    for name, t in times.items():
        a = np.array(t) * 1e3
        row = {"method": name, "tokens": tokens, "requests": len(a), "p50_ms": float(np.percentile(a, 50)),
               "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}
        e = engines.get(name)
        if e is not None:
            row["cuda_graphs"] = e.stats()["cuda_graphs"]
            row.update(breakdown(e, text))
        rows.append(row)
        log(f"  {name}: p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms; in the runner "
            f"{row.get('runner_ms', float('nan')):.3f} ms, of it the graph on the GPU "
            f"{row.get('replay_gpu_ms') or float('nan'):.3f} ms")
        if "submit_ms" in row:
            log(f"    submit {row['submit_ms']:.3f}, queue {row['queue_ms']:.3f}, compute {row['compute_ms']:.3f} "
                f"(runner {row['runner_ms']:.3f}), hand-offs and the rest {row['handoff_ms']:.3f} ms")
    for e in engines.values():
        e.close()
    del hf
    return rows


def breakdown(engine: Any, text: str, calls: int = 200) -> dict[str, Any]:
    """Where one request's time goes (medians): the caller's submit
    (tokenizing, queueing), the wait in the queue until the worker assembled
    its batch, the worker's compute (the runner in the batch's contexts), of
    it the runner.run per batch (batch to rows on the host: inputs copied,
    the model, pooling, the copy back), the rest (the hand-offs between the
    threads, the result's copy), and, where a CUDA graph ran it, the graph's
    replay alone on the GPU (CUDA events, back to back)."""
    runner = engine.runner
    run, spent = runner.run, []
    parts: list[tuple[float, float, float, float]] = []

    def timed(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return run(*a, **kw)
        finally:
            spent.append(time.perf_counter() - t0)

    runner.run = timed
    try:
        for _ in range(calls):
            t0 = time.perf_counter()
            fut = engine.submit(text)
            t1 = time.perf_counter()
            fut.result()
            t2 = time.perf_counter()
            parts.append((t1 - t0, fut.timing["queue_s"], fut.timing["inference_s"], t2 - t0))
    finally:
        runner.run = run
    submit, queued, compute, total = (float(np.median(c) * 1e3) for c in zip(*parts))
    out: dict[str, Any] = {"runner_ms": float(np.median(spent) * 1e3), "replay_gpu_ms": None,
                           "submit_ms": submit, "queue_ms": queued, "compute_ms": compute, "total_ms": total,
                           "handoff_ms": total - submit - queued - compute}
    graphs = getattr(runner, "graphs", None)
    if graphs is not None and graphs._graphs and DEVICE != "cpu":
        g = next(reversed(graphs._graphs.values()))  # the last used: this text's shape
        with graphs.lock:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            g.graph.replay()
            start.record()
            for _ in range(calls):
                g.graph.replay()
            end.record()
            end.synchronize()
        out["replay_gpu_ms"] = start.elapsed_time(end) / calls
        out["graph_shape"] = [g.tokens, g.slots]
    return out


def padded_half(path: Path, dtype: torch.dtype, n: int, repeats: int,
                log: Callable[[str], None]) -> dict[str, Any]:
    """Offline on a set whose padded batches (64, arrival order) are about
    half padding: token lengths drawn uniformly from [8, 248]. Plain
    transformers padded in arrival order against the default engine."""
    max_len = common.max_seq_length(path)
    hf = common.HFModel(path, max_len, DEVICE, dtype)
    rng = np.random.default_rng(3)
    pool = {L: common.text_of(hf.tokenizer, int(L), seed=int(L)) for L in range(8, 249, 8)}
    lengths = rng.choice(sorted(pool), size=n)
    texts = [pool[int(L)] for L in lengths]
    padded = sum(int(lengths[i : i + BATCH].max()) * len(lengths[i : i + BATCH]) for i in range(0, n, BATCH))
    padding = 1 - int(lengths.sum()) / padded
    eng = make_engine(path, dtype, max_len)
    methods = {"transformers padded, arrival order": lambda: [hf.encode(texts[i : i + BATCH])
                                                              for i in range(0, n, BATCH)],
               "fastserve default": lambda: eng.embed(texts)}
    best: dict[str, float] = {}
    for fn in methods.values():
        fn()
    for _ in range(repeats):
        for name, fn in methods.items():
            best[name] = min(best.get(name, float("inf")), _sync_call(fn))
    base = best["transformers padded, arrival order"]
    rows = [{"method": k, "texts_per_s": n / v, "vs_transformers": base / v} for k, v in best.items()]
    for r in rows:
        log(f"  {r['method']}: {r['texts_per_s']:.0f} texts/s ({r['vs_transformers']:.2f}x)")
    log(f"  padding in transformers' batches: {padding:.1%}")
    eng.close()
    del hf
    return {"padding": padding, "rows": rows}


def _sync_call(fn: Callable[[], Any]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def offline(path: Path, dtype: torch.dtype, n: int, repeats: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    max_len = common.max_seq_length(path)
    texts = common.sample_texts(n, seed=1)
    hf = common.HFModel(path, max_len, DEVICE, dtype)
    lengths = [len(x) for x in hf.tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
    order = np.argsort(lengths)

    def hf_batches(ts: Sequence[str]) -> None:
        for i in range(0, len(ts), BATCH):
            hf.encode(ts[i : i + BATCH])

    methods: dict[str, Callable[[], Any]] = {
        "transformers padded, arrival order": lambda: hf_batches(texts),
        "transformers padded, sorted by length": lambda: hf_batches([texts[i] for i in order]),
    }
    st = common.STModel(path, DEVICE, dtype)
    methods["sentence-transformers encode"] = lambda: st.encode(texts, batch_size=BATCH)
    engines: dict[str, Any] = {}

    def engine(name: str, attention: str | None, graphs: bool = True, **kw: Any) -> None:
        engines[name] = make_engine(path, dtype, max_len, attention, graphs, **kw)
        methods[name] = lambda e=engines[name]: e.embed(texts)

    static = dict(policy="static", max_batch_tokens=16384, max_batch_size=256)
    engine("fastserve default (adaptive, packed)", None)
    default = engines["fastserve default (adaptive, packed)"]
    # Where the call's time goes: the tokenizing alone, and the default engine
    # with the list tokenized whole before anything is queued (as before
    # engine.TOKENIZE_PIECE_TEXTS).
    methods["tokenizing alone (engine.tokenize)"] = lambda: default.tokenize(texts)
    methods["fastserve default, list tokenized whole first (before)"] = lambda: _tokenized_whole(default, texts)
    engine("fastserve default, no CUDA graphs", None, graphs=False)
    engine("fastserve default, no epilogue kernels", None, epilogues=False)
    engine("fastserve default, padded-copy attention, no graphs (before)", "pad", graphs=False, epilogues=False)
    engine("fastserve static 16k, packed", None, **static)
    engine("fastserve static 16k, packed, padded-copy attention", "pad", **static)
    engine("fastserve static 16k, packed, per-length attention", "runs", **static)
    engine("fastserve static 16k, padded", None, execution="padded", **static)

    best: dict[str, float] = {}
    for name, fn in methods.items():  # warm-up: kernels, allocator, autotuning
        fn()
    for _ in range(repeats):  # interleaved: a drift hits every method alike
        for name, fn in methods.items():
            best[name] = min(best.get(name, float("inf")), _sync_call(fn))
    rows = []
    base = best["transformers padded, arrival order"]
    for name, seconds in best.items():
        rows.append({"method": name, "seconds": seconds, "texts_per_s": n / seconds, "vs_transformers": base / seconds})
        log(f"  {name}: {n / seconds:.0f} texts/s ({base / seconds:.2f}x)")
    for e in engines.values():
        e.close()
    del hf, st
    if DEVICE != "cpu":
        torch.cuda.empty_cache()
    return rows


def _tokenized_whole(engine: Any, texts: Sequence[str]) -> Any:
    from fastserve import engine as engine_mod

    piece = engine_mod.TOKENIZE_PIECE_TEXTS
    engine_mod.TOKENIZE_PIECE_TEXTS = 10**9
    try:
        return engine.embed(texts)
    finally:
        engine_mod.TOKENIZE_PIECE_TEXTS = piece


def closed_loop(submit: Callable[[str], cf.Future], texts: Sequence[str], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads, each submitting one text and waiting for it, for `seconds`."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            submit(texts[i % len(texts)]).result()
            lat[k].append(time.perf_counter() - t0)
            i += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array([x for v in lat for x in v])
    return {"clients": clients, "requests": len(a), "req_per_s": len(a) / wall,
            "p50_ms": float(np.percentile(a, 50) * 1e3), "p99_ms": float(np.percentile(a, 99) * 1e3)}


def online(path: Path, dtype: torch.dtype, concurrency: Sequence[int], seconds: float,
           log: Callable[[str], None]) -> list[dict[str, Any]]:
    max_len = common.max_seq_length(path)
    texts = common.sample_texts(4096, seed=2)
    hf = common.HFModel(path, max_len, DEVICE, dtype)
    serial = common.SerialBackend("transformers", hf.encode)
    eng = make_engine(path, dtype, max_len)
    backends = {"transformers (one at a time)": serial.submit, "fastserve default": eng.submit}
    for submit in backends.values():  # warm-up: every text length's shapes seen once
        for t in texts[:300]:
            submit(t).result()
        closed_loop(submit, texts, max(concurrency), 1.0)
    runner_s: list[float] = []  # the worker's time inside the model, per batch: wall clock
    runner_cpu_s: list[float] = []  # and the worker thread's own CPU time (wall - CPU = waiting: GPU or GIL)
    run = eng.runner.run

    def timed_run(batch: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return run(batch)
        finally:
            runner_s.append(time.perf_counter() - t0)
            runner_cpu_s.append(time.thread_time() - c0)

    eng.runner.run = timed_run
    rows = []
    for c in concurrency:
        for name, submit in backends.items():
            runner_s.clear()
            runner_cpu_s.clear()
            before = eng.stats()
            r = closed_loop(submit, texts, c, seconds)
            r["backend"] = name
            if submit == eng.submit:
                after = eng.stats()
                r["batches"] = after["batches"] - before["batches"]
                r["mean_batch"] = (after["completed"] - before["completed"]) / max(r["batches"], 1)
                r["attention"] = after["attention"]
                r["runner_ms_per_batch"] = float(np.mean(runner_s) * 1e3) if runner_s else None
                r["runner_cpu_ms_per_batch"] = float(np.mean(runner_cpu_s) * 1e3) if runner_cpu_s else None
            rows.append(r)
            extra = (f", {r['batches']} batches of {r['mean_batch']:.1f}, {r['runner_ms_per_batch']:.2f} ms each in "
                     f"the model ({r['runner_cpu_ms_per_batch']:.2f} ms of it on the worker's CPU)"
                     if r.get("runner_ms_per_batch") else "")
            log(f"  C={c} {name}: {r['req_per_s']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms{extra}")
    eng.close()
    serial.close()
    del hf
    if DEVICE != "cpu":
        torch.cuda.empty_cache()
    return rows


def markdown(result: dict[str, Any]) -> str:
    info = result["machine"]
    out = [f"# GPU benchmark: {info['gpu']}", "",
           f"`{result['command']}`", "",
           "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]
    for model, parts in result["models"].items():
        out += [f"## {model} ({result['dtype']})", ""]
        if "offline" in parts:
            out += [f"Offline, {result['n']} corpus texts (best of {result['repeats']}):", "",
                    "| method | texts/s | vs transformers arrival order |", "|---|---:|---:|"]
            out += [f"| {r['method']} | {r['texts_per_s']:.0f} | {r['vs_transformers']:.2f}x |" for r in parts["offline"]]
            out.append("")
        if "latency" in parts:
            rows = parts["latency"]
            out += [f"One request at a time of {rows[0]['tokens']} tokens, end to end in-process "
                    f"({rows[0]['requests']} requests each, interleaved):", "",
                    "| method | p50 ms | p99 ms | mean ms | in the runner, ms | graph on the GPU, ms |",
                    "|---|---:|---:|---:|---:|---:|"]
            out += [f"| {r['method']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} | "
                    + (f"{r['runner_ms']:.3f}" if "runner_ms" in r else "-") + " | "
                    + (f"{r['replay_gpu_ms']:.3f}" if r.get("replay_gpu_ms") else "-") + " |" for r in rows]
            split = [r for r in rows if "submit_ms" in r]
            if split:
                out += ["", "Where a fastserve request's time goes (medians, ms; `breakdown`):", "",
                        "| method | submit (tokenize, queue) | in the queue | compute | of it the runner "
                        "| hand-offs, the rest | total |", "|---|---:|---:|---:|---:|---:|---:|"]
                out += [f"| {r['method']} | {r['submit_ms']:.3f} | {r['queue_ms']:.3f} | {r['compute_ms']:.3f} | "
                        f"{r['runner_ms']:.3f} | {r['handoff_ms']:.3f} | {r['total_ms']:.3f} |" for r in split]
            graphs = next((r["cuda_graphs"] for r in rows if r.get("cuda_graphs")), None)
            if graphs:
                out += ["", f"CUDA graphs: `{json.dumps(graphs)}`"]
            out.append("")
        if "padded_half" in parts:
            ph = parts["padded_half"]
            out += [f"Offline, {result['n']} texts of 8-248 tokens, {ph['padding']:.1%} padding in transformers' "
                    "batches of 64:", "", "| method | texts/s | vs transformers |", "|---|---:|---:|"]
            out += [f"| {r['method']} | {r['texts_per_s']:.0f} | {r['vs_transformers']:.2f}x |" for r in ph["rows"]]
            out.append("")
        if "online" in parts:
            out += [f"Online, closed loop ({result['seconds']} s per point):", "",
                    "| clients | backend | req/s | p50 ms | p99 ms | mean batch | model ms per batch |",
                    "|---:|---|---:|---:|---:|---:|---:|"]
            out += [f"| {r['clients']} | {r['backend']} | {r['req_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                    + (f"{r['mean_batch']:.1f} | {r['runner_ms_per_batch'] or float('nan'):.2f} |" if "mean_batch" in r
                       else "1 | - |") for r in parts["online"]]
            out.append("")
        for k, v in parts.items():
            if k.endswith("error"):
                out += [f"{k}: `{v}`", ""]
    if result.get("kernels"):
        out += ["## Kernels vs device copy", "", "| kernel | dtype | B x L x H | MB | kernel GB/s | copy GB/s | ratio |",
                "|---|---|---|---:|---:|---:|---:|"]
        out += [f"| {r['kernel']} | {r['dtype']} | {r['B']}x{r['L']}x{r['H']} | {r['bytes'] / 1e6:.1f} | "
                f"{r['kernel_gbps']:.0f} | {r['copy_gbps']:.0f} | {r['kernel_gbps'] / r['copy_gbps']:.0%} |"
                for r in result["kernels"]]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["bert-base", "minilm"], choices=["bert-base", "minilm"])
    ap.add_argument("--dtype", default="float16", choices=list(DTYPES))
    ap.add_argument("--n", type=int, default=4096, help="texts in the offline run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="per closed-loop point")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["kernels", "latency", "offline", "padded_half", "online"])
    ap.add_argument("--tokens", type=int, default=128, help="tokens of the one-request latency run")
    ap.add_argument("--requests", type=int, default=500, help="requests per method in the latency run")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the script")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for this process, in seconds (Python's default: 0.005)")
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    global DEVICE
    DEVICE = args.device
    if DEVICE != "cpu" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible", file=sys.stderr)
        return 2
    common.quiet()

    def log(msg: str) -> None:
        print(msg, flush=True)

    dtype = DTYPES[args.dtype]
    result: dict[str, Any] = {"command": "python benchmarks/python/gpu_bench.py " + " ".join(sys.argv[1:]),
                              "machine": gpu_info(), "dtype": args.dtype, "n": args.n, "repeats": args.repeats,
                              "seconds": args.seconds, "switch_interval_s": sys.getswitchinterval(),
                              "cudnn_attention": os.environ.get("FASTSERVE_CUDNN_ATTENTION", ""), "models": {}}
    log(json.dumps(result["machine"]))
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
        (args.out / "gpu.md").write_text(markdown(result))

    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            path = bert_base_folder(Path(tmp)) if model == "bert-base" else common.model_path()
            parts: dict[str, Any] = result["models"].setdefault(model, {})
            for part, fn in (("latency", lambda: latency(path, dtype, args.tokens, args.requests, log)),
                             ("offline", lambda: offline(path, dtype, args.n, args.repeats, log)),
                             ("padded_half", lambda: padded_half(path, dtype, args.n, args.repeats, log)),
                             ("online", lambda: online(path, dtype, args.concurrency, args.seconds, log))):
                if part in args.skip:
                    continue
                log(f"{model}: {part}")
                try:
                    parts[part] = fn()
                except Exception as e:  # keep the other parts' figures
                    traceback.print_exc()
                    parts[f"{part} error"] = repr(e)
                save()
    if "kernels" not in args.skip:
        log("kernels")
        try:
            result["kernels"] = bench_kernels.report(256, 256, [768], 3, 0, DEVICE)
        except Exception as e:
            traceback.print_exc()
            result["kernels error"] = repr(e)
    save()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
