"""Tiny random models of mlx-lm model types written as Hugging Face checkpoints: the
tensor names and layout the hub's folders have (each expert's matrices apart, as
mlx-lm's ``sanitize`` expects them), float16, and the default model's tokenizer."""

import importlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
              rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False)

QWEN3_5_ROPE = {"type": "default", "mrope_section": [1, 1, 0], "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=32, head_dim=16,
                      norm_topk_prob=True),
    "mixtral": dict(model_type="mixtral", intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", intermediate_size=128, linear_num_value_heads=4,
                        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                        shared_expert_intermediate_size=32, moe_intermediate_size=32, head_dim=16,
                        full_attention_interval=2, rope_parameters=QWEN3_5_ROPE),
}
DENSE_CONFIGS = {  # dense types whose forward changes the head's output
    "granite": dict(model_type="granite", intermediate_size=128, logits_scaling=8.0, attention_multiplier=0.25,
                    embedding_multiplier=12.0, residual_multiplier=0.22, attention_bias=False, mlp_bias=False),
    "gemma2": dict(model_type="gemma2", intermediate_size=128, head_dim=16, final_logit_softcapping=5.0,
                   attn_logit_softcapping=50.0, query_pre_attn_scalar=16),
    "gemma4_text": dict(model_type="gemma4_text", intermediate_size=128, head_dim=16, global_head_dim=32,
                        num_hidden_layers=4, num_kv_shared_layers=2, num_key_value_heads=1,
                        hidden_size_per_layer_input=16, vocab_size_per_layer_input=300, sliding_window=8,
                        sliding_window_pattern=2, final_logit_softcapping=30.0),
}
OTHER_CONFIGS = {  # written in mlx-lm's own layout (sanitize leaves it as it is)
    "llama": dict(model_type="llama", intermediate_size=128),
    "qwen3": dict(model_type="qwen3", intermediate_size=128, head_dim=16),
    "gemma3_text": dict(model_type="gemma3_text", intermediate_size=128, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=8, sliding_window_pattern=2),
    "phi3": dict(model_type="phi3", intermediate_size=128),
    "gpt_oss": dict(model_type="gpt_oss", intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                    head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "deepseek_v3": dict(model_type="deepseek_v3", intermediate_size=128, moe_intermediate_size=32,
                        num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=16,
                        q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1),
    "glm4_moe": dict(model_type="glm4_moe", intermediate_size=128, moe_intermediate_size=32, norm_topk_prob=True,
                     n_group=1, head_dim=16, topk_group=1, n_shared_experts=1, n_routed_experts=4,
                     routed_scaling_factor=1.0, num_experts_per_tok=2, first_k_dense_replace=1, use_qk_norm=True,
                     attention_bias=False, partial_rotary_factor=0.5, rope_scaling=None),
    "qwen3_next": dict(model_type="qwen3_next", intermediate_size=128, linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                       linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                       shared_expert_intermediate_size=32, mlp_only_layers=[], moe_intermediate_size=32,
                       partial_rotary_factor=0.25, head_dim=16, full_attention_interval=2),
    "qwen3_5": dict(model_type="qwen3_5", intermediate_size=128, linear_num_value_heads=4, linear_num_key_heads=2,
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, head_dim=16,
                    full_attention_interval=2, rope_parameters=QWEN3_5_ROPE),
    "nemotron_h": dict(model_type="nemotron_h", intermediate_size=128, attention_bias=False, mamba_num_heads=4,
                       mamba_head_dim=16, mamba_proj_bias=False, ssm_state_size=16, conv_kernel=4, n_groups=1,
                       mlp_bias=False, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True,
                       hybrid_override_pattern="M*-M", num_hidden_layers=4, head_dim=16),
    "lfm2": dict(model_type="lfm2", norm_eps=1e-5, conv_bias=False, conv_L_cache=3, block_dim=64,
                 block_multiple_of=16, block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False,
                 block_ff_dim=128, full_attn_idxs=[1]),
}
ALL_CONFIGS = CONFIGS | DENSE_CONFIGS | OTHER_CONFIGS

# mlx-lm's stacked expert parameter -> the Hugging Face name of expert {e}'s
EXPERT_NAMES = {
    "qwen3_moe": {"mlp.switch_mlp.{p}.weight": "mlp.experts.{e}.{p}.weight"},
    "mixtral": {"block_sparse_moe.switch_mlp.gate_proj.weight": "block_sparse_moe.experts.{e}.w1.weight",
                "block_sparse_moe.switch_mlp.down_proj.weight": "block_sparse_moe.experts.{e}.w2.weight",
                "block_sparse_moe.switch_mlp.up_proj.weight": "block_sparse_moe.experts.{e}.w3.weight"},
}


def build(model_type: str, vocab_size: int, seed: int = 0):
    """The mlx-lm model of ``model_type`` with random weights (norms near 1) and its config."""
    config = COMMON | ALL_CONFIGS[model_type] | {"vocab_size": vocab_size}
    if "vocab_size_per_layer_input" in config:  # Gemma 4's per-layer embeddings share the vocabulary
        config["vocab_size_per_layer_input"] = vocab_size
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.random.seed(seed)
    params = {k: (mx.random.normal(v.shape) * (0.1 if v.ndim == 1 else 0.05) + (1.0 if "norm" in k else 0.0))
              for k, v in tree_flatten(model.parameters())}
    model.update(tree_unflatten(list(params.items())))
    mx.eval(model.parameters())
    return model, config


def hf_tensors(model, model_type: str) -> dict[str, mx.array]:
    """The model's parameters under Hugging Face names, experts apart, float16."""
    if model_type in ("qwen3_5", "qwen3_5_moe"):
        return _qwen3_5_tensors(model)
    out = {}
    for name, value in tree_flatten(model.parameters()):
        stem, _, rest = name.partition(".layers.")
        index, _, local = rest.partition(".")
        pattern = next(((k, v) for k, v in EXPERT_NAMES.get(model_type, {}).items()
                        if _matches(k, local)), None)
        if pattern is None:
            out[name] = value.astype(mx.float16)
            continue
        proj = local.split(".")[-2]
        for e in range(value.shape[0]):
            hf = pattern[1].format(e=e, p=proj)
            out[f"{stem}.layers.{index}.{hf}"] = value[e].astype(mx.float16)
    return out


def _qwen3_5_tensors(model) -> dict[str, mx.array]:
    """Qwen3.5 as its Hugging Face checkpoints hold it: under ``model.language_model``,
    norms stored as offsets from 1, the convolution as (channels, 1, kernel) and each
    layer's experts fused into ``experts.gate_up_proj`` and ``experts.down_proj``."""
    out = {}
    for name, value in tree_flatten(model.parameters()):
        name = name.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.",
                                                                                         "lm_head.")
        if "conv1d.weight" in name:
            value = value.moveaxis(2, 1)
        elif name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "model.language_model.norm.weight",
                            "q_norm.weight", "k_norm.weight")):
            value = value - 1.0
        if ".switch_mlp." in name:
            stem, _, proj = name.partition(".switch_mlp.")
            if proj == "gate_proj.weight":
                up = dict(tree_flatten(model.parameters()))[name.replace("model.language_model.", "language_model.model.")
                                                             .replace("gate_proj", "up_proj")]
                out[f"{stem}.experts.gate_up_proj"] = mx.concatenate([value, up], axis=-2).astype(mx.float16)
            elif proj == "down_proj.weight":
                out[f"{stem}.experts.down_proj"] = value.astype(mx.float16)
            continue
        out[name] = value.astype(mx.float16)
    return out


