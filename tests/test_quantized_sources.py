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
