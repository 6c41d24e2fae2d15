"""Import a GGUF file (llama, qwen2, qwen3, gemma3) into an MLX model folder.

Weights are dequantized with llama.cpp's own reader (the ``gguf`` package), which
handles every tensor type (Q4_0/Q4_1/Q8_0, the K-quants, F16/BF16/F32). The folder
holds Hugging Face tensor names, so stock ``mlx_lm.load`` opens it.

Source precision: llama.cpp dequantizes in float32, and the products ``d * q + m``
of a Q-type block are exact in float32 but not in float16 (``mx.dequantize`` on the
float16 scales that ``mx.load`` returns differs by up to 2e-3 on SmolLM2). So
quantized tensors become float32, the exact "full precision" of the file, unless
the model has more than ``FLOAT32_LIMIT`` parameters, where float16 halves the disk
and its rounding (2^-11 relative) stays below 1 % of a 4-bit quantization step.
Float GGUFs keep their own float type.
"""

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from lsaq_mlx.errors import UserError
from lsaq_mlx.formats import check_config
from lsaq_mlx.progress import announce, progress_bar
from lsaq_mlx.sizes import format_size
from lsaq_mlx.sources.gguf_file import dequantized_tensor, gguf_metadata, open_gguf
from lsaq_mlx.sources.gguf_tokenizer import write_tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
FLOAT32_LIMIT = 3_000_000_000
SHARD_BYTES = 2 << 30
_BLOCK = re.compile(r"^blk\.(\d{1,5})\.(\w+)$")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has a norm on each side of attention and of the MLP.
_GEMMA3_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors MLX does not use."""
    stem, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    layer = _BLOCK.match(stem)
    if layer:
        names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
        part = names.get(layer.group(2))
        return f"model.layers.{int(layer.group(1))}.{part}.{kind}" if part else None
    return f"{_GLOBAL_NAMES[stem]}.{kind}" if stem in _GLOBAL_NAMES else None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its converter interleaves the two halves
    of each head so GGML's "normal" RoPE applies; mlx-lm rotates halves like HF)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_config(meta: dict, arch: str, vocab_size: int, tied: bool) -> dict:
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    for key in ("embedding_length", "attention.head_count", "block_count", "feed_forward_length"):
        if get(key) is None:
            raise UserError(f"GGUF metadata lacks the {arch} hyperparameters (block_count, embedding_length, ...)")
    for key in ("embedding_length", "attention.head_count", "block_count", "feed_forward_length",
                "attention.head_count_kv", "attention.key_length", "context_length", "attention.sliding_window"):
        value = get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise UserError(f"GGUF metadata {arch}.{key} is {str(value)[:40]!r}, not a positive whole number")
    for key in ("rope.freq_base", "attention.layer_norm_rms_epsilon", "rope.scaling.factor"):
        value = get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
            raise UserError(f"GGUF metadata {arch}.{key} is {str(value)[:40]!r}, not a positive number")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
    }
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": get("rope.scaling.factor")}
    if arch == "llama":
        config |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    elif arch == "qwen2":
        config |= {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    elif arch == "qwen3":
        config |= {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
    elif arch == "gemma3":
        # llama.cpp hard-codes these for Gemma 3 (llama-model.cpp); so do we.
        big = config["num_hidden_layers"] == 62  # the 27B scales queries by hidden/heads
        config |= {
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "sliding_window": get("attention.sliding_window", 512),
            "sliding_window_pattern": 6,
            "rope_local_base_freq": 10000.0,
            "query_pre_attn_scalar": hidden // heads if big else config["head_dim"],
        }
        config.pop("tie_word_embeddings")
    return config


# Llama 3.x stores its RoPE frequency factors as a tensor; mlx-lm wants the
# parameters that produced it. These are the ones Meta has published.
_LLAMA3_ROPE_CANDIDATES = [
    {"factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for f in (8.0, 16.0, 32.0)
]


def llama3_rope_factors(params: dict, head_dim: int, theta: float) -> np.ndarray:
    freqs = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    low_wl = params["original_max_position_embeddings"] / params["low_freq_factor"]
    high_wl = params["original_max_position_embeddings"] / params["high_freq_factor"]
    smooth = (params["original_max_position_embeddings"] / wavelen - params["low_freq_factor"]) / (
        params["high_freq_factor"] - params["low_freq_factor"]
    )
    mid = 1 / ((1 - smooth) / params["factor"] + smooth)
    return np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, params["factor"], mid))


def match_llama3_rope(rope_freqs: np.ndarray, head_dim: int, theta: float) -> dict:
    for params in _LLAMA3_ROPE_CANDIDATES:
        expected = llama3_rope_factors(params, head_dim, theta)
        if expected.shape == rope_freqs.shape and np.allclose(expected, rope_freqs, rtol=1e-4):
            return {"rope_type": "llama3", **params}
    raise UserError("GGUF has RoPE frequency factors that match no known Llama 3 rope_scaling")


def source_dtype(tensors, n_params: int) -> mx.Dtype:
    from gguf import GGMLQuantizationType as Q

    kinds = {t.tensor_type for t in tensors if len(t.shape) > 1}
    if kinds <= {Q.F16}:
        return mx.float16
    if kinds <= {Q.BF16}:
        return mx.bfloat16
    return mx.float32 if n_params <= FLOAT32_LIMIT else mx.float16


def import_gguf(path: Path, out_dir: Path) -> dict:
    """Write an MLX model folder for the GGUF at ``path`` into ``out_dir``; return its config."""
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported GGUF architecture '{arch}' in {path} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path} has no token_embd.weight tensor: not a complete language model")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    config = model_config(meta, arch, vocab_size, tied="output.weight" not in tensors)
    if "rope_freqs.weight" in tensors:
        config["rope_scaling"] = match_llama3_rope(
            dequantized_tensor(tensors["rope_freqs.weight"]), config["head_dim"], config["rope_theta"]
        )
    if "blk.0.attn_q.bias" in tensors and arch == "llama":
        config["attention_bias"] = True
    check_config(config, path)
    _check_tensor_shapes(reader.tensors, arch, config, path)
    n_params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    dtype = source_dtype(reader.tensors, n_params)
    announce(f"importing {Path(path).name} ({format_size(Path(path).stat().st_size)}) into the cache, once: "
             f"{format_size(n_params * dtype.size)} of {str(dtype).split('.')[-1]} weights in {out_dir.parent} "
             "(lsaq-mlx cache list shows it, cache rm removes it)")
    with progress_bar(f"importing {Path(path).name}", len(reader.tensors)) as advance:
        weight_map = _write_weights(reader.tensors, arch, config, dtype, out_dir, advance)
    try:
        config |= write_tokenizer(meta, out_dir)
    except (UserError, OSError):
        raise
    except Exception as e:  # the tokenizers library refuses what it cannot build
        raise UserError(f"{path} holds a tokenizer that cannot be rebuilt: {type(e).__name__}: {str(e)[:200]}") from None
    config["torch_dtype"] = str(dtype).split(".")[-1]
    config["lsaq_source"] = {"format": "gguf", "file": Path(path).name, "dtype": config["torch_dtype"]}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"format": "mlx"}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return config


# mlx-lm's Gemma 3 model has an LM head of its own unless the checkpoint lacks one
# (its sanitize then ties it to the embeddings), as Gemma 3 GGUFs do
_TIED_WHEN_ABSENT = {"gemma3": {"lm_head.weight"}}


def _check_tensor_shapes(tensors, arch: str, config: dict, path: Path) -> None:
    """Every tensor the import writes must have the shape mlx-lm's model of ``config``
    gives it, and every weight of that model must be there (the model is built lazily:
    no memory is used)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    try:
        expected = dict(tree_flatten(model_class(args_class.from_dict(config)).parameters()))
    except (ValueError, TypeError, KeyError, ZeroDivisionError, AttributeError) as e:
        raise UserError(f"{path} describes no valid {arch} model ({type(e).__name__}: {e})") from None
    found = set()
    for t in tensors:
        name = hf_name(t.name, arch)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        if name not in expected or tuple(expected[name].shape) != shape or name in found:
            want = tuple(expected[name].shape) if name in expected else "none"
            raise UserError(f"{path}: tensor {t.name} has shape {shape}; a {arch} model of its hyperparameters "
                            f"needs {want}")
        found.add(name)
    missing = sorted(set(expected) - found - _TIED_WHEN_ABSENT.get(arch, set()))
    if missing:
        raise UserError(f"{path} lacks {len(missing)} tensors of a {arch} model, e.g. {missing[0]}")


