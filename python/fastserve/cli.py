"""The `fastserve` command: embed texts, run a short load benchmark, or serve
the model over HTTP (OpenAI-compatible), on the embedded default model
(all-MiniLM-L6-v2) or any model path or hub id."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

from .st_spec import POOLING_MODES as POOLINGS


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model path or hub id (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--pooling", default="auto", choices=["auto", *POOLINGS])
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise embeddings (default: as the model's sentence-transformers stack says; a plain encoder is normalised)")
    p.add_argument("--policy", default="model", choices=["model", "aimd", "seed", "static"])
    p.add_argument("--target-latency-ms", type=float, default=50.0)
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="largest batch in tokens (default 2048 on a CPU, 8192 on a GPU)")
    p.add_argument("--max-batch-memory-mb", type=float, default=None,
                   help="bound on a batch's activation memory, turned into a token bound per model")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--torch-threads", type=int, default=None)


def _make_engine(args: argparse.Namespace, **extra):
    """An Engine from the common options; `extra` adds or overrides keywords."""
    from .engine import Engine

    kwargs = _engine_kwargs(args, **extra)
    return Engine(kwargs.pop("model"), **kwargs)


def _open_engine(args: argparse.Namespace, **extra):
    """_make_engine, or None after saying on stderr why the engine was refused
    (a model that does not load, a bad option): the command then exits 2."""
    from .errors import ModelLoadError

    try:
        return _make_engine(args, **extra)
    except (ModelLoadError, ValueError, TypeError) as e:
        print(f"fastserve {args.command}: {e}", file=sys.stderr)
        return None


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 to 65535 (0: any free one)."""
    n = _number(text, int)
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {n}")
    return n


def _at_least_one(text: str) -> int:
    """argparse type: an int >= 1."""
    n = _number(text, int)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _seconds(text: str) -> float:
    """argparse type: finite seconds >= 0."""
    x = _number(text, float)
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite seconds >= 0, got {text}")
    return x


def _positive_seconds(text: str) -> float:
    """argparse type: finite seconds > 0."""
    x = _seconds(text)
    if x == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return x


def _engine_kwargs(args: argparse.Namespace, **extra) -> dict:
    """The Engine's keywords (the model under "model") from the common options."""
    kwargs = dict(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        pooling=args.pooling,
        normalize=False if args.no_normalize else None,
        policy=args.policy,
        target_latency_ms=args.target_latency_ms,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_memory_mb=args.max_batch_memory_mb,
        max_batch_size=args.max_batch_size,
        torch_threads=args.torch_threads,
    )
    kwargs.update(extra)
    return kwargs


