"""The tokenizer rebuilt from a GGUF tokenizes exactly as llama.cpp does.

Expected ids were produced by llama.cpp (llama-cpp-python 0.3.36:
``Llama(model_path, vocab_only=True).tokenize(text.encode(), add_bos=..., special=True)``)
on the same files; ``benchmarks/check_gguf_tokenizers.py`` runs llama.cpp's own test vectors.
"""

import json

import pytest
from mlx_lm.utils import load_tokenizer

from lsaq_mlx.errors import UserError
from lsaq_mlx.sources.gguf_file import gguf_metadata, open_gguf
from lsaq_mlx.sources.gguf_tokenizer import build_tokenizer, write_tokenizer
from tiny_models import write_spm_vocab_gguf

SMOLLM2_IDS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Hello world! 12345 don't": [19556, 905, 17, 216, 33, 34, 35, 36, 37, 1326, 982],
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n": [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198],
    "  leading spaces\ttabs\n\n\nnewlines   ": [216, 2899, 5600, 197, 100, 7366, 1116, 198, 2241, 5110, 333],
    "Äpfel naïve café — “quotes” 🦙": [142, 222, 96, 34520, 15486, 46494, 37366, 1841, 619, 385, 2346, 573, 15107, 116, 243],
    "I'm HERE'S you'LL 3.14159": [57, 5248, 27873, 23, 67, 346, 23, 16421, 216, 35, 30, 33, 36, 33, 37, 41],
}

SPM_IDS = {  # with BOS, which SentencePiece vocabularies add by default
    True: {
        "the cat": [1, 273, 276],
        "xyz pqr": [1, 281, 278, 259, 279, 270],
        "  the\n🦙": [1, 259, 259, 273, 13, 243, 162, 169, 156],
        "cat</s>the<|user|> x": [1, 276, 2, 273, 283, 259, 281],
        "thé": [1, 271, 261, 198, 172],
    },
    False: {
        "the cat": [1, 260, 272, 276],
        "xyz pqr": [1, 265, 278, 259, 279, 270],
        "  the\n🦙": [1, 259, 273, 13, 243, 162, 169, 156],
        "cat</s>the<|user|> x": [1, 263, 274, 2, 260, 272, 283, 281],
        "thé": [1, 260, 261, 198, 172],
    },
}


@pytest.mark.parametrize("text", list(SMOLLM2_IDS))
def test_default_model_tokenizes_like_llama_cpp(default_source, text):
    tokenizer = load_tokenizer(default_source.path)
    assert tokenizer.encode(text) == SMOLLM2_IDS[text]
    assert tokenizer.decode(SMOLLM2_IDS[text]) == text


def test_default_model_special_tokens_and_chat_template(default_source):
    tokenizer = load_tokenizer(default_source.path)
    config = json.loads((default_source.path / "config.json").read_text())
    assert config["bos_token_id"] == 1 and 2 in config["eos_token_id"]
    assert 2 in tokenizer.eos_token_ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>\n" in prompt and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("add_space_prefix", [True, False])
def test_sentencepiece_vocabulary_tokenizes_like_llama_cpp(tmp_path, add_space_prefix):
    write_spm_vocab_gguf(tmp_path / "v.gguf", add_space_prefix)
    write_tokenizer(gguf_metadata(open_gguf(tmp_path / "v.gguf")), tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    for text, ids in SPM_IDS[add_space_prefix].items():
        assert tokenizer.encode(text) == ids, text
    assert tokenizer.decode(SPM_IDS[add_space_prefix]["  the\n🦙"][1:]) == "  the\n🦙"


def _vocab_meta(**overrides) -> dict:
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"]}
    return meta | overrides


def test_unsupported_tokenizers_are_one_line_errors():
    with pytest.raises(UserError, match="tokenizer model 'bert'"):
        build_tokenizer(_vocab_meta(**{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(UserError, match="pre-tokenizer 'mystery'"):
        build_tokenizer(_vocab_meta(**{"tokenizer.ggml.pre": "mystery"}))
    with pytest.raises(UserError, match="no tokenizer vocabulary"):
        build_tokenizer(_vocab_meta(**{"tokenizer.ggml.tokens": []}))


def test_merges_apply_in_rank_order():
    tokenizer, info = build_tokenizer(_vocab_meta())
    assert tokenizer.encode("ab", add_special_tokens=False).ids == [2]
    assert not info["add_bos"] and info["eog_ids"] == []