def _convert_tensor(tensor, name: str, arch: str, config: dict, dtype) -> mx.array:
    w = dequantized_tensor(tensor)
    if arch == "llama" and ".self_attn.q_proj." in name:
        w = unpermute_rope_rows(w, config["num_attention_heads"])
    elif arch == "llama" and ".self_attn.k_proj." in name:
        w = unpermute_rope_rows(w, config["num_key_value_heads"])
    elif arch == "gemma3" and name.endswith("norm.weight"):
        w = w - 1.0  # llama.cpp stores Gemma's (1 + weight); mlx-lm adds the 1 itself
    return mx.array(w).astype(dtype)


def _write_weights(tensors, arch, config, dtype, out_dir: Path, advance) -> dict:
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            file = out_dir / f"shard-{len(shards)}.safetensors"
            mx.save_safetensors(str(file), current, metadata={"format": "mlx"})
            shards.append((file, list(current)))
            current, size = {}, 0

    for tensor in tensors:
        name = hf_name(tensor.name, arch)
        if name is not None:
            current[name] = _convert_tensor(tensor, name, arch, config, dtype)
            mx.eval(current[name])
            size += current[name].nbytes
        advance()
        if size >= SHARD_BYTES:
            flush()
    flush()
    weight_map = {}
    for i, (file, names) in enumerate(shards):
        final = out_dir / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        file.rename(final)
        weight_map |= {n: final.name for n in names}
    return weight_map
