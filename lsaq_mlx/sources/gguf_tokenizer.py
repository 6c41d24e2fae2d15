"""Rebuild a GGUF file's tokenizer as Hugging Face tokenizer files.

The goal is that ``mlx_lm`` tokenizes exactly as llama.cpp does with the same file
(``llama_tokenize(..., parse_special=True)``), so the rules below mirror
``src/llama-vocab.cpp``:

- ``gpt2`` models (byte-level BPE): the pre-tokenizer is llama.cpp's list of regexes
  for the file's ``tokenizer.ggml.pre`` name, applied one after the other (each splits
  the pieces the previous one left), then GPT-2's byte-to-unicode map and the merges.
- ``llama`` models (SentencePiece): spaces become U+2581, one is prepended to each text
  run when ``add_space_prefix``, then adjacent symbols are merged highest score first;
  leftovers fall back to ``<0xXX>`` byte tokens. In ``tokenizers`` terms that is a BPE
  whose merge ranks follow the scores of the merged tokens.
- Control, user-defined and unknown tokens are matched in raw text before anything
  else, as llama.cpp does when it parses special tokens.
"""

import json
from pathlib import Path

from lsaq_mlx.errors import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# llama.cpp's pre-tokenizer names -> (regexes applied in turn, whole words skip merges).
_PRE_TOKENIZERS = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], False),
    "gpt2": ([_GPT2], False),
    "digits-then-gpt2": ([r"\p{N}", _GPT2], False),
    "llama3": ([_LLAMA3], True),
    "qwen2": ([_QWEN2], False),
    "qwen35": ([_QWEN35], False),
    "deepseek-coder": (["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"], False),
    "falcon": ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"], False),
}
_PRE_ALIASES = {
    "default": "default",
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4", "roberta-bpe"], "gpt2"),
    **dict.fromkeys(
        ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"],
        "digits-then-gpt2",
    ),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe"],
        "llama3",
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"], "qwen2"),
    "falcon": "falcon",
    "qwen35": "qwen35",
    "deepseek-coder": "deepseek-coder",
}
# Tokens llama.cpp treats as end of generation (and as control tokens) by their text.
_EOG_TEXTS = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "<|eom_id|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>",
}


def write_tokenizer(meta: dict, out_dir: Path) -> dict:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for the
    GGUF metadata ``meta`` into ``out_dir``; return the config.json entries for the
    special token ids (``eos_token_id`` lists every end-of-generation token)."""
    tokenizer, info = build_tokenizer(meta)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokens = info["tokens"]
    names = {k: tokens[info[f"{k}_id"]] for k in ("bos", "eos", "unk", "pad") if info[f"{k}_id"] is not None}
    special_map = {f"{k}_token": v for k, v in names.items()}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": info["add_bos"],
        "add_eos_token": info["add_eos"],
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
    config = {f"{k}_token_id": info[f"{k}_id"] for k in ("bos", "pad") if info[f"{k}_id"] is not None}
    if info["eog_ids"]:
        config["eos_token_id"] = info["eog_ids"] if len(info["eog_ids"]) > 1 else info["eog_ids"][0]
    return config


def build_tokenizer(meta: dict):
    """``(tokenizers.Tokenizer, info)`` for GGUF metadata; ``info`` holds the token list,
    special ids and the add-BOS/EOS flags."""
    model = meta.get("tokenizer.ggml.model")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise UserError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    types = [CONTROL if t in _EOG_TEXTS and ty in (NORMAL, USER_DEFINED) else ty for t, ty in zip(tokens, types)]
    if model == "gpt2":
        tokenizer, add_bos_default = _byte_level_bpe(meta, tokens)
    elif model == "llama":
        tokenizer, add_bos_default = _sentencepiece_bpe(meta, tokens, types), True
    else:
        raise UserError(f"unsupported GGUF tokenizer model '{model}' (supported: gpt2, llama)")
    _add_special_tokens(tokenizer, tokens, types)
    info = _special_ids(meta, tokens, types)
    info["add_bos"] = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and info["bos_id"] is not None
    info["add_eos"] = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and info["eos_id"] is not None
    tokenizer.post_processor = _post_processor(info, tokens)
    return tokenizer, info


def _byte_level_bpe(meta: dict, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in _PRE_ALIASES:
        known = ", ".join(sorted(_PRE_ALIASES))
        raise UserError(f"unsupported GGUF pre-tokenizer '{pre}' (supported: {known})")
    regexes, ignore_merges = _PRE_TOKENIZERS[_PRE_ALIASES[pre]]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for merge in meta.get("tokenizer.ggml.merges") or []:
        cut = merge.find(" ", 1)
        a, b = merge[:cut], merge[cut + 1 :]
        if cut > 0 and a in vocab and b in vocab and a + b in vocab:
            merges.append((a, b))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, pre in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, ty in zip(tokens, types) if ty in (NORMAL, USER_DEFINED, UNUSED)}
    ranked = []
    for token in mergeable:
        for cut in range(1, len(token)):
            a, b = token[:cut], token[cut:]
            if a in vocab and b in vocab:
                ranked.append((-scores[vocab[token]], vocab[token], cut, a, b))
    ranked.sort()
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    has_bytes = any(ty == BYTE for ty in types)
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk, byte_fallback=has_bytes, fuse_unk=True)
    )
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tokenizer


def _add_special_tokens(tokenizer, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    added = [
        AddedToken(t, special=ty != USER_DEFINED, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t, ty in zip(tokens, types)
        if ty in (CONTROL, USER_DEFINED, UNKNOWN) and t
    ]
    tokenizer.add_special_tokens([a for a in added if a.special])
    tokenizer.add_tokens([a for a in added if not a.special])


def _special_ids(meta: dict, tokens: list[str], types: list[int]) -> dict:
    def token_id(key):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    info = {"tokens": tokens, **{f"{k}_id": token_id(k) for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}}
    info["unk_id"], info["pad_id"] = info.pop("unknown_id"), info.pop("padding_id")
    eog = [info[k] for k in ("eos_id", "eot_id", "eom_id") if info[k] is not None]
    eog += [i for i, t in enumerate(tokens) if t in _EOG_TEXTS and types[i] == CONTROL]
    info["eog_ids"] = list(dict.fromkeys(eog))
    return info


def _post_processor(info: dict, tokens: list[str]):
    from tokenizers import processors

    added = [info[f"{k}_id"] for k in ("bos", "eos") if info[f"add_{k}"]]
    bos = [tokens[info["bos_id"]]] if info["add_bos"] else []
    eos = [tokens[info["eos_id"]]] if info["add_eos"] else []
    return processors.TemplateProcessing(
        single=" ".join(bos + ["$A"] + eos),
        pair=" ".join(bos + ["$A"] + eos + bos + ["$B"] + eos),
        special_tokens=[(tokens[i], i) for i in dict.fromkeys(added)],
    )