def _stdin_lines() -> list[str]:
    """stdin's non-blank lines, without their line ends (\n or \r\n). Bytes
    that are not UTF-8 are kept as lone surrogates whatever the locale (the
    engine then names the text: one line, exit 2), not a UnicodeDecodeError."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8", "surrogateescape")
    text = data.decode("utf-8", "surrogateescape")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _model_folder(text: str) -> bool:
    """Whether `text` names a model folder (a folder holding config.json)."""
    return os.path.isdir(text) and os.path.isfile(os.path.join(text, "config.json"))


def cmd_embed(args: argparse.Namespace) -> int:
    for text in args.texts:  # `fastserve embed ./my-model "hello"` embedded the path (serve takes a positional model)
        if _model_folder(text):
            print(f"fastserve embed: {text!r} is a model folder; pass it as --model {shlex.quote(text)}",
                  file=sys.stderr)
            return 2
    if not args.texts and sys.stdin is not None and sys.stdin.isatty():  # it waited silently at the terminal
        end = "Ctrl-Z, Enter" if sys.platform == "win32" else "Ctrl-D"
        print(f"fastserve embed: reading texts from stdin, one per line; end with {end}", file=sys.stderr, flush=True)
    texts = args.texts or _stdin_lines()
    engine = _open_engine(args)
    if engine is None:
        return 2
    from .errors import InvalidInputError

    with engine:
        try:
            vectors = engine.embed(texts)
        except InvalidInputError as e:  # a text the engine refuses (not valid Unicode, too long to run)
            print(f"fastserve embed: {e}", file=sys.stderr)
            return 2
    if args.format == "json":
        out = [{"text": t, "embedding": [round(float(x), 7) for x in v]} for t, v in zip(texts, vectors)]
        json.dump(out if len(out) != 1 else out[0], sys.stdout)
        sys.stdout.write("\n")
    else:
        for v in vectors:
            print(" ".join(f"{x:.6f}" for x in v))
    return 0


def _write_quietly_to_a_closed_pipe(run):
    """`fastserve embed ... | head`: the reader leaving ends the command
    quietly (exit 0), as Unix tools do, not with a BrokenPipeError trace."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            code = run(args)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's final flush must not raise again
            os.dup2(devnull, sys.stdout.fileno())
            return 0
    return wrapped


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .corpus import texts as corpus
    from .errors import InvalidInputError

    texts = corpus()
    engine = _open_engine(args)
    if engine is None:
        return 2
    latencies: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()  # a client's failure, or Ctrl-C: the others stop at their next request
    counter = iter(range(args.requests))

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            with lock:
                if next(counter, None) is None:
                    return
            text = texts[int(rng.integers(len(texts)))]
            t0 = time.perf_counter()
            try:
                engine.embed(text)
            except Exception as e:  # noqa: BLE001 - reported once the clients are done
                with lock:
                    failures.append(e)
                stop.set()
                return
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                bar.update(1)

    with engine:
        try:
            engine.embed(list(texts[:32]))  # warm up: first calls pay one-off costs
        except InvalidInputError as e:  # a corpus text the engine refuses (a memory budget too small for it)
            print(f"fastserve bench: {e}", file=sys.stderr)
            return 2
        bar = tqdm(total=args.requests, desc="fastserve bench", unit="req", file=sys.stderr)
        before = engine.stats()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.concurrency)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.1)  # (a plain join would not see Ctrl-C)
        except KeyboardInterrupt:
            stop.set()
            bar.close()
            print("fastserve bench: interrupted", file=sys.stderr)
            return 130
        wall = time.perf_counter() - t0
        bar.close()
        s = engine.stats()
    if failures:
        print(f"fastserve bench: a request failed after {len(latencies)} were served: {failures[0]}", file=sys.stderr)
        return 2
    lat = np.array(latencies) * 1000
    batches = s["batches"] - before["batches"]
    report = {
        "model": s["model"],
        "device": s["device"],
        "dtype": s["dtype"],
        "policy": s["controller"]["policy"],
        "requests": len(latencies),
        "concurrency": args.concurrency,
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 1),
        "latency_ms": {q: round(float(np.percentile(lat, int(q[1:]))), 2) for q in ("p50", "p95", "p99")},
        "batches": batches,
        "mean_batch_size": round((s["completed"] - before["completed"]) / max(batches, 1), 1),
        "padding_ratio": round(s["padding_ratio"], 3),
        "controller_budget_tokens": s["controller"]["budget_tokens"],
        "torch_threads": s["torch_threads"],
    }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            if k == "latency_ms":
                k, v = "latency", ", ".join(f"{q} {ms:.2f} ms" for q, ms in v.items())
            print(f"{k:>26}: {v}")
    return 0


