"""A model the user holds only quantized (a folder ``convert`` or ``mlx_lm.convert`` wrote)
still adapts: plans at or below the stored precision are quantized from the stored
weights, and nothing plans or swaps above them."""

import re

import numpy as np
import pytest
from cli_run import run_cli

from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.planner import Planner, PlanRequest
from lsaq_mlx.runtime import Engine
from lsaq_mlx.runtime.options import RuntimeOptions
from lsaq_mlx.sources import resolve_model


@pytest.fixture(scope="module")
def stored(tiny_llama, tmp_path_factory):
    """The tiny model as an 8-bit folder: no float source beside it."""
    out = tmp_path_factory.mktemp("quantized") / "q8"
    done = run_cli("convert", "-m", tiny_llama.path, "--method", "uniform", "--bits", "8", "--group-size", "64", "-o", out)
    assert done.returncode == 0, done.stderr
    return resolve_model(str(out))


def test_plans_of_a_quantized_source_stay_at_or_below_what_it_stores(stored):
    planner = Planner(stored)
    plan = planner.plan(PlanRequest(method="lsaq", bits_budgets=[6.0]))
    assert max(getattr(c, "bits", 16) for c in plan.modules.values()) <= 8
    with pytest.raises(UserError, match="outside what lsaq can do for this model: .* to 9.0"):
        planner.plan(PlanRequest(method="lsaq", bits_budgets=[12.0]))


def test_a_quantized_source_swaps_down_and_back_up_without_a_float_source(stored):
    import mlx.core as mx

    planner = Planner(stored)
    engine = Engine(stored, planner, RuntimeOptions(method="uniform")).start()
    try:
        before = np.array(engine.model(mx.array([[1, 5, 9, 42]])))
        down = engine.apply_budget(4).result(120)
        assert down.changed > 0 and not down.failed and down.state.bits_per_weight < 4.6
        at_four = np.array(engine.model(mx.array([[1, 5, 9, 42]])))
        assert engine.chat("hello", 3).result(120).stats.generation_tokens >= 1
        back = engine.apply_budget(8.5).result(120)  # uniform 8/64: what the folder stores
        assert not back.failed and back.state.bits_per_weight == pytest.approx(8.5, abs=0.05)
        after = np.array(engine.model(mx.array([[1, 5, 9, 42]])))
        # the stored codes read back where the plan's setting is the stored one (down_proj's
        # group size differs here: requantized from the stored values), far closer than at 4 bits
        assert np.abs(after - before).max() < 0.2 * np.abs(at_four - before).max()
        with pytest.raises(UserError, match="outside what uniform can do"):
            engine.apply_budget(12).result(120)
    finally:
        engine.shutdown()


