"""Streaming: every stage reads a model one decoder layer at a time and gets what the
whole model in memory gives: the forward, the layer scores, the Fisher and its cost
table, the reference distributions of ``eval``; hybrid layers compute what a float32
copy computes; and on a mid-size model peak memory follows the largest layer, not the
number of layers."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lsaq_mlx.backend.compute import float_copy_paths, prepare_for_compute
from lsaq_mlx.evaluation.divergence import ReferenceDistributions
from lsaq_mlx.modules import module_at
from lsaq_mlx.planning.cost import module_errors
from lsaq_mlx.planning.fisher import streamed_fisher
from lsaq_mlx.planning.planner import Planner, PlanRequest
from lsaq_mlx.scoring.run import ScoreOptions, score
from lsaq_mlx.sources import load_model
from lsaq_mlx.sources.streaming import StreamedModel

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [[3, 17, 250, 9, 41, 120, 7, 88, 199, 5, 64, 2], [11, 12, 13, 14, 15, 160, 170, 180, 1, 2, 3, 4]]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_streamed_forward_equals_the_whole_model(tiny_source, arch):
    source = tiny_source(arch)
    model = load_model(source)[0]
    streamed = StreamedModel(source)
    seen = []
    hidden = streamed.run_layers(mx.array(TOKENS), lambda i, layer, x_in, x_out, forward: seen.append(i))
    inner = model["model"]
    expected = inner(mx.array(TOKENS))  # ends with the final norm; the streamed hidden state does not
    np.testing.assert_allclose(np.array(inner["norm"](hidden)), np.array(expected), atol=1e-5)
    assert seen == list(range(len(streamed.layers)))


@pytest.mark.parametrize("metric", ["jaccard", "cosine"])
def test_streamed_scores_equal_the_whole_model_scores(tiny_source, monkeypatch, metric):
    source = tiny_source("llama")
    opts = ScoreOptions(metric, tokens=64, seq_len=32)
    monkeypatch.setenv("LSAQ_MLX_STREAM", "never")
    whole = score(source, opts, use_cache=False)
    monkeypatch.setenv("LSAQ_MLX_STREAM", "always")
    streamed = score(source, opts, use_cache=False)
    np.testing.assert_allclose(streamed.scores, whole.scores, atol=1e-6)


def whole_model_fisher(model, paths, sequences) -> dict:
    """The reference: the mean over sequences of the squared gradient of the mean
    next-token cross-entropy, with every weight of the model in memory at once."""
    model.freeze()
    for p in paths:
        module_at(model, p).unfreeze(keys=["weight"])

    def loss(tokens):
        logits = model(tokens[None, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, tokens[None, 1:]).mean()

    grad_fn = nn.value_and_grad(model, loss)
    sums = {}
    for seq in sequences:
        flat = dict(tree_flatten(grad_fn(mx.array(seq))[1]))
        for p in paths:
            g = flat[f"{p}.weight"]
            sums[p] = sums[p] + g * g if p in sums else g * g
    model.unfreeze()
    return {p: v / len(sequences) for p, v in sums.items()}


def fisher_collector(modules):
    """``(fisher, errors, collect)``: ``collect`` as ``streamed_fisher``'s ``on_weights``
    keeps each module's Fisher blocks (the embedding's row blocks, an expert at a time)
    and adds up their cost-table errors."""
    fisher, errors = {}, {}

    def collect(path, weight, block):
        fisher.setdefault(path, []).append(block)
        for key, err in module_errors(weight, block, next(q for q in modules if q.path == path).choices()).items():
            errors.setdefault(path, {}).setdefault(key, 0.0)
            errors[path][key] += err

    return fisher, errors, collect


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])  # qwen2, gemma3: tied embeddings (head and table share a Fisher)
def test_streamed_cost_table_equals_a_whole_model_reference(tiny_source, arch):
    source = tiny_source(arch)
    modules = Planner(source).context().modules
    paths = [q.path for q in modules]
    model = load_model(source)[0]
    reference = whole_model_fisher(model, paths, TOKENS)
    weights = {p: module_at(model, p).weight for p in paths}

    fisher, errors, collect = fisher_collector(modules)
    streamed_fisher(StreamedModel(source), TOKENS, modules, collect)
    for q in modules:
        expected = np.array(reference[q.path])
        got = np.concatenate([np.array(b) for b in fisher[q.path]])
        if got.shape != expected.shape:  # rows of tokens never seen are zero in the reference
            expected = expected[expected.sum(axis=1) > 0]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6 * float(np.abs(expected).max()))
        direct = module_errors(weights[q.path], reference[q.path], q.choices())
        for key, value in direct.items():
            assert errors[q.path][key] == pytest.approx(value, rel=1e-3), (q.path, key)


def test_streamed_reference_distributions_equal_the_whole_model(tiny_source):
    source = tiny_source("qwen2")
    tokens = [t for seq in TOKENS for t in seq] * 3
    whole = ReferenceDistributions.compute(load_model(source)[0], tokens, 16)
    streamed = ReferenceDistributions.compute_streamed(StreamedModel(source), tokens, 16)
    assert streamed.windows == whole.windows
    for a, b in zip(streamed.logprobs, whole.logprobs):
        np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)), rtol=2e-3, atol=2e-3)  # float16: one ulp


def test_large_matrices_quantized_by_row_blocks_are_the_same(tiny_source, monkeypatch):
    import lsaq_mlx.convert as convert_module
    from lsaq_mlx.planning.methods import plan_uniform

    source = tiny_source("qwen2")
    plan = plan_uniform(Planner(source).context(), None, 4, 32)
    whole = dict(tree_flatten(convert_module.quantized_model(source, plan)[0].parameters()))
    monkeypatch.setattr(convert_module, "QUANTIZE_BLOCK_BYTES", 4 * 64 * 7)  # 7 rows of a 64-wide matrix
    blocks = dict(tree_flatten(convert_module.quantized_model(source, plan)[0].parameters()))
    from lsaq_mlx.sources.load import skeleton_model

    assert len(convert_module.large_matrices(skeleton_model(source)[0], plan.modules)) == len(plan.modules)
    for name, value in whole.items():
        np.testing.assert_array_equal(np.array(blocks[name]), np.array(value))


@pytest.mark.parametrize("rows", [3, 40])  # the quantized kernel (decoding), dequantize + GEMM (a prompt)
def test_hybrid_layers_compute_what_a_float32_copy_computes(tiny_source, monkeypatch, rows):
    import lsaq_mlx.backend.hybrid as hybrid
    from lsaq_mlx.convert import quantized_model
    from lsaq_mlx.planning.methods import plan_uniform

    monkeypatch.setattr(hybrid, "ROW_BLOCK_BYTES", 4 * 64 * 24)  # matrices in blocks of 24 rows

    source = tiny_source("qwen2")
    plan = plan_uniform(Planner(source).context(), None, 4, 32)
    copy = prepare_for_compute(quantized_model(source, plan)[0], "float32", None)
    stored = quantized_model(source, plan)[0]
    prepare_for_compute(stored, "float32", set())
    assert all(not isinstance(m, nn.Linear) or type(m).__name__.startswith("Hybrid") for _, m in stored.named_modules())
    assert sum(v.nbytes for _, v in tree_flatten(stored.parameters())) < 0.4 * sum(
        v.nbytes for _, v in tree_flatten(copy.parameters()))
    tokens = mx.array([[(7 * i) % 300 for i in range(rows)]])
    np.testing.assert_allclose(np.array(stored(tokens)), np.array(copy(tokens)), atol=1e-4)


@pytest.mark.parametrize("bits", [4, 5])
def test_a_hybrid_layer_holds_one_row_block_of_float32_weights_for_a_prompt(monkeypatch, bits):
    """Peak memory of a prompt through a hybrid quantized layer stays below twice its
    float32 weight (its output included), however many row blocks it has: left lazy,
    MLX scheduled every block's dequantization first (5 bits: 46 MB for an 8 MB weight)."""
    import lsaq_mlx.backend.hybrid as hybrid

    monkeypatch.setattr(hybrid, "ROW_BLOCK_BYTES", 1 << 20)  # 8 blocks
    layer = nn.QuantizedLinear.from_linear(nn.Linear(256, 8192, bias=False), group_size=64, bits=bits)
    mx.eval(layer.parameters())
    hybrid.make_hybrid(layer)
    x = mx.random.normal((1, 64, 256))
    mx.eval(x)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(layer(x))
    assert mx.get_peak_memory() - before < 2 * 4 * 8192 * 256


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_a_large_matrix_is_quantized_from_row_blocks_of_its_file(tmp_path, monkeypatch, dtype):
    """A swap's embedding is read from the safetensors file a row block at a time and
    each block quantized before the next: peak memory stays below the stored matrix
    (reading it whole, or evaluating the blocks together, costs more); the values are
    mx.quantize's of the whole matrix."""
    import lsaq_mlx.convert as convert
    import lsaq_mlx.runtime.swap as swap
    from lsaq_mlx.planning.choices import Affine
    from lsaq_mlx.sources.tensors import SourceTensors

    monkeypatch.setattr(convert, "QUANTIZE_BLOCK_BYTES", 256 << 10)
    weight = mx.random.normal((4096, 512)).astype(dtype)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"model.embed_tokens.weight": weight})
    tensors = SourceTensors(tmp_path)
    assert mx.array_equal(tensors.rows("model.embed_tokens.weight", 100, 300), weight[100:300])
    mx.eval(weight)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    module = swap.quantized_module(nn.Embedding(4096, 512), "model.embed_tokens", Affine(2, 64), tensors)
    mx.eval(module.parameters())
    assert mx.get_peak_memory() - before < weight.nbytes
    q, scales, biases = mx.quantize(weight.astype(mx.float32), 64, 2)
    assert mx.array_equal(module.weight, q)
    assert mx.array_equal(module.scales, scales.astype(mx.float16))
    assert mx.array_equal(module.biases, biases.astype(mx.float16))


