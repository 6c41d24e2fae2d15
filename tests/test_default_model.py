"""End-to-end checks on the embedded default model (SmolLM2-135M-Instruct)."""

import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn

from conftest import shared_file
from lsaq_mlx.backend.compute import dequantize_layers
from lsaq_mlx.evaluation.perplexity import perplexity
from lsaq_mlx.sources import load_model


def test_stock_mlx_lm_generates_paris(default_source):
    script = textwrap.dedent(
        f"""
        from mlx_lm import load, generate
        model, tokenizer = load({str(default_source.path)!r})
        print(generate(model, tokenizer, "The capital of France is", max_tokens=8))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def wikitext_tokens(tokenizer, n: int) -> list[int]:
    with open(shared_file("wikitext-2-raw", "wiki.test.raw"), encoding="utf-8") as f:
        text = f.read(200_000)
    tokens = tokenizer.encode(text)
    assert len(tokens) >= n
    return tokens[:n]


def independent_perplexity(model, tokens: list[int], seq_len: int) -> float:
    """Plain mlx-lm model, log-softmax by hand, same windows."""
    total, count = 0.0, 0
    for start in range(0, len(tokens), seq_len):
        window = mx.array(tokens[start : start + seq_len])
        logits = model(window[None, :-1])[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logprobs, window[1:, None], axis=-1)
        total -= picked.sum().item()
        count += window.size - 1
    return float(mx.exp(mx.array(total / count)).item())


def test_perplexity_matches_independent_computation(default_source, default_model):
    from mlx_lm import load

    model, tokenizer, _ = default_model
    tokens = wikitext_tokens(tokenizer, 1024)
    ours = perplexity(model, tokens, seq_len=512)
    assert ours.tokens == 2 * 511 and ours.windows == 2
    plain, _ = load(str(default_source.path))
    theirs = independent_perplexity(plain, tokens, 512)
    assert abs(ours.perplexity - theirs) / theirs < 1e-3
    assert 5 < ours.perplexity < 100  # a working 135M model on WikiText-2


def test_dequantized_path_matches_quantized_kernel(default_source):
    model, tokenizer, _ = load_model(default_source, compute=False)
    model.set_dtype(mx.float32)
    nn.quantize(model, group_size=32, bits=4)
    tokens = mx.array([tokenizer.encode("The capital of France is Paris, and")])
    quantized = model(tokens)
    mx.eval(quantized)
    dequantize_layers(model)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    dequantized = model(tokens)
    rel = mx.abs(dequantized - quantized).max().item() / mx.abs(quantized).max().item()
    assert rel < 1e-4


def test_inspect_default(default_source):
    from lsaq_mlx.sources.inspection import describe_model

    info = describe_model(default_source)
    assert info["layers"] == 30 and info["model_type"] == "llama"
    assert info["tied_embeddings"] and info["tokenizer"] and info["chat_template"]
    assert 134e6 < info["parameters"] < 136e6
    assert info["by_kind"]["q_proj"]["count"] == 30
