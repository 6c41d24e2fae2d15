"""Write a randomly initialized llama model folder of a chosen shape, for benchmarks.

    python scripts/make_random_model.py OUT [--hidden 2048] [--layers 8] [--heads 16]
        [--kv-heads 4] [--intermediate 5632] [--seed 0]

The tokenizer (and so the vocabulary, 49,152) is the embedded default model's; the
weights are mlx-lm's own initialization, saved in float32. Its outputs mean nothing, but
its shapes cost what a real model of that shape costs, which is all a speed benchmark
needs when the real model cannot be downloaded.
"""

import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from lsaq_mlx.sources import resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    default = resolve_model(None).path
    config = json.loads((default / "config.json").read_text())
    config.pop("lsaq_source", None)
    config |= {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
               "num_key_value_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
               "intermediate_size": args.intermediate, "tie_word_embeddings": True, "torch_dtype": "float32"}
    mx.random.seed(args.seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    args.out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(args.out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (args.out / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        if (default / name).exists():
            shutil.copy(default / name, args.out / name)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"{args.out}: llama, {args.layers} layers, hidden {args.hidden}, vocab {config['vocab_size']}, "
          f"{n / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