@pytest.mark.parametrize("rows", [4096, 9000])  # below and above the block a float matrix is quantized in
def test_a_swap_below_a_quantized_folder_reads_its_codes_a_row_block_at_a_time(tmp_path, rows):
    """Going down from a 6-bit folder, a module is dequantized from a row block of its
    stored codes at a time, each block rounded before the next: whole, MLX's 6-bit
    dequantize holds 7x the float32 matrix (an 8B model's LM head: gigabytes in one
    swap). The codes are those of rounding the whole exact matrix."""
    import lsaq_mlx.runtime.swap as swap
    from lsaq_mlx.planning.choices import Affine
    from lsaq_mlx.sources.tensors import DequantizedTensors, SourceTensors

    codes, scales, biases = mx.quantize(mx.random.normal((rows, 2048)), 64, 6)
    stored = {"lm_head.weight": codes, "lm_head.scales": scales.astype(mx.float16),
              "lm_head.biases": biases.astype(mx.float16)}
    mx.save_safetensors(str(tmp_path / "model.safetensors"), stored)
    tensors = DequantizedTensors(SourceTensors(tmp_path), {"quantization": {"group_size": 64, "bits": 6}})
    old = nn.QuantizedLinear(2048, rows, bias=False, group_size=64, bits=6)
    whole = tensors.get("lm_head.weight")
    mx.eval(whole)
    expected = mx.quantize(whole, 64, 3)
    del whole
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    module = swap.quantized_module(old, "lm_head", Affine(3, 64), tensors)
    mx.eval(module.parameters())
    assert mx.get_peak_memory() - before < 4 * rows * 2048
    assert mx.array_equal(module.weight, expected[0])
    assert mx.array_equal(module.scales, expected[1].astype(mx.float16))


