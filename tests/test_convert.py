import json
import os
import subprocess
import sys
import textwrap

import pytest

from cli_run import assert_one_line_error, run_cli
from lsaq_mlx.convert import convert
from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.budgets import memory_budget
from lsaq_mlx.planning.planner import Planner, PlanRequest
from lsaq_mlx.sizes import parse_size


@pytest.fixture
def qwen2(tiny_source):
    return tiny_source("qwen2")


def test_convert_writes_a_model_stock_mlx_lm_opens(qwen2, tmp_path):
    plan = Planner(qwen2).plan(PlanRequest(method="lsaq", bits_budgets=[4.0]))
    out = tmp_path / "out"
    report = convert(qwen2, plan, out)
    assert report.written_bytes == plan.predicted_bytes
    assert report.bits_per_weight == pytest.approx(plan.predicted_bits_per_weight) and report.bits_per_weight <= 4.0
    config = json.loads((out / "config.json").read_text())
    assert set(plan.modules) <= set(config["quantization"]) and config["quantization_config"] == config["quantization"]
    assert (out / "lsaq_plan.json").is_file() and (out / "lsaq_report.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    script = textwrap.dedent(
        f"""
        from mlx_lm import load, generate
        from mlx_lm.utils import compute_bits_per_weight
        model, tokenizer = load({str(out)!r})
        print(compute_bits_per_weight(model))
        print(repr(generate(model, tokenizer, "hello", max_tokens=4)))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSAQ")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.splitlines()[0]) == pytest.approx(report.bits_per_weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_force(qwen2, tmp_path):
    plan = Planner(qwen2).plan(PlanRequest(method="uniform", bits=4))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert(qwen2, plan, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not written by lsaq-mlx"):  # --force replaces only our own folders
        convert(qwen2, plan, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    written = tmp_path / "written"
    convert(qwen2, plan, written)
    (written / "stale.txt").write_text("old")
    convert(qwen2, plan, written, force=True)
    assert not (written / "stale.txt").exists() and (written / "config.json").is_file()


def test_interrupted_convert_leaves_no_folder(qwen2, tmp_path, monkeypatch):
    import lsaq_mlx.convert as convert_module

    plan = Planner(qwen2).plan(PlanRequest(method="uniform", bits=3))

    def interrupted(model, path, pending=None):
        (path / "model-00001-of-00004.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "save_weights_by_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(qwen2, plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_memory_budget_reserves_kv_cache_and_runtime():
    assert parse_size("1.2GB") == 1_200_000_000 and parse_size("1GiB") == 1 << 30 and parse_size("512") == 512
    with pytest.raises(UserError, match="cannot read the size"):
        parse_size("lots")
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}
    budget = memory_budget("10MB", config, context=1000)
    kv = 2 * 2 * 2 * 16 * 2 * 1000
    assert budget.bytes == 10_000_000 - kv - 1_000_000 and budget.assumptions["kv_cache_bytes"] == kv
    with pytest.raises(UserError, match="leaves no room"):
        memory_budget("100KB", config, context=100_000)


def test_cli_plan_convert_and_errors(qwen2, tmp_path):
    env = dict(os.environ)
    gguf = qwen2.origin
    plan = json.loads(run_cli("plan", "-m", gguf, "-b", "4", "-b", "6", "--method", "lsaq-tiers", "--low-bits", "3",
                              "--json", env=env).stdout)
    assert plan["type"] == "PlanSet" and len(plan["plans"]) == 2
    dry = run_cli("convert", "-m", gguf, "-b", "4", "--dry-run", env=env)
    assert dry.returncode == 0 and "bits per weight" in dry.stdout and "layer" in dry.stdout
    assert not any(p.name.startswith("tiny-") for p in tmp_path.iterdir())
    assert_one_line_error(run_cli("convert", "-m", gguf, "-b", "1.2", "--dry-run", env=env), "to 16.000 bits per weight")
    assert_one_line_error(run_cli("convert", "-m", gguf, "--dry-run", env=env), "needs one budget")
    assert_one_line_error(run_cli("plan", "-m", gguf, "-b", "4", "--override", "zzz=4", env=env), "matches no")
    out = tmp_path / "m"
    report = json.loads(run_cli("convert", "-m", gguf, "--recipe", "mixed_3_6", "-o", str(out), "--json", env=env).stdout)
    assert report["method"] == "mixed_3_6" and (out / "config.json").is_file()
    assert_one_line_error(run_cli("convert", "-m", gguf, "--recipe", "mixed_3_6", "-o", str(out), env=env), "--force")


def test_a_model_tied_by_its_checkpoint_is_planned_and_written_tied(tmp_path, empty_cache):
    import mlx.core as mx
    import numpy as np

    from lsaq_mlx.convert import quantized_model
    from lsaq_mlx.sources import resolve_model
    from lsaq_mlx.sources.load import skeleton_model
    from tiny_models import tiny_model, write_gguf

    write_gguf(tiny_model("gemma3"), "gemma3", tmp_path / "g.gguf", leave_out=("lm_head.weight",))  # as Gemma 3 ships
    source = resolve_model(str(tmp_path / "g.gguf"))
    planner = Planner(source)
    plan = planner.plan(PlanRequest(method="uniform", bits=8))
    assert "lm_head" not in skeleton_model(source)[0] and "lm_head" not in plan.modules
    float_model, _ = planner.loaded()
    tokens = mx.array([[1, 5, 9, 200, 42, 7, 3, 250, 11, 64]])
    reference = np.array(float_model(tokens))
    for given in (float_model, None):  # from the planner's copy, as convert does, and from the files
        quantized, _ = quantized_model(source, plan, given)
        got = np.array(quantized(tokens).astype(mx.float32))
        assert np.abs(got - reference).mean() < 0.2 * np.abs(reference).mean()  # 8 bits: 0.09 here; a random head: ~1
    chat = run_cli("chat", "-m", str(tmp_path / "g.gguf"), "-n", "2", input="Hi\n/plan 4\n/quit\n")  # swaps read it too
    assert chat.returncode == 0 and "swapped" in chat.stdout + chat.stderr and "error" not in chat.stdout, chat.stdout


def test_microscaled_formats_are_chosen_where_they_cost_less_and_stock_mlx_lm_opens_them(tmp_path):
    """``--codecs affine,nvfp4,mxfp4,mxfp8``: the plan takes a format where the cost table
    prices it below affine per byte, the folder records each module's mode, its size is
    the plan's, and a process that imports only mlx_lm loads and runs it."""
    from converted_models import assert_loads_with_only_mlx_lm
    from hf_models import write_hf_folder
    from lsaq_mlx.evaluation.run import EvalRequest, evaluate
    from lsaq_mlx.planning.microscaled import FORMATS
    from lsaq_mlx.sources import resolve_model

    source = resolve_model(str(write_hf_folder("llama", tmp_path / "m", resolve_model("default").path)))
    planner = Planner(source)
    plan = planner.plan(PlanRequest(bits_budgets=[4.5], codecs=("affine", *FORMATS)))
    formats = {p: c for p, c in plan.modules.items() if c.label in FORMATS}
    assert formats, "no module took a format: the test needs one"
    assert plan.predicted_bits_per_weight <= 4.5
    convert(source, plan, tmp_path / "out", smoke_tokens=1)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert all(config[p] == c.config() for p, c in formats.items())
    written = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert abs(written - plan.predicted_bytes) < 0.01 * plan.predicted_bytes
    assert_loads_with_only_mlx_lm(tmp_path / "out")
    kl = evaluate(resolve_model(str(tmp_path / "out")), EvalRequest(max_tokens=128, seq_len=64),
                  reference=source).divergence["kl"]
    assert 0 <= kl < 1.0


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_experts_in_a_microscaled_format_are_written_for_stock_mlx_lm(mode, tmp_path):
    from dataclasses import replace

    from converted_models import assert_loads_with_only_mlx_lm
    from hf_models import write_hf_folder
    from lsaq_mlx.planning.microscaled import Microscaled
    from lsaq_mlx.sources import resolve_model

    source = resolve_model(str(write_hf_folder("qwen3_moe", tmp_path / "m", resolve_model("default").path)))
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=4, group_size=32))
    modules = {p: Microscaled(mode) if "switch_mlp" in p else c for p, c in plan.modules.items()}
    convert(source, replace(plan, modules=modules), tmp_path / "out", smoke_tokens=1)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert config["model.layers.1.mlp.switch_mlp.down_proj"]["mode"] == mode
    assert_loads_with_only_mlx_lm(tmp_path / "out")


def test_a_model_too_large_to_hold_is_smoke_tested_a_layer_at_a_time(default_source, tmp_path, monkeypatch):
    """The smoke test after writing holds one layer where the written model is large
    (``LSAQ_MLX_STREAM=always`` stands for that here) and says what the model says in memory."""
    import lsaq_mlx.convert as convert_module
    from lsaq_mlx.sources.streaming import StreamedModel

    plan = Planner(default_source).plan(PlanRequest(method="uniform", bits=8, group_size=64))
    convert(default_source, plan, tmp_path / "q8", smoke_tokens=1)
    in_memory = convert_module._check_written(tmp_path / "q8", 6)
    built, run_layers = [], StreamedModel.run_layers
    monkeypatch.setattr(StreamedModel, "run_layers", lambda self, *a, **k: built.append(1) or run_layers(self, *a, **k))
    monkeypatch.setenv("LSAQ_MLX_STREAM", "always")
    streamed = convert_module._check_written(tmp_path / "q8", 6)
    assert built and streamed == in_memory and in_memory[0]
