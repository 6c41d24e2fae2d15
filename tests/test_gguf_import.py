
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from mlx.utils import tree_unflatten
from mlx_lm.utils import load_model

from lsaq_mlx.errors import UserError
from lsaq_mlx.sources.gguf_file import dequantized_tensor, open_gguf
from lsaq_mlx.sources.gguf_import import hf_name, import_gguf, llama3_rope_factors, match_llama3_rope, unpermute_rope_rows
from tiny_models import tiny_model, write_gguf


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1])
def test_import_reproduces_model(arch, qtype, tmp_path):
    model = tiny_model(arch)
    held = write_gguf(model, arch, tmp_path / "m.gguf", qtype)
    out = tmp_path / "out"
    out.mkdir()
    import_gguf(tmp_path / "m.gguf", out)
    imported, config = load_model(out)
    model.update(tree_unflatten(list(held.items())))  # the weights the GGUF really holds
    tokens = mx.array([[1, 5, 9, 200, 42, 7, 3, 250, 11, 64]])
    expected, got = model(tokens), imported(tokens)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=2e-4, rtol=1e-4)
    assert config["torch_dtype"] == "float32"


def test_a_gemma3_gguf_without_an_lm_head_imports_with_tied_embeddings(tmp_path):
    model = tiny_model("gemma3")
    held = write_gguf(model, "gemma3", tmp_path / "m.gguf", leave_out=("lm_head.weight",))  # as Gemma 3 GGUFs are
    out = tmp_path / "out"
    out.mkdir()
    import_gguf(tmp_path / "m.gguf", out)
    imported, _ = load_model(out)
    held["lm_head.weight"] = held["model.embed_tokens.weight"]
    model.update(tree_unflatten(list(held.items())))
    tokens = mx.array([[1, 5, 9, 200, 42, 7, 3, 250, 11, 64]])
    assert "lm_head" not in imported
    np.testing.assert_allclose(np.array(imported(tokens)), np.array(model(tokens)), atol=2e-4, rtol=1e-4)


def test_llama_permutation_is_undone():
    w = np.arange(8 * 3).reshape(8, 3).astype(np.float32)
    # llama.cpp's converter: rows of each head go (0, half, 1, half+1, ...)
    permuted = w.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 2), w)


def test_tensor_names():
    assert hf_name("blk.3.attn_q.weight", "llama") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias", "qwen2") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.1.ffn_norm.weight", "llama") == "model.layers.1.post_attention_layernorm.weight"
    assert hf_name("blk.1.ffn_norm.weight", "gemma3") == "model.layers.1.pre_feedforward_layernorm.weight"
    assert hf_name("blk.1.post_ffw_norm.weight", "gemma3") == "model.layers.1.post_feedforward_layernorm.weight"
    assert hf_name("output.weight", "llama") == "lm_head.weight"
    assert hf_name("token_embd.weight", "qwen3") == "model.embed_tokens.weight"
    assert hf_name("rope_freqs.weight", "llama") is None


def _write_raw(path, name, raw, qtype, shape):
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor(name, raw, raw_shape=shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_q8_0_dequantization_by_hand(tmp_path):
    # one Q8_0 block: float16 scale d, then 32 int8 codes; value = d * q
    d, q = np.float16(0.125), np.arange(-16, 16, dtype=np.int8)
    raw = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), q.view(np.uint8)]).reshape(1, 34)
    _write_raw(tmp_path / "q.gguf", "w", raw, Q.Q8_0, (1, 34))
    (tensor,) = open_gguf(tmp_path / "q.gguf").tensors
    np.testing.assert_array_equal(dequantized_tensor(tensor), (0.125 * q.astype(np.float32))[None])


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.BF16, Q.F16])
def test_k_quants_and_floats_dequantize(qtype, tmp_path):
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    # bytes below 0x7C never make a float16/bfloat16 infinity or NaN, wherever scales sit
    raw = rng.integers(0, 0x7C, size=(4, 256 // block * size), dtype=np.uint8)
    _write_raw(tmp_path / "k.gguf", "w", raw, qtype, raw.shape)
    (tensor,) = open_gguf(tmp_path / "k.gguf").tensors
    w = dequantized_tensor(tensor)
    assert w.shape == (4, 256) and w.dtype == np.float32 and np.isfinite(w).all() and w.std() > 0


def test_llama3_rope_factors_are_recognized():
    params = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factors = llama3_rope_factors(params, 64, 500000.0)
    assert match_llama3_rope(factors, 64, 500000.0) == {"rope_type": "llama3", **params}
    with pytest.raises(UserError):
        match_llama3_rope(factors * 1.5, 64, 500000.0)


def test_unsupported_architecture(tmp_path):
    writer = GGUFWriter(str(tmp_path / "x.gguf"), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="unsupported GGUF architecture 'falcon'"):
        import_gguf(tmp_path / "x.gguf", tmp_path)


def test_truncated_gguf(tmp_path):
    model = tiny_model("qwen2")
    write_gguf(model, "qwen2", tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        open_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 100)
    with pytest.raises(UserError, match="not a readable GGUF"):
        open_gguf(tmp_path / "junk.gguf")