def test_the_float32_copy_of_a_5_bit_layer_is_dequantized_a_row_block_at_a_time(monkeypatch):
    """A module of the float32 copy costs its float32 weight and one block of
    temporaries (whole, MLX's 5-bit dequantize took about 6x the matrix), with the
    same values."""
    import lsaq_mlx.backend.compute as compute

    monkeypatch.setattr(compute, "DEQUANTIZE_BLOCK_BYTES", 1 << 20)
    holder = nn.Module()
    holder.m = nn.QuantizedLinear.from_linear(nn.Linear(1024, 4096, bias=False), group_size=64, bits=5)
    mx.eval(holder.parameters())
    whole = mx.dequantize(holder.m.weight, holder.m.scales, holder.m.biases, 64, 5)
    mx.eval(whole)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    compute.dequantize_layers(holder, {"m"}, now=True)
    assert mx.get_peak_memory() - before < 1.5 * whole.nbytes
    assert mx.array_equal(holder.m.weight, whole)


def test_the_float32_copy_takes_layers_in_order_within_its_bytes(tiny_source):
    model = load_model(tiny_source("llama"), compute=False)[0]
    one_layer = sum(4 * m.weight.size for p, m in model.named_modules() if p.startswith("model.layers.0.")
                    and isinstance(m, nn.Linear))
    chosen = float_copy_paths(model, one_layer)
    assert chosen and all(p.startswith("model.layers.0.") for p in chosen)
    assert float_copy_paths(model, 0) == set()