def _matches(pattern: str, local: str) -> bool:
    head, _, tail = pattern.partition("{p}")
    return local.startswith(head) and local.endswith(tail) if "{p}" in pattern else local == pattern


def write_hf_folder(model_type: str, folder: Path, tokenizer_folder: Path, seed: int = 0) -> Path:
    """A Hugging Face checkpoint folder of a tiny random ``model_type`` model, with the
    tokenizer of ``tokenizer_folder`` (its vocabulary size is the model's)."""
    vocab = json.loads((tokenizer_folder / "config.json").read_text())["vocab_size"]
    model, config = build(model_type, vocab, seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(model, model_type)
    mx.save_safetensors(str(folder / "model.safetensors"), tensors, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config | {"torch_dtype": "float16"}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, folder / name)
    return folder


def write_mxfp4_gpt_oss(folder: Path, tokenizer_folder: Path, seed: int = 0) -> tuple[Path, nn.Module]:
    """A tiny gpt-oss checkpoint as OpenAI ships gpt-oss: the experts in MXFP4 (``*_blocks``
    of 16 bytes per 32 weights, ``*_scales`` of one byte each, gate and up interleaved
    row by row in ``gate_up_proj``), ``quant_method: mxfp4``; the rest float16. Also the
    model it stands for (its experts the MXFP4 values, exactly)."""
    vocab = json.loads((tokenizer_folder / "config.json").read_text())["vocab_size"]
    model, config = build("gpt_oss", vocab, seed)
    tensors = {}
    for name, value in tree_flatten(model.parameters()):
        if ".mlp.experts." not in name:
            tensors[name] = value.astype(mx.float16)
    for i, layer in enumerate(model.model.layers):
        experts, stem = layer.mlp.experts, f"model.layers.{i}.mlp.experts"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(experts, proj)
            codes, scales = mx.quantize(linear.weight, 32, 4, mode="mxfp4")
            linear.weight = mx.dequantize(codes, scales, None, 32, 4, mode="mxfp4")  # what the checkpoint holds
            linear.blocks = codes.view(mx.uint8).reshape(*scales.shape, 16)
            linear.block_scales = scales
        gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
        interleave = lambda a, b: mx.stack([a, b], axis=2).reshape(a.shape[0], -1, *a.shape[2:])  # noqa: E731
        tensors |= {f"{stem}.gate_up_proj_blocks": interleave(gate.blocks, up.blocks),
                    f"{stem}.gate_up_proj_scales": interleave(gate.block_scales, up.block_scales),
                    f"{stem}.gate_up_proj_bias": interleave(gate.bias, up.bias).astype(mx.float16),
                    f"{stem}.down_proj_blocks": down.blocks, f"{stem}.down_proj_scales": down.block_scales,
                    f"{stem}.down_proj_bias": down.bias.astype(mx.float16)}
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), tensors, metadata={"format": "pt"})
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                        "model.layers.*.mlp.router",
                                                                        "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config | {"torch_dtype": "bfloat16",
                                                             "quantization_config": quantization}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, folder / name)
    return folder, model


