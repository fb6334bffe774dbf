"""What serving a model's changed weights costs (docs/design.md, "Weights
changed while serving"): the check before each batch of whether any tensor
a runner copied or reads changed (runners.Stamps, on every fused layer and
owned Q/K/V), beside one text's end-to-end latency; and the first batch
after a change, which makes the copies anew, beside the batches around it.

The default engine over the embedded all-MiniLM-L6-v2 (the engine owns it),
and --shared: a BERT-base-sized random model passed in (the engine shares
it, so its fused layers keep a fused Q/K/V copy).

    python benchmarks/python/weight_checks.py --out checks.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import common


def _check_cost_us(runner, calls: int = 2000, rounds: int = 7) -> list[float]:
    for _ in range(calls // 2):
        runner.refresh()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            runner.refresh()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return out


def _measure(engine, model, text: str, rounds: int) -> dict:
    import torch

    runner = engine.runner
    row = {"model": engine.stats()["process"]["model"], "gemm": engine.stats()["gemm"],
           "layers": len(runner.blocks), "hidden": int(model.config.hidden_size)}
    checks = _check_cost_us(runner)
    row["check_us"] = {"median": statistics.median(checks), "min": min(checks), "max": max(checks)}
    for _ in range(20):
        engine.embed(text)
    lat = []
    for _ in range(200):
        t0 = time.perf_counter()
        engine.embed(text)
        lat.append(time.perf_counter() - t0)
    row["one_text_p50_ms"] = statistics.median(lat) * 1e3
    row["check_share_of_one_text"] = row["check_us"]["median"] / 1e3 / row["one_text_p50_ms"]
    # Every layer's Linear weights changed in place (an in-place op moves
    # their version counters), then the batch that rebuilds every fused
    # layer, against the batch after it.
    after, steady, rebuilt = [], [], []
    linears = [m for block in runner.blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
    for _ in range(rounds):
        with torch.no_grad():
            for lin in linears:
                lin.weight.add_(0.0)
        layers = runner.fused
        t0 = time.perf_counter()
        engine.embed(text)
        after.append(time.perf_counter() - t0)
        rebuilt.append(all(new is not old for new, old in zip(runner.fused, layers)))
        t0 = time.perf_counter()
        engine.embed(text)
        steady.append(time.perf_counter() - t0)
    row["every_layer_rebuilt"] = all(rebuilt)
    row["every_layer_changed"] = {"first_batch_ms": statistics.median(after) * 1e3,
                                  "next_batch_ms": statistics.median(steady) * 1e3}
    print(f"{row['model']:>7} H={row['hidden']} layers={row['layers']} gemm={row['gemm']}: check "
          f"{row['check_us']['median']:.1f} us/batch ({100 * row['check_share_of_one_text']:.2f}% of one text, "
          f"{row['one_text_p50_ms']:.2f} ms); after every layer changed "
          f"{row['every_layer_changed']['first_batch_ms']:.1f} ms vs {row['every_layer_changed']['next_batch_ms']:.1f}",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--no-shared", action="store_true", help="skip the BERT-base-sized shared model")
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    common.quiet()
    import fastserve
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    text = "a short text to embed, one request"
    rows = []
    with fastserve.Engine() as engine:
        if engine.runner.fused is None:
            print("the default engine's layers do not run through the CPU kernels here", file=sys.stderr)
            return 2
        rows.append(_measure(engine, engine.model, text, args.rounds))
    if not args.no_shared:
        cfg = AutoConfig.for_model("bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                   intermediate_size=3072, vocab_size=30522)
        model = AutoModel.from_config(cfg).eval()
        tok = AutoTokenizer.from_pretrained(str(common.model_path()))
        with fastserve.Engine(model, tok) as engine:
            rows.append(_measure(engine, model, text, args.rounds))
    common.write_json(args.out, {"command": "python benchmarks/python/weight_checks.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "machine": common.machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