# ---- memory on a mid-size random model ----

SHAPE = ["--hidden", "768", "--intermediate", "3072", "--heads", "6", "--kv-heads", "2", "--head-dim", "128"]


def peak_rss(args: list[str], env: dict) -> int:
    """Peak resident bytes of a fresh process (``wait4``'s rusage)."""
    with tempfile.TemporaryFile("w+") as err:  # a file: the process must not block on a full pipe
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        err.seek(0)
        assert os.waitstatus_to_exitcode(status) == 0, err.read()
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


@pytest.fixture(scope="module")
def mid_models(tmp_path_factory, session_cache):
    folder = tmp_path_factory.mktemp("mid")
    made = {}
    for layers in (3, 9):
        out = folder / f"mid-{layers}"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_model.py"), str(out), *SHAPE,
                        "--layers", str(layers)], check=True, capture_output=True)
        made[layers] = out
    return made


def test_convert_memory_follows_one_layer_not_the_model(mid_models, tmp_path):
    env = dict(os.environ, LSAQ_MLX_CACHE=str(tmp_path / "cache"))
    cli = [sys.executable, "-m", "lsaq_mlx"]
    config = json.loads((mid_models[3] / "config.json").read_text())
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    layer_bytes = 4 * (2 * h * config["num_attention_heads"] * config["head_dim"] + 2 * h * kv + 3 * h * inter)
    baseline = peak_rss([*cli, "inspect", "-m", str(mid_models[3]), "--json"], env)  # the package, MLX, the tokenizer
    peaks = {n: peak_rss([*cli, "convert", "-m", str(folder), "-b", "4.0", "-o", str(tmp_path / f"out-{n}")], env)
             for n, folder in mid_models.items()}
    embedding_bytes = 4 * config["vocab_size"] * h
    # six more layers: a float32 copy of the model would add 6 layers, a Fisher of all weights ~15
    assert peaks[9] - peaks[3] < 3 * layer_bytes, (peaks, layer_bytes)
    # above the process that loads the same code and tokenizer: a few layers and a few
    # embedding-sized blocks (the embedding's Fisher and errors are computed in row blocks)
    assert peaks[9] - baseline < 8 * layer_bytes + 6 * embedding_bytes, (peaks, baseline, layer_bytes)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # an LM head apart; an embedding tied to it (and scaled)