def write_fp8_deepseek_v3(folder: Path, tokenizer_folder: Path, seed: int = 0) -> Path:
    """A tiny DeepSeek-V3 checkpoint as DeepSeek ships it: each linear weight of the decoder
    layers in FP8 E4M3 with a ``weight_scale_inv`` per 128 x 128 block, each routed expert
    apart, ``quant_method: fp8``; the rest float16."""
    vocab = json.loads((tokenizer_folder / "config.json").read_text())["vocab_size"]
    model, config = build("deepseek_v3", vocab, seed)
    tensors = {}
    for name, value in tree_flatten(model.parameters()):
        if ".layers." not in name or not name.endswith("proj.weight"):
            tensors[name] = value.astype(mx.float16)
            continue
        stem = name.removesuffix(".weight")
        parts = [(f"{stem}.weight", value)] if value.ndim == 2 else \
            [(stem.replace("switch_mlp", f"experts.{e}") + ".weight", value[e]) for e in range(value.shape[0])]
        for part, w in parts:
            scale = mx.abs(w).max() / 448.0  # one block: the tiny matrices are under 128 x 128
            tensors[part] = _F8(mx.to_fp8(w / scale))
            tensors[part.replace(".weight", ".weight_scale_inv")] = scale.reshape(1, 1).astype(mx.float32)
    folder.mkdir(parents=True, exist_ok=True)
    _save_with_fp8(folder / "model.safetensors", tensors)
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config | {"torch_dtype": "bfloat16",
                                                             "quantization_config": quantization}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, folder / name)
    return folder


class _F8:
    """FP8 E4M3 codes (uint8) to be written with safetensors' F8_E4M3 dtype."""

    def __init__(self, codes: mx.array):
        self.codes = codes


def _save_with_fp8(path: Path, tensors: dict) -> None:
    """A safetensors file whose ``_F8`` tensors carry the F8_E4M3 dtype (MLX writes its
    uint8 codes as U8; checkpoints from the hub say F8_E4M3, and MLX reads them as uint8)."""
    import struct

    import numpy as np

    names = {mx.float16: "F16", mx.float32: "F32", mx.uint8: "U8"}
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        dtype = "F8_E4M3" if isinstance(value, _F8) else names[value.dtype]
        data = np.array(value.codes if isinstance(value, _F8) else value).tobytes()
        header[name] = {"dtype": dtype, "shape": list((value.codes if isinstance(value, _F8) else value).shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