def _bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of `host` at `port` (0: a free one, the
    same for all), as uvicorn would bind them (asyncio's create_server), but
    before the model loads: a busy or forbidden port is refused at once. Not
    listening yet, so a TCP probe still fails until the server is up; uvicorn
    listens on them (_serve). Raises OSError."""
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                   flags=socket.AI_PASSIVE):
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if os.name == "posix" and sys.platform != "cygwin":  # asyncio's reuse_address default
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _url_host(host: str) -> str:
    """`host` as a URL names it (an empty one: every address)."""
    host = host or "0.0.0.0"
    return f"[{host}]" if ":" in host else host


def _serve(engine, sockets: list[socket.socket], host: str, port: int, **options) -> None:
    """fastserve.server.serve on the sockets _bind bound: until SIGTERM/SIGINT, then the engine closed."""
    from .server import serve

    serve(engine, host, port, sockets=sockets, **options)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from . import server  # noqa: F401  (the 'serve' extra)
    except ImportError as e:
        print(f"fastserve serve: {e}", file=sys.stderr)
        return 2
    if args.model_path and args.model and args.model_path != args.model:  # the positional one was served silently
        print(f"fastserve serve: two models given, {args.model_path!r} and --model {args.model!r}: give one",
              file=sys.stderr)
        return 2

    serve_options = dict(
        model=args.model_path or args.model,
        task=args.task,
        max_length=args.max_length,
        truncate=True if args.truncate is None else args.truncate,
        chunk_overlap=args.chunk_overlap,
        pair_truncation=args.pair_truncation,
        max_queue=args.max_queue,
        max_queue_tokens=args.max_queue_tokens,
        **({} if args.request_timeout is None else {"request_timeout_s": args.request_timeout}),
    )
    app_options = dict(
        api_key=args.api_key,  # "" refused by check_app_options: an unset $KEY must not turn the key off
        max_payload_bytes=args.max_payload_bytes,
        max_inputs=args.max_inputs_per_request,
        request_timeout=args.request_timeout,
        model_name=args.served_model_name,
        client_timeout_s=args.client_timeout,
        cors_allow_origins=args.cors_allow_origin or (),
        max_priority=args.max_priority,
    )
    from .server.app import check_app_options

    if args.api_key == "":  # `--api-key "$KEY"` with KEY unset must not serve without a key
        print("fastserve serve: the API key (--api-key or $FASTSERVE_API_KEY) is empty: give a key, or leave both "
              "unset to serve without one", file=sys.stderr)
        return 2
    try:  # before a model is loaded (a key with outer whitespace, from a file, never matched)
        check_app_options(**app_options)
    except ValueError as e:
        print(f"fastserve serve: {e}", file=sys.stderr)
        return 2
    ray_only = [f"--{k.replace('_', '-')}" for k in ("num_cpus", "num_gpus") if getattr(args, k) is not None]
    if args.ray:  # the Ray Serve path: replicas across a Ray cluster
        if args.max_header_bytes is not None:
            print("fastserve serve: --max-header-bytes is the local server's (Ray Serve's proxy reads the headers)",
                  file=sys.stderr)
            return 2
        # uvicorn's: under --ray, Ray Serve logs (its deployment's logging_config). Compared with their
        # defaults: an explicit `--log-level info` asks for what Serve does anyway.
        logs = [flag for flag, given in (("--log-level", args.log_level != "info"), ("--access-log", args.access_log))
                if given]
        if logs:
            print(f"fastserve serve: {' and '.join(logs)}: the local server's (uvicorn's); under --ray, Ray Serve "
                  "logs (set a deployment's logging_config)", file=sys.stderr)
            return 2
        try:
            from .ray import serve_cli
        except ImportError as e:
            print(f"fastserve serve: {e}", file=sys.stderr)
            return 2
        args.replicas = 1 if args.replicas is None else args.replicas
        args.num_cpus = 1.0 if args.num_cpus is None else args.num_cpus
        args.num_gpus = 0.0 if args.num_gpus is None else args.num_gpus
        return serve_cli(args, _engine_kwargs(args, **serve_options), app_options)
    if ray_only:  # were silently dropped without --ray
        print(f"fastserve serve: {' and '.join(ray_only)}: each Ray replica's resources, for --ray only",
              file=sys.stderr)
        return 2
    if args.replicas is not None:
        serve_options["replicas"] = args.replicas  # the engine's own replicas (worker threads)
    if args.max_header_bytes is not None:
        app_options["max_header_bytes"] = args.max_header_bytes
    try:  # before the model loads: a busy port was found only after it, by uvicorn (exit 3)
        sockets = _bind(args.host, args.port)
    except OSError as e:
        why = e.strerror or str(e)
        if isinstance(e, socket.gaierror):
            why = f"no such host ({why})"
        elif e.errno == errno.EADDRINUSE:
            why += ": another server holds it; stop it, or pick another --port (0: any free one)"
        elif e.errno == errno.EACCES:
            why += ": pick a --port this user may bind (ports below 1024 need privileges)"
        print(f"fastserve serve: cannot listen on {_url_host(args.host)}:{args.port}: {why}", file=sys.stderr)
        return 2
    try:
        engine = _open_engine(args, **serve_options)
        if engine is None:
            return 2
        port = sockets[0].getsockname()[1]  # the one bound: --port 0 picks one
        print(
            f"fastserve: serving {engine.model_name} ({engine.task}, dim {engine.dim}, {engine.device}, "
            f"{engine.precision.name}) on http://{_url_host(args.host)}:{port}",
            file=sys.stderr,
            flush=True,
        )
        _serve(
            engine,
            sockets,
            args.host,
            port,
            **app_options,
            graceful_timeout=args.graceful_timeout,
            log_level=args.log_level,
            access_log=args.access_log,
        )
    finally:
        for sock in sockets:
            sock.close()
    return 0


def _version() -> str:
    """The installed package's version (fastserve.__version__ where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastserve")
    except PackageNotFoundError:
        return getattr(sys.modules[__package__], "__version__", "unknown")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastserve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="embed texts (arguments, or one per line on stdin)")
    p.add_argument("texts", nargs="*")
    p.add_argument("--format", choices=["json", "text"], default="json")
    _engine_args(p)
    p.set_defaults(func=_write_quietly_to_a_closed_pipe(cmd_embed))
    p = sub.add_parser("bench", help="a short closed-loop load run on the shipped corpus")
    p.add_argument("--requests", type=_at_least_one, default=2000)
    p.add_argument("--concurrency", type=_at_least_one, default=32, help="client threads, one request in flight each")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    _engine_args(p)
    p.set_defaults(func=_write_quietly_to_a_closed_pipe(cmd_bench))
    p = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible /v1/embeddings, /metrics)")
    p.add_argument("model_path", nargs="?", metavar="MODEL", help="model path or hub id (same as --model)")
    _engine_args(p)
    p.add_argument("--task", default="embed", choices=["embed", "classify", "rerank", "token-classify"])
    p.add_argument("--max-length", type=int, default=None, help="tokens per input (default: the model's limit)")
    p.add_argument("--truncate", default=None, choices=["right", "left", "error", "chunk"],
                   help="inputs past --max-length: cut on the right or left (default: the side the tokenizer "
                        "cuts, its truncation_side), refuse (400), or embed in windows")
    p.add_argument("--chunk-overlap", type=int, default=0, help="tokens shared by consecutive windows (chunk)")
    p.add_argument("--pair-truncation", default="longest_first", choices=["longest_first", "only_second"],
                   help="rerank: how a long (query, document) pair is cut")
    p.add_argument("--max-queue", type=int, default=65536, help="queued requests before 429")
    p.add_argument("--max-queue-tokens", type=int, default=None, help="queued tokens before 429")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=_port, default=8000,
                   help="port to listen on (0: any free one, named in the startup line); a busy or forbidden one "
                        "is refused before the model loads")
    p.add_argument("--api-key", default=os.environ.get("FASTSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health, /ready and /metrics "
                        "(default: $FASTSERVE_API_KEY)")
    p.add_argument("--max-payload-bytes", type=_at_least_one, default=2_000_000, help="larger request bodies get 413")
    p.add_argument("--max-inputs-per-request", type=_at_least_one, default=2048,
                   help="more inputs in one request get 413")
    p.add_argument("--request-timeout", type=_positive_seconds, default=None,
                   help="seconds; every request's deadline: predicted to miss it, 429 with Retry-After; "
                        "not served by then, 504 (default: the engine's request_timeout_s, 30)")
    p.add_argument("--served-model-name", default=None, help="model id in responses (default: the model's name)")
    p.add_argument("--graceful-timeout", type=_seconds, default=30.0,
                   help="on SIGTERM/SIGINT, seconds to let in-flight requests finish")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--ray", action="store_true",
                   help="serve with Ray Serve (the 'ray' extra): --replicas engines on the Ray cluster "
                        "($RAY_ADDRESS, or a local one)")
    p.add_argument("--replicas", type=_at_least_one, default=None,
                   help="the engine's replicas (worker threads; default: one per device, two on a CPU of two or "
                        "more cores unless --torch-threads is given); with --ray: Serve replicas, one engine each "
                        "(default 1)")
    p.add_argument("--num-cpus", type=float, default=None, help="with --ray: CPUs per replica (default 1)")
    p.add_argument("--num-gpus", type=float, default=None, help="with --ray: GPUs per replica (default 0)")
    p.add_argument("--client-timeout", type=_positive_seconds, default=30.0,
                   help="seconds a request's headers may take to arrive, and its body may stall (408 after)")
    p.add_argument("--max-header-bytes", type=_at_least_one, default=None,
                   help="a larger request line and headers get 431 (default 65536)")
    p.add_argument("--max-priority", type=int, default=0,
                   help="the highest priority (at least 0) a request may ask for with its 'X-Fastserve-Priority: N' "
                        "header (higher runs first; without it 0). Default 0: a client may lower its requests' priority "
                        "(a bulk job sending -100 stays behind interactive requests), not raise it")
    p.add_argument("--cors-allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="let a browser page from ORIGIN call the API (repeat for several; '*' for any)")
    p.set_defaults(func=cmd_serve)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's usage and name, not the top-level parser's
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        _quiet_transformers()  # (imports transformers: seconds, inside the Ctrl-C handling)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C at embed's stdin or while a model loads: no traceback, as bench
        print(f"fastserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