def test_a_quantized_sources_embedding_and_head_stay_codes_and_price_as_dequantized(tiny_source, arch, tmp_path,
                                                                                     monkeypatch):
    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.gptq.hessians import calibration_tokens, head_path
    from lsaq_mlx.modules import layer_index
    from lsaq_mlx.quantizers import QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources import resolve_model, streaming
    from lsaq_mlx.sources.load import load_tokenizer
    from cli_run import run_cli

    done = run_cli("convert", "-m", tiny_source(arch).path, "--method", "uniform", "--bits", "4", "--group-size",
                   "32", "-o", tmp_path / "q4")
    assert done.returncode == 0, done.stderr
    source = resolve_model(str(tmp_path / "q4"))
    modules = Planner(source).context().modules
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:4]

    def run(streamed):
        outside = {n: a.dtype for n, a in tree_flatten(streamed.model.parameters())
                   if layer_index(n) is None and n.endswith(".weight") and a.ndim == 2}
        fisher, errors, collect = fisher_collector(modules)
        streamed_fisher(streamed, TOKENS, modules, collect)
        head, scratch = head_path(streamed.model), tmp_path / f"scratch-{outside[next(iter(outside))]}"
        scratch.mkdir()
        plan = Planner(source).plan(PlanRequest(method="uniform", bits=3, group_size=32))
        written = writer.calibrated_weights(streamed, tokens, {head: plan.modules[head]}, scratch, QUANTIZERS["gptq"])
        return outside, errors, {k: np.array(v) for k, v in written[head].items()}

    kept, errors, head = run(StreamedModel(source))
    assert kept and set(kept.values()) == {mx.uint32}
    monkeypatch.setattr(streaming, "_keep_codes", lambda *args: set())  # as before: dequantized when read
    dequantized, expected, expected_head = run(StreamedModel(source))
    assert set(dequantized.values()) == {mx.float32}
    for path, by_key in expected.items():
        for key, value in by_key.items():
            assert errors[path][key] == pytest.approx(value, rel=1e-5), (path, key)
    for name, value in expected_head.items():
        np.testing.assert_array_equal(head[name], value)


def test_a_streamed_layer_of_6_bit_codes_is_dequantized_one_matrix_at_a_time(tmp_path):
    """MLX's CPU dequantize of 6-bit codes holds about 7x its float32 output while it runs:
    a layer read from a quantized folder peaks at the layer plus one matrix's share, not
    seven matrices' (at the Llama-3-8B shape, 6.0 bits: 7.1 GB before, 3.2 GB after)."""
    from mlx_lm.models import llama

    from lsaq_mlx.sources import resolve_model

    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 1, "intermediate_size": 4096,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 64, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": True, "quantization": {"group_size": 64, "bits": 6}}
    model = llama.Model(llama.ModelArgs.from_dict(config))
    nn.quantize(model, group_size=64, bits=6)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(config))
    streamed = StreamedModel(resolve_model(str(tmp_path)))
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    with streamed.layer(0) as layer:
        held = sum(a.nbytes for _, a in tree_flatten(layer.parameters()))
        peak = mx.get_peak_memory() - before
    assert peak < held + 8 * 4 * 4096 * 256  # the layer and one MLP matrix's dequantization


def test_a_tied_gemma3_is_named_by_its_checkpoint_again_after_loading(tmp_path):
    """mlx-lm's Gemma 3 ``sanitize`` drops ``lm_head`` from the model where the
    checkpoint has none, and fails run a second time on the same model: what loading did
    is found already done, and a fresh skeleton is cut as loading cuts it."""
    from tiny_models import tiny_model, write_gguf

    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.model_tensors import ModelTensors
    from lsaq_mlx.sources.tensors import source_tensors

    write_gguf(tiny_model("gemma3"), "gemma3", tmp_path / "m.gguf", leave_out=("lm_head.weight",))
    source = resolve_model(str(tmp_path / "m.gguf"))
    model, _, _ = load_model(source, compute=False, lazy=True)
    for _ in range(2):
        named = ModelTensors(source_tensors(source), model)
        assert "lm_head" not in model and model.tie_word_embeddings
        assert named.direct["model.embed_tokens.weight"] == "model.embed_tokens.weight"
    streamed = StreamedModel(source)  # a fresh skeleton, cut to the checkpoint
    assert "lm_head" not in streamed.model and streamed.model.tie_word_embeddings
