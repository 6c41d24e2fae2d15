"""Write a randomly initialized llama (or qwen3_moe) model folder of a chosen shape, for
benchmarks.

    python scripts/make_random_model.py OUT [--shape llama3-8b | --hidden 2048 --layers 8 ...]
    python scripts/make_random_model.py OUT --shape qwen3-30b-a3b --layers 12

Mixture-of-experts shapes are written as Hugging Face checkpoints hold them: each
expert's matrices apart (``model.layers.N.mlp.experts.E.gate_proj.weight``), which
mlx-lm's ``sanitize`` stacks when it loads.

Shapes (``--shape``) name the ones the benchmarks use; any argument given after it
overrides that part of it (``--shape llama3-8b --layers 16``). Weights are normal with
standard deviation 0.02 (norms 1), in float16, written one decoder layer per
safetensors shard with an index, so writing takes one layer of memory whatever the
size. The tokenizer is the embedded default model's (vocabulary 49,152; a larger model
vocabulary only means ids the tokenizer never produces). Outputs mean nothing, but the
shapes cost what a real model of that shape costs, which is all a memory or speed
benchmark needs when the real model cannot be downloaded.
"""

import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen3_moe

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, head dim, vocab, tied
    "0.5b": (1536, 16, 4096, 12, 4, 128, 49152, True),
    "1.1b": (2048, 22, 5632, 32, 4, 64, 49152, True),  # TinyLlama-1.1B's shape
    "llama3-8b": (4096, 32, 14336, 32, 8, 128, 128256, False),
    "gemma3-270m-vocab": (640, 18, 2048, 4, 1, 256, 262144, True),  # Gemma 3 270M's widths and vocabulary
}
MOE_SHAPES = {  # hidden, layers, expert MLP, heads, kv heads, head dim, vocab, tied, experts, active
    "qwen3-30b-a3b": (2048, 48, 768, 32, 4, 128, 151936, False, 128, 8),
    "qwen3-235b-a22b": (4096, 94, 1536, 64, 4, 128, 151936, False, 128, 8),
}
FIELDS = ("hidden", "layers", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "tied")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def config_for(shape: dict, default_config: dict) -> dict:
    config = {k: v for k, v in default_config.items() if k not in ("lsaq_source", "quantization")}
    return config | {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": shape["hidden"],
        "num_hidden_layers": shape["layers"], "intermediate_size": shape["intermediate"],
        "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
        "head_dim": shape["head_dim"], "vocab_size": shape["vocab"], "tie_word_embeddings": shape["tied"],
        "torch_dtype": "float16",
    }


def moe_config_for(shape: dict, experts: int, active: int, default_config: dict) -> dict:
    config = config_for(shape, default_config) | {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": experts,
        "num_experts_per_tok": active, "moe_intermediate_size": shape["intermediate"], "decoder_sparse_step": 1,
        "mlp_only_layers": [], "norm_topk_prob": True, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    }
    return config


def hf_names(tensors: dict) -> dict:
    """Stacked experts (mlx-lm's ``switch_mlp``) apart again, under Hugging Face names."""
    out = {}
    for name, value in tensors.items():
        if ".mlp.switch_mlp." not in name:
            out[name] = value
            continue
        stem, _, proj = name.removesuffix(".weight").rpartition(".switch_mlp.")
        for e in range(value.shape[0]):
            out[f"{stem}.experts.{e}.{proj}.weight"] = value[e]
    return out


def random_params(params: dict, key) -> dict:
    """Normal(0, 0.02) weights, ones for norms, in float16."""
    out = {}
    for i, (name, value) in enumerate(sorted(params.items())):
        if "norm" in name:
            out[name] = mx.ones(value.shape, mx.float16)
        else:
            out[name] = (mx.random.normal(value.shape, key=mx.random.split(key, i + 2)[i + 1]) * 0.02).astype(mx.float16)
    return out


def write(out: Path, config: dict, seed: int = 0) -> int:
    """Write the folder; return the number of parameters."""
    module = qwen3_moe if config["model_type"] == "qwen3_moe" else llama
    model = module.Model(module.ModelArgs.from_dict(config))  # built lazily: nothing evaluated
    flat = dict(tree_flatten(model.parameters()))
    groups = {}
    for name in flat:
        parts = name.split(".")
        groups.setdefault(parts[2] if parts[:2] == ["model", "layers"] else "rest", []).append(name)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, count = {}, 0
    key = mx.random.key(seed)
    for n, (group, names) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0] == "rest", int(kv[0]) if kv[0] != "rest" else 0))):
        tensors = hf_names(random_params({k: flat[k] for k in names}, mx.random.split(key, n + 2)[n + 1]))
        mx.eval(tensors)
        file = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "mlx"})
        weight_map |= dict.fromkeys(tensors, file)
        count += sum(v.size for v in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=[*SHAPES, *MOE_SHAPES], default="0.5b")
    for name in FIELDS[:-1]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--untied", action="store_true", help="an LM head of its own")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from lsaq_mlx.sources import resolve_model

    shape = dict(zip(FIELDS, (SHAPES | MOE_SHAPES)[args.shape]))
    shape |= {k: getattr(args, k) for k in FIELDS[:-1] if getattr(args, k) is not None}
    shape["tied"] = shape["tied"] and not args.untied
    default = resolve_model(None).path
    default_config = json.loads((default / "config.json").read_text())
    if args.shape in MOE_SHAPES:
        config = moe_config_for(shape, *MOE_SHAPES[args.shape][-2:], default_config)
    else:
        config = config_for(shape, default_config)
    count = write(args.out, config, args.seed)
    for name in TOKENIZER_FILES:
        if (default / name).exists():
            shutil.copy(default / name, args.out / name)
    print(f"{args.out}: {config['model_type']}, {shape['layers']} layers, hidden {shape['hidden']}, vocab {shape['vocab']}, "
          f"{count / 1e6:.0f}M parameters, float16")


if __name__ == "__main__":
    main()
