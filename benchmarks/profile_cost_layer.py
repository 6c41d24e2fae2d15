"""Where one decoder layer's time goes in the cost table: its Fisher (``_layer_fisher``,
per-sequence vjp) against pricing every candidate of its matrices (``module_errors``).

A random float32 Llama layer of the given shape (default Llama-3-8B's), calibration
activations of the cost table's size (8 sequences of 255 tokens).

    python benchmarks/profile_cost_layer.py [--hidden 4096 --mlp 14336 --heads 32 --kv-heads 8 --sequences 8]
        [--allocator-cache layer|default]

As in the cost table, MLX's allocator may keep one layer's float32 size of freed buffers
(``--allocator-cache default``: MLX's own limit, 32 MB on the CPU).
"""

import argparse
import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask

from lsaq_mlx.backend.allocator import reused_buffers
from lsaq_mlx.backend.blas import reexec_with_fast_blas
from lsaq_mlx.planning.cost import module_errors
from lsaq_mlx.planning.fisher import _layer_fisher
from lsaq_mlx.planning.plan import QuantModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=255)
    parser.add_argument("--allocator-cache", choices=("layer", "default"), default="layer")
    args = parser.parse_args()
    reexec_with_fast_blas()

    layer = llama.TransformerBlock(llama.ModelArgs(
        model_type="llama", hidden_size=args.hidden, num_hidden_layers=1, intermediate_size=args.mlp,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, rms_norm_eps=1e-5, vocab_size=1,
        rope_theta=500000.0))
    layer.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.02) for k, v in tree_flatten(layer.parameters())]))
    x = mx.random.normal((args.sequences, args.tokens, args.hidden))
    grad = mx.random.normal(x.shape) * 1e-3
    mx.eval(layer.parameters(), x, grad)
    params = dict(tree_flatten(layer.parameters()))
    paths = [n.removesuffix(".weight") for n, v in params.items() if v.ndim == 2]
    cache = sum(4 * params[p + ".weight"].size for p in paths) if args.allocator_cache == "layer" else 0
    with reused_buffers(cache):
        profile(layer, params, paths, x, grad, args.sequences, args.tokens)


def profile(layer, params, paths, x, grad, sequences, tokens) -> None:
    start = time.perf_counter()
    _, fisher = _layer_fisher(layer, lambda h: layer(h, create_attention_mask(h, None)), x, grad, "", paths)
    mx.eval(fisher)
    print(f"Fisher of {sequences} sequences x {tokens} tokens: {time.perf_counter() - start:.1f} s")
    total = 0.0
    for path in paths:
        weight = params[path + ".weight"]
        choices = [c for c in QuantModule(path, 0, *weight.shape, 0).choices() if hasattr(c, "bits")]
        start = time.perf_counter()
        module_errors(weight, fisher[path], choices)
        seconds = time.perf_counter() - start
        total += seconds
        print(f"  {path} {tuple(weight.shape)}: {len(choices)} candidates in {seconds:.1f} s "
              f"({seconds / len(choices) / weight.size * 1e9:.0f} ns per weight and candidate)")
    print(f"pricing: {total:.1f} s")


if __name__ == "__main__":
    main()
