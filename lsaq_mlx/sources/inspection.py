"""What ``lsaq-mlx inspect`` reports about a model: structure, precision, size."""

from collections import defaultdict
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten

from lsaq_mlx.modules import layer_index
from lsaq_mlx.sources import ModelSource, load_model
from lsaq_mlx.swsc.layer import SWSCLinear, model_bits_per_weight
from lsaq_mlx.documents import read_json_object


def module_kind(path: str) -> str:
    """A module's kind: the last part of its path ("q_proj", "embed_tokens", ...);
    ``experts.`` before it for a layer's stacked experts."""
    parent, _, name = path.rpartition(".")
    return f"experts.{name}" if parent.endswith(("switch_mlp", "experts")) else name


def _quantized(module: nn.Module) -> bool:
    """Any MLX quantized module: linear, embedding, stacked experts (their ``scales``)."""
    return "scales" in module and isinstance(getattr(module, "bits", None), int)


def module_precision(module: nn.Module) -> dict:
    if isinstance(module, SWSCLinear):
        s = module.settings
        return {"codec": "swsc", "k": s.k, "rank": s.rank, "axis": s.axis, "centroid_bits": s.centroid_bits}
    if _quantized(module):
        return {"bits": module.bits, "group_size": module.group_size, "mode": module.mode}
    return {"dtype": str(module.weight.dtype).split(".")[-1]}


def parameter_count(module: nn.Module) -> int:
    """Logical weights (a quantized weight counts its unpacked elements), as mlx-lm counts."""
    if isinstance(module, SWSCLinear):
        return module.weight_count
    total = 0
    for name, p in tree_flatten(module.parameters()):
        if name in ("scales", "biases") and _quantized(module):
            continue
        bits = getattr(module, "bits", None) if name == "weight" else None
        total += p.size * 32 // bits if bits else p.size
    return total


def weight_modules(model: nn.Module):
    """``(path, module)`` for every leaf module that holds parameters."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    return [(path, m) for path, m in leaves if m.parameters()]


def describe_model(source: ModelSource) -> dict:
    model, tokenizer, config = load_model(source, compute=False, lazy=True)
    modules, by_kind = [], defaultdict(lambda: {"count": 0, "parameters": 0, "bytes": 0})
    for path, module in weight_modules(model):
        n_bytes = sum(p.nbytes for _, p in tree_flatten(module.parameters()))
        n_params = parameter_count(module)
        layer = layer_index(path)
        modules.append(
            {
                "path": path,
                "kind": module_kind(path),
                "layer": layer,
                "shape": list(getattr(module, "weight").shape) if "weight" in module else None,
                "parameters": n_params,
                "bytes": n_bytes,
                **module_precision(module),
            }
        )
        kind = by_kind[module_kind(path)]
        kind["count"] += 1
        kind["parameters"] += n_params
        kind["bytes"] += n_bytes
    total_params = sum(m["parameters"] for m in modules)
    total_bytes = sum(m["bytes"] for m in modules)
    files = [Path(source.origin)] if source.kind == "pack" else sorted(Path(source.path).glob("*.safetensors"))
    tokenizer_config = read_json_object(Path(source.path) / "tokenizer_config.json")
    return {
        "model": source.spec or "default",
        "source": {"kind": source.kind, "origin": source.origin, "path": str(source.path), "fingerprint": source.fingerprint},
        "model_type": config.get("model_type"),
        "layers": len(model.layers),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "tied_embeddings": config.get("tie_word_embeddings", "lm_head" not in dict(model.named_modules())),
        "quantization": config.get("quantization"),
        "parameters": total_params,
        "weight_bytes": total_bytes,
        "bits_per_weight": model_bits_per_weight(model),
        "size_on_disk": sum(f.stat().st_size for f in files),
        "files": [f.name for f in files],
        "tokenizer": _has_tokenizer(Path(source.path)),
        "chat_template": bool(tokenizer.chat_template or tokenizer_config.get("chat_template")),
        "by_kind": dict(by_kind),
        "modules": modules,
    }


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tiktoken.model"))


def precision_label(module_info: dict) -> str:
    if module_info.get("codec") == "swsc":
        return f"swsc k{module_info['k']} r{module_info['rank']}"
    if "bits" in module_info:  # as plans write it: bits/group, or the format
        mode = module_info["mode"]
        return f"{module_info['bits']}/{module_info['group_size']}" if mode == "affine" else mode
    return module_info["dtype"]


def stored_bits_per_weight(source: ModelSource) -> float:
    """mlx-lm's bits per weight of ``source`` as it is stored (the model is built lazily:
    sizes only, no weight is read)."""
    from lsaq_mlx.swsc.layer import model_bits_per_weight

    return model_bits_per_weight(load_model(source, compute=False, lazy=True)[0])
