"""Small random models of the supported architectures, and GGUF files written from
them the way llama.cpp's converter writes them (its names, its Q/K row permutation for
llama, Gemma's +1 on norm weights), for import tests."""

import importlib
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten, tree_unflatten

from lsaq_mlx.sources.gguf_import import _GEMMA3_LAYER_NAMES, _GLOBAL_NAMES, _LAYER_NAMES

VOCAB = 300

ARGS = {
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
                  rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
                  rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
                  max_position_embeddings=512, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                   vocab_size=VOCAB, sliding_window=8, query_pre_attn_scalar=32),
}


def tiny_model(arch: str, seed: int = 0):
    """A random mlx-lm model of ``arch`` with norms away from 1 and biases non-zero."""
    args = ARGS[arch]
    module = importlib.import_module(f"mlx_lm.models.{args['model_type']}")
    model = module.Model(module.ModelArgs(**args))
    mx.random.seed(seed)
    params = {k: mx.random.normal(v.shape) * (0.5 if v.ndim == 1 else 0.1) + (1.0 if "norm" in k else 0.0)
              for k, v in tree_flatten(model.parameters())}
    model.update(tree_unflatten(list(params.items())))
    mx.eval(model.parameters())
    return model


def _gguf_name(hf: str, arch: str) -> str:
    names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    stem, _, kind = hf.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, index, part = stem.split(".", 3)
        return f"blk.{index}.{next(k for k, v in names.items() if v == part)}.{kind}"
    return f"{next(k for k, v in _GLOBAL_NAMES.items() if v == stem)}.{kind}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_vocab() -> list[str]:
    """256 byte-level tokens (GPT-2's byte-to-unicode map) plus an end-of-text token, padded."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = [chr(c) for _, c in sorted(zip(bs, cs))]
    tokens += ["<|endoftext|>"] + [f"<unused{i}>" for i in range(VOCAB - 257)]
    return tokens


def write_gguf(model, arch: str, path: Path, qtype=GGMLQuantizationType.Q8_0, hparams: dict | None = None,
               leave_out: tuple[str, ...] = ()) -> dict:
    """Write ``model`` as llama.cpp would, 2-D weights in ``qtype``; ``hparams`` replaces
    metadata values (``{"attention.head_count": 0}``: ints as uint32, floats as float32,
    strings as strings), for tests of hostile files; ``leave_out``: HF names not written.

    Returns the weights the GGUF really holds (after quantization), under HF names,
    so a test can compare the import with a model carrying exactly those weights.
    """
    args = ARGS[arch]
    writer = GGUFWriter(str(path), arch)
    _write_hparams(writer, arch, args, hparams or {})
    tokens = byte_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] + [5] * (VOCAB - 257))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    held = {}
    for name, w in tree_flatten(model.parameters()):
        if name in leave_out:
            continue
        w = np.array(w.astype(mx.float32))
        gguf_w = w + 1.0 if arch == "gemma3" and name.endswith("norm.weight") else w
        if arch == "llama" and "q_proj.weight" in name:
            gguf_w = _permute(gguf_w, args["num_attention_heads"])
        elif arch == "llama" and "k_proj.weight" in name:
            gguf_w = _permute(gguf_w, args["num_key_value_heads"])
        if w.ndim == 2:
            raw = quantize(gguf_w, qtype)
            writer.add_tensor(_gguf_name(name, arch), raw, raw_dtype=qtype)
            w_held = dequantize(raw, qtype).reshape(gguf_w.shape)
            if arch == "llama" and ("q_proj.weight" in name or "k_proj.weight" in name):
                n = args["num_attention_heads"] if "q_proj" in name else args["num_key_value_heads"]
                w_held = _unpermute(w_held, n)
        else:
            writer.add_tensor(_gguf_name(name, arch), gguf_w.astype(np.float32))
            w_held = w
        held[name] = mx.array(w_held.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_hparams(writer: GGUFWriter, arch: str, args: dict, overrides: dict | None = None) -> None:
    overrides = overrides or {}

    def put(key, value):
        value = overrides.get(key, value)
        add = writer.add_string if isinstance(value, str) else writer.add_float32 if isinstance(value, float) else writer.add_uint32
        add(f"{arch}.{key}", value)

    put("block_count", args["num_hidden_layers"])
    put("context_length", args.get("max_position_embeddings", 2048))
    put("embedding_length", args["hidden_size"])
    put("feed_forward_length", args["intermediate_size"])
    put("attention.head_count", args["num_attention_heads"])
    put("attention.head_count_kv", args["num_key_value_heads"])
    put("attention.layer_norm_rms_epsilon", float(args["rms_norm_eps"]))
    put("rope.freq_base", float(args.get("rope_theta", 1000000.0)))
    if "head_dim" in args:
        put("attention.key_length", args["head_dim"])
        put("attention.value_length", args["head_dim"])
    if arch == "gemma3":
        put("attention.sliding_window", args["sliding_window"])


# A SentencePiece-style vocabulary: unknown/control tokens, byte fallback, pieces whose
# scores decide the merge order ("xyz": "yz" wins; "pqr": "pq" wins), a user-defined token.
SPM_PIECES = [("▁", -1.0), ("t", -2.0), ("h", -2.0), ("e", -2.0), ("c", -2.0), ("a", -2.0),
              ("x", -3.0), ("y", -3.0), ("z", -3.0), ("p", -3.0), ("q", -3.0), ("r", -3.0),
              ("▁t", -4.0), ("he", -5.0), ("▁the", -6.0), ("at", -7.0), ("▁c", -8.0), ("▁cat", -9.0),
              ("xy", -20.0), ("yz", -10.0), ("pq", -10.0), ("qr", -20.0), ("▁x", -30.0), ("▁p", -30.0)]


def write_spm_vocab_gguf(path: Path, add_space_prefix: bool = True) -> None:
    """A vocabulary-only llama GGUF with a SentencePiece tokenizer (``llama`` model)."""
    writer = GGUFWriter(str(path), "llama")
    _write_hparams(writer, "llama", ARGS["llama"])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [p for p, _ in SPM_PIECES] + ["<|user|>"]
    types += [1] * len(SPM_PIECES) + [4]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * 259 + [s for _, s in SPM_PIECES] + [0.0])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
