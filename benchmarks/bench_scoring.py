"""Benchmark of jaccard (LSAQ) scoring on this machine, all measured in one run.

    python benchmarks/bench_scoring.py [--model default] [--tokens 1024] [--stride 8] [--repeats 3]

1. tokens/s of jaccard scoring at the default stride (and at stride 1, and without
   the lens: the floor of any stride; and on one thread instead of one worker per
   core; and without blocked causal attention, on one thread and on the workers),
   and the FLOP/s its vocabulary projections achieve (time inside the lens, measured
   in the one-thread run) as a ratio to this machine's float32 GEMM rate on the same
   shapes (target >= 0.6);
2. wall time against mlx_lm.dynamic_quant's sensitivity estimation on the same
   calibration tokens (target: jaccard >= 5x faster);
   each time is the fastest of --repeats rounds, each round running every timed
   measurement once, so a change of load on a shared CPU hits them alike;
3. peak memory of scoring 4x the tokens against 1x, each in a fresh process
   (target: within 10 %).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import mlx.core as mx

from lsaq_mlx.backend.blas import reexec_with_fast_blas
from lsaq_mlx.scoring.calibration import load_calibration, token_sequences
from lsaq_mlx.backend.cores import worker_count
from lsaq_mlx.scoring import metrics as importance
from lsaq_mlx.scoring.metrics import lens_statistics
from lsaq_mlx.modules import inner_model
from lsaq_mlx.scoring.lens import Lens, find_lens
from lsaq_mlx.scoring.scores import DEFAULT_SEQ_LEN, DEFAULT_STRIDE, DEFAULT_TOP_K
from lsaq_mlx.sources import load_model, resolve_model


def gemm_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """FLOP/s of (m, k) x (n, k)^T: the LM head's layout (faster than (k, n) on OpenBLAS)."""
    a, w = mx.random.normal((m, k)), mx.random.normal((n, k))
    mx.eval(a @ w.T)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ w.T)
    return 2 * m * k * n * repeats / (time.perf_counter() - start)


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def timed_lens_statistics(model, sequences, k, stride):
    """lens_statistics on one thread, with the time spent in the vocabulary projections (top-k) measured."""
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
        _, _, spent["lensed"] = lens_statistics(model, sequences, k, stride, workers=1)
        return time.perf_counter() - start, spent
    finally:
        Lens.top_k = original


def unblocked_seconds(model, sequences, k, stride, workers=None) -> float:
    """lens_statistics with causal attention computed whole, as MLX does it."""
    blocked = importance.causal_attention_in_blocks
    importance.causal_attention_in_blocks = contextlib.nullcontext
    try:
        return seconds(lambda: lens_statistics(model, sequences, k, stride, workers=workers))
    finally:
        importance.causal_attention_in_blocks = blocked


def dynamic_quant_seconds(model, sequences) -> float:
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    data = mx.array([s for s in sequences if len(s) == len(sequences[0])])
    start = time.perf_counter()
    estimate_sensitivities(model, data, low_bits=4, low_group_size=64, high_bits=5, high_group_size=64)
    return time.perf_counter() - start


def peak_memory_child(model_spec: str, tokens: int, stride: int) -> None:
    model, tokenizer, _ = load_model(resolve_model(model_spec))
    sequences = token_sequences(tokenizer, load_calibration(None), tokens, DEFAULT_SEQ_LEN)
    mx.reset_peak_memory()
    lens_statistics(model, sequences, DEFAULT_TOP_K, stride)
    print(json.dumps({"tokens": tokens, "peak_bytes": mx.get_peak_memory()}))


