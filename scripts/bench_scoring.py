"""Benchmark of jaccard (LSAQ) scoring on this machine, all measured in one run.

    python scripts/bench_scoring.py [--model default] [--tokens 4096]

1. tokens/s of jaccard scoring, and the FLOP/s its vocabulary projections achieve
   (time inside the lens) as a ratio to this machine's float32 GEMM rate on the same
   shapes (target >= 0.6);
2. wall time against mlx_lm.dynamic_quant's sensitivity estimation on the same
   calibration tokens (target: jaccard >= 5x faster);
3. peak memory of scoring 4x the tokens against 1x, each in a fresh process
   (target: within 10 %).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import mlx.core as mx

from lsaq_mlx.blas import reexec_with_fast_blas
from lsaq_mlx.calibration import load_calibration, token_sequences
from lsaq_mlx.importance import lens_statistics
from lsaq_mlx.lens import Lens, find_lens, inner_model
from lsaq_mlx.scores import DEFAULT_SEQ_LEN, DEFAULT_TOP_K
from lsaq_mlx.sources import load_model, resolve_model


def gemm_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * m * k * n * repeats / (time.perf_counter() - start)


def timed_lens_statistics(model, sequences, k):
    """lens_statistics, with the time spent in the vocabulary projections (top-k) measured."""
    spent = {"s": 0.0, "positions": 0}
    original = Lens.top_k

    def top_k(self, h, k, ordered=False):
        start = time.perf_counter()
        ids = original(self, h, k, ordered)
        mx.eval(ids)
        spent["s"] += time.perf_counter() - start
        spent["positions"] += h.shape[0]
        return ids

    Lens.top_k = top_k
    try:
        start = time.perf_counter()
        lens_statistics(model, sequences, k)
        return time.perf_counter() - start, spent
    finally:
        Lens.top_k = original


def dynamic_quant_seconds(model, sequences) -> float:
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    data = mx.array([s for s in sequences if len(s) == len(sequences[0])])
    start = time.perf_counter()
    estimate_sensitivities(model, data, low_bits=4, low_group_size=64, high_bits=5, high_group_size=64)
    return time.perf_counter() - start


def peak_memory_child(model_spec: str, tokens: int) -> None:
    model, tokenizer, _ = load_model(resolve_model(model_spec))
    sequences = token_sequences(tokenizer, load_calibration(None), tokens, DEFAULT_SEQ_LEN)
    mx.reset_peak_memory()
    lens_statistics(model, sequences, DEFAULT_TOP_K)
    print(json.dumps({"tokens": tokens, "peak_bytes": mx.get_peak_memory()}))


def peak_memory(model_spec: str, tokens: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--model", model_spec, "--peak-child", str(tokens)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--peak-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    reexec_with_fast_blas()
    if args.peak_child:
        return peak_memory_child(args.model, args.peak_child)

    source = resolve_model(args.model)
    model, tokenizer, _ = load_model(source)
    sequences = token_sequences(tokenizer, load_calibration(None), args.tokens, DEFAULT_SEQ_LEN)
    lens = find_lens(model)
    hidden = inner_model(model)["embed_tokens"].weight.shape[1]
    layers = len(inner_model(model)["layers"])

    wall, spent = timed_lens_statistics(model, sequences, DEFAULT_TOP_K)
    lens_flops = 2 * spent["positions"] * hidden * lens.vocab_size
    gemm = gemm_rate(lens.chunk_positions(), hidden, lens.vocab_size)
    dq = dynamic_quant_seconds(load_model(source)[0], sequences)
    peak1, peak4 = peak_memory(args.model, args.tokens), peak_memory(args.model, 4 * args.tokens)

    import platform

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; MLX {mx.__version__} "
          f"{mx.default_device()}; model {args.model} ({layers} layers, hidden {hidden}, vocab {lens.vocab_size})\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| jaccard scoring, {args.tokens} tokens, k={DEFAULT_TOP_K} | {wall:.1f} s = {args.tokens / wall:.0f} tok/s | |")
    print(f"| projections per position | {spent['positions'] / args.tokens:.0f} (= L+1 = {layers + 1}) | L+1 |")
    print(f"| lens projections: time / share of wall | {spent['s']:.1f} s / {spent['s'] / wall:.0%} | |")
    print(f"| lens projection rate vs float32 GEMM of the same shape | {lens_flops / spent['s'] / 1e9:.1f} / "
          f"{gemm / 1e9:.1f} GFLOP/s = {lens_flops / spent['s'] / gemm:.2f} | >= 0.6 |")
    print(f"| mlx_lm.dynamic_quant sensitivity estimation, same tokens | {dq:.1f} s = {dq / wall:.1f}x jaccard's time | >= 5x |")
    print(f"| peak memory, {args.tokens} vs {4 * args.tokens} tokens | {peak1 / 1e6:.0f} MB vs {peak4 / 1e6:.0f} MB "
          f"= {peak4 / peak1:.3f} | <= 1.10 |")


if __name__ == "__main__":
    main()
