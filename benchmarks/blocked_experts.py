"""One MoE layer's experts forward and back: mlx-lm's ``SwitchGLU`` in float32 (what a
streamed layer held before) against the same experts as stored float16 computed a block
at a time (``backend.expert_blocks``), in one process: seconds and MLX's peak memory.

    python benchmarks/blocked_experts.py [--shape qwen3-30b-a3b] [--tokens 255] [--repeats 2]

Shapes: qwen3-30b-a3b (hidden 2048, expert MLP 768, 128 experts, 8 active) and
qwen3-235b-a22b (4096, 1536, 128, 8). The input gradient is what the cost table's
backward pass asks of a layer for each calibration sequence.
"""

import argparse
import time

from lsaq_mlx.backend.blas import reexec_with_fast_blas

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "qwen3-235b-a22b": (4096, 1536, 128, 8)}


def measure(experts, x, indices, repeats: int) -> dict:
    import mlx.core as mx

    cotangent = mx.ones((*indices.shape, x.shape[-1]))
    mx.eval(cotangent)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    begin = time.perf_counter()
    for _ in range(repeats):
        mx.eval(experts(x, indices))
    forward = (time.perf_counter() - begin) / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        mx.eval(mx.vjp(lambda h: (experts(h, indices),), [x], [cotangent]))
    backward = (time.perf_counter() - begin) / repeats
    return {"weights_gb": base / 1e9, "forward_s": forward, "forward_and_input_gradient_s": backward,
            "peak_above_weights_gb": (mx.get_peak_memory() - base) / 1e9}


def main() -> None:
    reexec_with_fast_blas()
    import mlx.core as mx
    from mlx_lm.models.switch_layers import SwitchGLU

    from lsaq_mlx.backend.expert_blocks import make_blocked

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, default=255, help="one calibration sequence of the cost table")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    hidden, inner, count, active = SHAPES[args.shape]
    x = mx.random.normal((1, args.tokens, hidden))
    indices = mx.random.randint(0, count, (1, args.tokens, active)).astype(mx.uint32)
    mx.eval(x, indices)
    rows = {}
    for name in ("float32 gather_mm", "float16 blocked"):
        experts = SwitchGLU(hidden, inner, count)
        if name == "float16 blocked":
            experts.set_dtype(mx.float16)
            for m in (experts.gate_proj, experts.up_proj, experts.down_proj):
                make_blocked(m)
        mx.eval(experts.parameters())
        rows[name] = measure(experts, x, indices, args.repeats)
        del experts
        mx.clear_cache()
    print(f"{args.shape}: {count} experts, {active} active, {args.tokens} tokens")
    print("| experts | weights | forward | forward + input gradient | peak above the weights |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['weights_gb']:.2f} GB | {r['forward_s']:.2f} s | {r['forward_and_input_gradient_s']:.2f} s "
              f"| {r['peak_above_weights_gb']:.2f} GB |")
    a, b = rows["float32 gather_mm"], rows["float16 blocked"]
    print(f"blocked / float32: forward {b['forward_s'] / a['forward_s']:.2f}x, forward + gradient "
          f"{b['forward_and_input_gradient_s'] / a['forward_and_input_gradient_s']:.2f}x, memory held "
          f"{(b['weights_gb'] + b['peak_above_weights_gb']) / (a['weights_gb'] + a['peak_above_weights_gb']):.2f}x")


if __name__ == "__main__":
    main()