def peak_memory(model_spec: str, tokens: int, stride: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--model", model_spec, "--stride", str(stride),
                          "--peak-child", str(tokens)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    reexec_with_fast_blas()
    if args.peak_child:
        return peak_memory_child(args.model, args.peak_child, args.stride)

    source = resolve_model(args.model)
    model, tokenizer, _ = load_model(source)
    sequences = token_sequences(tokenizer, load_calibration(None), args.tokens, DEFAULT_SEQ_LEN)
    lens = find_lens(model)
    hidden = inner_model(model)["embed_tokens"].weight.shape[1]
    layers = len(inner_model(model)["layers"])

    lens_statistics(model, [sequences[0][:64]], DEFAULT_TOP_K)  # warm-up, so no run below pays first-call costs
    rows_per_projection = min(lens.chunk_positions(), len(range(0, len(sequences[0]), args.stride)))
    rounds = []
    for _ in range(args.repeats):
        rounds.append({
            "wall": seconds(lambda: lens_statistics(model, sequences, DEFAULT_TOP_K, args.stride)),
            "serial": timed_lens_statistics(model, sequences, DEFAULT_TOP_K, args.stride),
            "unblocked": unblocked_seconds(model, sequences, DEFAULT_TOP_K, args.stride),
            "plain": unblocked_seconds(model, sequences, DEFAULT_TOP_K, args.stride, workers=1),
            "every": seconds(lambda: lens_statistics(model, sequences, DEFAULT_TOP_K, 1)),
            "unlensed": seconds(lambda: lens_statistics(model, sequences, DEFAULT_TOP_K, 1, with_jaccard=False)),
            "dq": dynamic_quant_seconds(load_model(source)[0], sequences),
            "gemm": gemm_rate(rows_per_projection, hidden, lens.vocab_size)})
    wall, wall_every, wall_unlensed, wall_unblocked, wall_plain, dq = (
        min(r[key] for r in rounds) for key in ("wall", "every", "unlensed", "unblocked", "plain", "dq"))
    wall_serial, spent = min((r["serial"] for r in rounds), key=lambda run: run[0])
    gemm = max(r["gemm"] for r in rounds)
    lens_flops = 2 * spent["positions"] * hidden * lens.vocab_size
    peak1 = peak_memory(args.model, args.tokens, args.stride)
    peak4 = peak_memory(args.model, 4 * args.tokens, args.stride)

    import platform

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; MLX {mx.__version__} "
          f"{mx.default_device()}; model {args.model} ({layers} layers, hidden {hidden}, vocab {lens.vocab_size})\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| jaccard scoring, {args.tokens} tokens, k={DEFAULT_TOP_K}, stride {args.stride} | {wall:.1f} s = "
          f"{args.tokens / wall:.0f} tok/s ({worker_count(len(sequences))} workers) | |")
    print(f"| same on one thread (lens measured here) / at stride 1 / without the lens (forward + hooks + cosine) "
          f"| {wall_serial:.1f} s / {wall_every:.1f} s / {wall_unlensed:.1f} s | |")
    print(f"| same without blocked causal attention, on one thread / on the workers | {wall_plain:.1f} s / "
          f"{wall_unblocked:.1f} s | |")
    print(f"| lensed positions; projections per lensed position | {spent['lensed']} of {args.tokens}; "
          f"{spent['positions'] / spent['lensed']:.0f} (= L+1 = {layers + 1}) | L+1 |")
    print(f"| lens projections on one thread: time / share of wall | {spent['s']:.1f} s / {spent['s'] / wall_serial:.0%} | |")
    print(f"| lens projection rate vs float32 GEMM of the same shape ({rows_per_projection} x {hidden} x "
          f"{lens.vocab_size}, head layout) | {lens_flops / spent['s'] / 1e9:.1f} / "
          f"{gemm / 1e9:.1f} GFLOP/s = {lens_flops / spent['s'] / gemm:.2f} | >= 0.6 |")
    print(f"| mlx_lm.dynamic_quant sensitivity estimation, same tokens | {dq:.1f} s = {dq / wall:.1f}x jaccard's time "
          f"(stride 1: {dq / wall_every:.1f}x; no lens: {dq / wall_unlensed:.1f}x) | >= 5x |")
    print(f"| peak memory, {args.tokens} vs {4 * args.tokens} tokens | {peak1 / 1e6:.0f} MB vs {peak4 / 1e6:.0f} MB "
          f"= {peak4 / peak1:.3f} | <= 1.10 |")


if __name__ == "__main__":
    main()
