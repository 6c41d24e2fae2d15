"""Benchmark: MLX's quantized kernel vs our float32-dequantized path, and the
reference BLAS vs an optimized one, measured in one run on this machine.

    python benchmarks/bench_compute.py [--tokens 32] [--json]

Each BLAS runs in its own child process (a BLAS can only be swapped at process
start). In each child the embedded default model, quantized with MLX at 4 bits /
group 32, runs one forward pass over the same tokens with (a) MLX's quantized
matmul and (b) the dequantized float32 weights; the logits of the two are compared.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def child(n_tokens: int) -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    from lsaq_mlx.backend.blas import active_blas
    from lsaq_mlx.backend.compute import dequantize_layers
    from lsaq_mlx.doctor import gemm_gflops
    from lsaq_mlx.sources import load_model, resolve_model

    model, tokenizer, _ = load_model(resolve_model("default"), compute=False)
    model.set_dtype(mx.float32)
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    text = "The quick brown fox jumps over the lazy dog. " * 20
    tokens = mx.array(tokenizer.encode(text)[:n_tokens])[None]

    def timed(repeats):
        mx.eval(model(tokens[:, :4]))  # warm up
        start = time.perf_counter()
        for _ in range(repeats):
            logits = model(tokens)
            mx.eval(logits)
        return logits, (time.perf_counter() - start) / repeats

    quantized_logits, quantized_s = timed(1)
    dequantize_layers(model)
    float_logits, float_s = timed(3)
    diff = mx.abs(float_logits - quantized_logits).max().item()
    scale = mx.abs(quantized_logits).max().item()
    return {
        "blas": active_blas(),
        "gemm_gflops_1024": gemm_gflops(1024, 3),
        "tokens": n_tokens,
        "quantized_kernel_s": quantized_s,
        "float32_dequantized_s": float_s,
        "max_abs_logit_diff": diff,
        "max_rel_logit_diff": diff / scale,
    }


def run_child(blas: str, n_tokens: int) -> dict:
    env = dict(os.environ, LSAQ_MLX_BLAS=blas)
    env.pop("LSAQ_MLX_BLAS_REEXEC", None)
    env.pop("LD_PRELOAD", None)
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--tokens", str(n_tokens)], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        sys.exit(f"child with BLAS={blas} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from lsaq_mlx.backend.blas import reexec_with_fast_blas

        reexec_with_fast_blas()
        print(json.dumps(child(args.tokens)))
        return

    from lsaq_mlx.backend.blas import find_fast_blas

    os.environ.pop("LSAQ_MLX_BLAS", None)
    fast = find_fast_blas()
    rows = {"reference": run_child("reference", args.tokens)}
    if fast:
        rows["optimized"] = run_child(fast, args.tokens)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    import platform

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; MLX CPU backend")
    print(f"model: embedded default (SmolLM2-135M), MLX 4-bit g32, one forward pass of {args.tokens} tokens\n")
    print("| BLAS | float32 GEMM GFLOP/s | quantized kernel s | float32 dequantized s | speed-up | max rel. logit diff |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name}: {r['blas'].split(' (')[0].split(' bundled')[0]} | {r['gemm_gflops_1024']:.1f} | {r['quantized_kernel_s']:.3f} | "
            f"{r['float32_dequantized_s']:.3f} | {r['quantized_kernel_s'] / r['float32_dequantized_s']:.1f}x | "
            f"{r['max_rel_logit_diff']:.1e} |"
        )
    if fast:
        ref, opt = rows["reference"], rows["optimized"]
        print(
            f"\noptimized / reference BLAS: GEMM {opt['gemm_gflops_1024'] / ref['gemm_gflops_1024']:.1f}x, "
            f"float32 forward {ref['float32_dequantized_s'] / opt['float32_dequantized_s']:.1f}x; "
            f"float32 path with optimized BLAS vs quantized kernel with reference BLAS (MLX as shipped): "
            f"{ref['quantized_kernel_s'] / opt['float32_dequantized_s']:.1f}x"
        )


if __name__ == "__main__":
    main()