def test_eval_with_a_budget_measures_the_plan_chat_would_run(stored):
    import json

    out = run_cli("eval", "-m", stored.path, "-b", "4", "--method", "uniform", "--ppl", "packaged",
                  "--max-tokens", "96", "--seq-len", "48", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["divergence"]["kl"] > 0  # against the stored model itself
    assert "evaluating the uniform plan of" in out.stderr
    again = json.loads(run_cli("eval", "-m", stored.path, "-b", "4", "--method", "uniform", "--ppl", "packaged",
                               "--max-tokens", "96", "--seq-len", "48", "--json").stdout)
    assert again["divergence"]["kl"] == result["divergence"]["kl"]


def test_uniform_plans_of_a_quantized_source_stay_at_or_below_what_it_stores(stored):
    plan = Planner(stored).plan(PlanRequest(method="uniform", bits_budgets=[8.5]))
    assert {getattr(c, "bits", 16) for c in plan.modules.values()} == {8}


def test_an_mlx_lm_convert_folder_swaps_down_in_chat(default_source, tmp_path):
    from hf_models import write_hf_folder
    from mlx_lm.convert import convert

    hf = write_hf_folder("llama", tmp_path / "hf", default_source.path)
    convert(str(hf), str(tmp_path / "q8"), quantize=True, q_bits=8, q_group_size=64)
    done = run_cli("chat", "-m", tmp_path / "q8", "--max-tokens", "3", input="hi\n/plan 4\nhi\n/plan 12\n")
    assert done.returncode == 0, done.stderr
    swapped = re.search(r"swapped \d+ modules in [\d.]+ s -> ([\d.]+) bits/weight", done.stderr)
    assert swapped and float(swapped[1]) <= 4.0 and "outside what lsaq can do for this model" in done.stderr


def test_gpt_oss_mxfp4_experts_are_read_planned_and_kept_as_stored(tmp_path):
    """gpt-oss as OpenAI ships it (MXFP4 experts, ``quant_method: mxfp4``): every stage
    reads the experts as mlx-lm does; the plan may keep them as stored (mxfp4, without
    ``--codecs``) and never above their 4 bits; the written experts are the checkpoint's
    codes, unchanged, and stock mlx-lm runs the folder."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from hf_models import write_mxfp4_gpt_oss
    from lsaq_mlx.convert import convert
    from lsaq_mlx.planning.microscaled import Microscaled
    from lsaq_mlx.sources.load import skeleton_model
    from lsaq_mlx.sources.model_tensors import ModelTensors
    from lsaq_mlx.sources.tensors import DequantizedTensors, source_tensors

    folder, model = write_mxfp4_gpt_oss(tmp_path / "gpt-oss", resolve_model("default").path)
    source = resolve_model(str(folder))
    skeleton, config = skeleton_model(source)
    read = DequantizedTensors(ModelTensors(source_tensors(source), skeleton), config)  # as every stage reads it
    name = "model.layers.1.mlp.experts.up_proj.weight"  # split from the interleaved gate_up_proj by sanitize
    np.testing.assert_array_equal(np.array(read.get(name).astype(mx.float32)),
                                  np.array(dict(tree_flatten(model.parameters()))[name].astype(mx.float32)))

    planner = Planner(source)
    ctx = planner.context()
    experts = [q for q in ctx.modules if ".experts." in q.path]
    assert experts and all(Microscaled("mxfp4") in ctx.candidates(q) for q in experts)
    assert all(getattr(c, "bits", 16) <= 4 for q in experts for c in ctx.candidates(q))
    plan = planner.plan(PlanRequest(bits_budgets=[4.0]))
    kept = [p for p, c in plan.modules.items() if c == Microscaled("mxfp4")]
    assert kept, "the plan kept no expert as stored"
    convert(source, plan, tmp_path / "out", smoke_tokens=1)
    written = mx.load(str(next((tmp_path / "out").glob("*.safetensors"))))
    for f in (tmp_path / "out").glob("*.safetensors"):
        written |= mx.load(str(f))
    checkpoint = mx.load(str(folder / "model.safetensors"))
    for path in (p for p in kept if p.endswith("down_proj")):
        blocks = checkpoint[path.replace("experts.down_proj", "experts.down_proj_blocks")]
        assert mx.array_equal(blocks.view(mx.uint32).flatten(-2), written[f"{path}.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"][kept[0]]["mode"] == "mxfp4"
    _stock_close_and_swaps(source, tmp_path / "out", "/plan 3.5", "/plan 4")


def test_hugging_face_formats_mlx_holds_natively_become_mlx_lms_quantization():
    from lsaq_mlx.formats import native_quantization

    fp8 = {"quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [32, 32]}
    assert native_quantization({"quantization_config": {"quant_method": "mxfp4"}}) == \
        {"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}
    assert native_quantization({"quantization_config": fp8})["quantization"]["mode"] == "mxfp8"
    assert native_quantization({"quantization_config": fp8 | {"weight_block_size": [128, 128]}}) == {}  # dequantized
    assert native_quantization({"quantization_config": {"quant_method": "awq"}}) == {}
    for hostile in ({"quant_method": ["mxfp4"]}, {"quant_method": {}}, fp8 | {"weight_block_size": 32}):
        assert native_quantization({"quantization_config": hostile}) == {}
    from lsaq_mlx.formats import check_config

    for entry in ({"mode": ["mxfp4"]}, {"m.x": {"bits": 4, "group_size": 32, "mode": {}}}):
        with pytest.raises(UserError):
            check_config({"quantization": {"bits": 4, "group_size": 32} | entry}, "config.json")
    assert native_quantization({"quantization": {"bits": 4, "group_size": 64},
                                "quantization_config": {"quant_method": "mxfp4"}}) == {}


def test_deepseek_fp8_checkpoints_are_read_as_mlx_lm_dequantizes_them(tmp_path):
    """DeepSeek-V3 as DeepSeek ships it (FP8 E4M3 linear weights with 128 x 128 block
    scales, experts apart): every stage reads the weights mlx-lm's ``sanitize`` makes of
    them, a layer at a time; plans, converts, evaluates and swaps."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_lm import load

    from hf_models import write_fp8_deepseek_v3
    from lsaq_mlx.convert import convert
    from lsaq_mlx.sources.load import skeleton_model
    from lsaq_mlx.sources.model_tensors import ModelTensors
    from lsaq_mlx.sources.tensors import source_tensors

    folder = write_fp8_deepseek_v3(tmp_path / "ds", resolve_model("default").path)
    source = resolve_model(str(folder))
    theirs = dict(tree_flatten(load(str(folder))[0].parameters()))
    read = ModelTensors(source_tensors(source), skeleton_model(source)[0])
    for name in ("model.layers.1.mlp.switch_mlp.up_proj.weight", "model.layers.0.self_attn.q_a_proj.weight"):
        np.testing.assert_array_equal(np.array(read.get(name).astype(mx.float32)),
                                      np.array(theirs[name].astype(mx.float32)))
    planner = Planner(source)
    assert planner.plan(PlanRequest(bits_budgets=[4.0])).predicted_bits_per_weight <= 4.0
    convert(source, planner.plan(PlanRequest(method="uniform", bits=4, group_size=32)), tmp_path / "q4",
            smoke_tokens=1)
    _stock_close_and_swaps(source, tmp_path / "q4", "/plan 3.5")


def _stock_close_and_swaps(source, converted, *plans: str) -> None:
    """``converted`` (from ``source``) runs in an mlx_lm-only process and stays close to
    ``source``; a chat on ``source`` swaps to each of ``plans`` with nothing failed."""
    from converted_models import assert_loads_with_only_mlx_lm
    from lsaq_mlx.evaluation.run import EvalRequest, evaluate

    assert_loads_with_only_mlx_lm(converted)
    kl = evaluate(resolve_model(str(converted)), EvalRequest(max_tokens=128, seq_len=64),
                  reference=source).divergence["kl"]
    assert 0 <= kl < 0.1
    script = "".join(f"Hi\n{p}\n" for p in plans) + "/quit\n"
    chat = run_cli("chat", "-m", str(source.path), "-b", "4", "-n", "4", input=script)
    swaps = [line for line in (chat.stdout + chat.stderr).splitlines() if "swapped" in line]
    assert chat.returncode == 0 and len(swaps) == len(plans) and not any("failed" in s for s in swaps), \
        chat.stdout + chat.stderr
