"""Evaluation throughput: ``lsaq-mlx eval`` vs ``mlx_lm.perplexity``'s approach, in one run.

    python benchmarks/bench_eval.py [--bits-budget 4.5] [--tokens 1024] [--seq-len 256]

Converts the default model (lsaq plan at --bits-budget) into a temporary folder, then
computes the perplexity of the first --tokens tokens of WikiText-2 test in non-overlapping
windows of --seq-len both ways: mlx_lm's (``mlx_lm.load`` + ``mlx_lm.perplexity.eval_ppl``,
batches of 8 windows, the weights as stored) and ours (``lsaq_mlx.evaluation.run.evaluate``,
which on the CPU backend dequantizes to float32 and uses the fast BLAS). Reports both
tokens/s, their ratio (target: >= 1x) and the two perplexities (target: equal within
1e-3 relative: the same numbers, computed differently).
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from lsaq_mlx.backend.blas import active_blas, reexec_with_fast_blas

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits-budget", type=float, default=4.5)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    reexec_with_fast_blas()
    from mlx_lm import load
    from mlx_lm.perplexity import eval_ppl

    from lsaq_mlx.backend.compute import compute_mode
    from lsaq_mlx.convert import convert
    from lsaq_mlx.evaluation.run import EvalRequest, evaluate
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.sources import resolve_model

    source = resolve_model(None)
    plan = Planner(source).plan(PlanRequest(method="lsaq", bits_budgets=[args.bits_budget]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        convert(source, plan, folder)
        text = Path(tmp) / "text.txt"
        text.write_text(WIKITEXT.read_text(encoding="utf-8")[:200_000], encoding="utf-8")

        start = time.perf_counter()
        ours = evaluate(resolve_model(str(folder)), EvalRequest(ppl=str(text), max_tokens=args.tokens,
                                                                seq_len=args.seq_len))
        ours_seconds = time.perf_counter() - start
        mx.clear_cache()

        start = time.perf_counter()
        model, tokenizer = load(str(folder))
        tokens = tokenizer.encode(text.read_text(encoding="utf-8"))[: args.tokens]
        usable = len(tokens) // args.seq_len * args.seq_len
        data = mx.array(tokens[:usable]).reshape(-1, args.seq_len)
        theirs, _ = eval_ppl(model, data, batch_size=8)
        theirs_seconds = time.perf_counter() - start

    predicted = ours.perplexity["tokens"]
    their_tokens = data.shape[0] * (args.seq_len - 1)
    ours_tps, theirs_tps = predicted / ours_seconds, their_tokens / theirs_seconds
    print(f"\nmachine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; MLX {mx.__version__} "
          f"{mx.default_device()}, BLAS {active_blas() or 'as linked'}; default model, lsaq plan "
          f"{plan.predicted_bits_per_weight:.3f} bpw; WikiText-2 test, {usable} tokens in windows of {args.seq_len}; "
          f"load included on both sides\n")
    print("| | tokens/s | perplexity | wall |")
    print("|---|---|---|---|")
    print(f"| mlx_lm.perplexity (eval_ppl, batch 8, weights as stored) | {theirs_tps:.1f} | {theirs:.4f} | "
          f"{theirs_seconds:.1f} s |")
    print(f"| lsaq-mlx eval ({compute_mode()} compute) | {ours_tps:.1f} | {ours.perplexity['perplexity']:.4f} | "
          f"{ours_seconds:.1f} s |")
    print(f"\nthroughput ratio {ours_tps / theirs_tps:.2f}x (target >= 1x); perplexity relative difference "
          f"{abs(ours.perplexity['perplexity'] - theirs) / theirs:.2e} (target <= 1e-3)")


if __name__ == "__main__":
    main()
