import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from converted_models import assert_loads_with_only_mlx_lm, held_out_errors
from mlx.utils import tree_unflatten

from lsaq_mlx.convert import convert
from lsaq_mlx.equalization.groups import folded_source, norm_offset, scale_groups
from lsaq_mlx.equalization.search import equalizing_scales
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.planning.planner import Planner, PlanRequest


def _fold_every_group(model, seed=0):
    """Each layer's groups folded with random scales, as the writer folds them."""
    folded = 0
    for layer in model.model.layers:
        named = dict(layer.named_modules())
        for n, group in enumerate(scale_groups(layer)):
            dim = named[group.members[0]].weight.shape[1]
            s = mx.exp(mx.random.normal((dim,), key=mx.random.key(seed + n)))
            norm, s = folded_source(named[group.source], s)
            params = {f"{group.source}.{k}": v for k, v in norm.items()}
            params |= {f"{m}.weight": named[m].weight * s for m in group.members}
            layer.update(tree_unflatten(list(params.items())))
            folded += 1
    mx.eval(model.parameters())
    return folded


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_folding_the_scales_leaves_the_float_models_logits_unchanged(arch):
    from tiny_models import tiny_model

    model = tiny_model(arch)
    tokens = mx.array([[1, 5, 9, 44, 2, 7, 100, 3, 250, 17, 8, 8]])
    before = model(tokens)
    assert _fold_every_group(model) == 3 * len(model.model.layers)  # attention input, down_proj input, MLP input
    after = model(tokens)
    np.testing.assert_allclose(np.array(after), np.array(before), rtol=1e-3, atol=1e-3 * float(mx.abs(before).max()))
    assert not np.allclose(np.array(model.model.layers[0].input_layernorm.weight), np.array(tiny_model(arch).model.layers[0].input_layernorm.weight))


def test_gemma_norms_fold_through_their_one_plus_weight():
    from tiny_models import tiny_model

    assert norm_offset(tiny_model("gemma3").model.layers[0].input_layernorm) == 1
    assert norm_offset(tiny_model("llama").model.layers[0].input_layernorm) == 0
    assert "pre_feedforward_layernorm" in {g.source for g in scale_groups(tiny_model("gemma3").model.layers[0])}


def test_a_folded_gemma_norm_is_exact_as_stored_in_float16():
    """Gemma multiplies by ``1 + weight``: where the fold makes that small, the weight is
    near -1 and float16 keeps few of the sum's digits. The members take the scales the
    stored weight divides by, so the model as written computes what the source does."""
    from tiny_models import tiny_model

    model = tiny_model("gemma3")
    layer = model.model.layers[0]
    dim = layer.input_layernorm.weight.shape[0]
    gain = mx.linspace(0.05, 3.0, dim)
    layer.input_layernorm.weight = gain - 1
    tokens = mx.array([[1, 5, 9, 44, 2, 7, 100, 3, 250, 17, 8, 8]])
    before = model(tokens)
    searched = mx.exp(mx.random.uniform(2.0, 6.0, (dim,), key=mx.random.key(3)))  # 1 + w' down to 1e-4
    members = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    originals = {m: layer.get("self_attn")[m.split(".")[1]].weight for m in members}

    def as_stored(applied):
        norm, s = applied
        params = {"input_layernorm.weight": norm["weight"].astype(mx.float16).astype(mx.float32)}
        params |= {f"{m}.weight": originals[m] * s for m in members}
        layer.update(tree_unflatten(list(params.items())))
        change = float(mx.abs(model(tokens) - before).max() / mx.abs(before).max())
        layer.update(tree_unflatten([("input_layernorm.weight", gain - 1)] + [(f"{m}.weight", w) for m, w in originals.items()]))
        return change

    exact = as_stored(folded_source(layer.input_layernorm, searched))
    naive = as_stored(({"weight": gain / searched - 1}, searched))
    assert exact < 1e-3 and naive > 10 * exact, (exact, naive)


def _uneven_problem(rows=64, cols=256, seed=0):
    rng = np.random.default_rng(seed)
    spread = np.exp(rng.normal(size=cols) * 1.5)  # a few input channels carry most of the energy
    x = rng.normal(size=(4096, cols)) * spread
    return mx.array(rng.normal(size=(rows, cols)).astype(np.float32) * 0.05), (x.T @ x).astype(np.float32)


def _rtn_error(w, h, scales, choice):
    s = mx.array(scales)
    q = mx.dequantize(*mx.quantize(w * s, choice.group_size, choice.bits), choice.group_size, choice.bits) / s
    d = np.array(w - q, dtype=np.float64)
    return float(np.einsum("ij,ij->", d @ h.astype(np.float64), d))


@pytest.mark.parametrize("choice", [Affine(3, 64), Affine(4, 128)])
def test_the_searched_scales_lower_the_output_error_of_round_to_nearest(choice):
    w, h = _uneven_problem()
    scales = equalizing_scales([w], h, [choice])
    assert scales is not None and scales.shape == (w.shape[1],)
    unscaled = _rtn_error(w, h, np.ones(w.shape[1], np.float32), choice)
    assert _rtn_error(w, h, scales, choice) < 0.9 * unscaled


def test_inputs_of_even_energy_are_left_unscaled():
    w, _ = _uneven_problem()
    assert equalizing_scales([w], np.eye(w.shape[1], dtype=np.float32) * 3.0, [Affine(4, 64)]) is None


def test_clipping_lowers_each_groups_output_error_where_extremes_are_outliers():
    from lsaq_mlx.equalization.clipping import clipped_weight, group_blocks

    w, h = _uneven_problem(cols=128)
    quiet = int(np.argmin(np.diagonal(h)[:32]))  # an input that is small: its weight matters little
    w = w.at[::5, quiet].multiply(12.0)  # an outlier in every fifth row's first group
    choice = Affine(3, 32)
    clipped = clipped_weight(w, group_blocks(h, 32), choice)
    assert float(mx.abs(clipped).max()) < float(mx.abs(w).max())

    def group_errors(weight):
        q = mx.dequantize(*mx.quantize(weight, 32, 3), 32, 3)
        e = np.array(w - q, dtype=np.float64).reshape(w.shape[0], 4, 32)
        hb = np.array(group_blocks(h, 32), dtype=np.float64)
        return np.einsum("rng,ngh,rnh->rn", e, hb, e)

    before, after = group_errors(w), group_errors(clipped)
    assert (after <= before * (1 + 1e-3) + 1e-6).all()
    assert after[::5, 0].sum() < 0.9 * before[::5, 0].sum()


def _outlier_source(path, arch="llama"):
    """A tiny model whose norms make a few input channels large, as trained models' are."""
    from tiny_models import tiny_model, write_gguf

    from lsaq_mlx.sources import resolve_model

    model = tiny_model(arch)
    outliers = mx.ones((model.args.hidden_size,)).at[mx.array([3, 17, 40, 51])].multiply(8.0)
    for layer in model.model.layers:
        for norm in ("input_layernorm", "post_attention_layernorm"):
            layer[norm].weight = layer[norm].weight * outliers
    write_gguf(model, arch, path)
    return resolve_model(str(path))


def test_an_awq_model_is_closer_to_the_source_and_loads_with_only_mlx_lm(tmp_path):
    source = _outlier_source(tmp_path / "outliers.gguf")
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=3, group_size=32))
    rtn, awq = tmp_path / "rtn", tmp_path / "awq"
    convert(source, plan, rtn)
    report = convert(source, plan, awq, quantizer="awq")
    assert report.quantizer == "awq" and report.written_bytes == plan.predicted_bytes
    assert json.loads((awq / "lsaq_report.json").read_text())["quantizer"] == "awq"
    errors = held_out_errors(source, [rtn, awq])
    assert errors["awq"] < 0.95 * errors["rtn"], errors  # measured 0.87x

    assert_loads_with_only_mlx_lm(awq)


def test_a_fold_that_changes_the_layer_is_refused_and_the_layer_written_unequalized(tiny_source, tmp_path,
                                                                                     monkeypatch):
    import lsaq_mlx.gptq.writer as writer
    from lsaq_mlx.equalization.groups import ScaleGroup
    from lsaq_mlx.gptq.hessians import calibration_tokens
    from lsaq_mlx.quantizers import QUANTIZERS
    from lsaq_mlx.scoring.calibration import load_calibration
    from lsaq_mlx.sources.load import load_tokenizer
    from lsaq_mlx.sources.streaming import StreamedModel

    source = tiny_source("llama")
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=3, group_size=32))
    # input_layernorm also feeds v_proj: folding it into q and k alone changes attention
    monkeypatch.setattr(writer, "scale_groups", lambda layer: [ScaleGroup("input_layernorm", ("self_attn.q_proj",
                                                                                               "self_attn.k_proj"))])
    monkeypatch.setattr(writer, "equalizing_scales", lambda weights, h, choices, measure=None: np.linspace(0.5, 2.0, h.shape[0],
                                                                                               dtype=np.float32))
    tokens = calibration_tokens(load_tokenizer(source), load_calibration(None))[:4]
    count = writer.CalibrationCounts()
    weights = writer.calibrated_weights(StreamedModel(source), tokens, dict(plan.modules), tmp_path, QUANTIZERS["awq"],
                                        count=count)
    assert count.equalized == count.searched == 2 and count.refused == ["model.layers.0", "model.layers.1"]
    assert not any("norm" in p for p in weights)
    codes = weights["model.layers.0.self_attn.q_proj"]
    from lsaq_mlx.sources.load import load_model

    float_q = load_model(source, compute=True)[0].model.layers[0].self_attn.q_proj.weight
    expected = mx.quantize(float_q.astype(mx.float32), 32, 3)
    assert mx.array_equal(codes["weight"], expected[0])  # the unscaled weights, rounded to nearest


def test_the_cli_writes_an_awq_gptq_model(tiny_source, tmp_path):
    from cli_run import run_cli

    out = tmp_path / "m"
    done = run_cli("convert", "-m", str(tiny_source("qwen3").path), "-b", "4", "--quantizer", "awq-gptq", "-o", str(out),
                   "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "lsaq_report.json").read_text())["quantizer"] == "awq-gptq"
    assert isinstance(dict(__import__("mlx_lm").load(str(out))[0].named_modules())["model.layers.0.mlp.up_proj"],
                      nn.QuantizedLinear)


def test_fused_projections_are_equalized_and_folding_keeps_the_logits():
    from hf_models import build

    model, _ = build("phi3", vocab_size=300)
    members = {m for g in scale_groups(model.model.layers[0]) for m in g.members}
    assert {"self_attn.qkv_proj", "mlp.gate_up_proj"} <= members
    tokens = mx.array([[1, 5, 9, 44, 2, 7, 100, 3, 250, 17, 8, 8]])
    before = model(tokens)
    assert _fold_every_group(model) == 2 * len(model.model.layers)
    np.testing.assert_allclose(np.array(model(tokens)), np.array(before), rtol=1e-3,
                               atol=1e-3 * float(mx.abs(before).max()))
