import itertools
import json
import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from lsaq_mlx.modules import module_at
from lsaq_mlx.planning.affine_error import affine_errors, roundtrip
from lsaq_mlx.planning.cost import CostTable, layer_weights, module_errors
from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.knapsack import solve_mckp
from lsaq_mlx.planning.choices import BITS, GROUP_SIZES, KEEP, Affine
from lsaq_mlx.planning.plan import PlanSet, QuantModule, QuantPlan
from lsaq_mlx.planning.budgets import Budget
from lsaq_mlx.planning.methods import Override, PlanningContext, plan_lsaq, plan_recipe, plan_tiers, plan_uniform
from lsaq_mlx.scoring.scores import LayerScores
from tiny_models import tiny_model


def brute_force(options, budget):
    best = None
    for picks in itertools.product(*(range(len(o)) for o in options)):
        size = sum(options[i][j][0] for i, j in enumerate(picks))
        cost = sum(options[i][j][1] for i, j in enumerate(picks))
        if size <= budget and (best is None or cost < best - 1e-12):
            best = cost
    return best


@pytest.mark.parametrize("seed", range(30))
def test_knapsack_is_optimal_on_small_cases(seed):
    rng = random.Random(seed)
    options = [[(rng.randint(1, 40), rng.random()) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 6))]
    budget = rng.randint(0, 120)
    solution, expected = solve_mckp(options, budget), brute_force(options, budget)
    if expected is None:
        assert solution is None
    else:
        assert solution.unit == 1 and solution.bytes <= budget
        assert solution.cost == pytest.approx(expected)


def test_knapsack_with_coarse_units_still_fits_and_is_near_optimal():
    rng = random.Random(7)
    options = [[(rng.randint(100, 5000), rng.random()) for _ in range(4)] for _ in range(6)]
    budget = 15000
    solution = solve_mckp(options, budget, resolution=50)
    assert solution.unit > 1 and solution.bytes <= budget
    assert solution.cost <= brute_force(options, budget - solution.unit * len(options)) + 1e-9


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_module_bytes_are_what_mlx_stores(bits, group_size):
    linear, embedding = nn.Linear(128, 96, bias=True), nn.Embedding(300, 64)
    for module, extra in ((linear, 96), (embedding, 0)):
        rows, cols = module.weight.shape
        q = QuantModule("m", None, rows, cols, extra)
        choice = Affine(bits, group_size)
        quantized = module.to_quantized(group_size=group_size, bits=bits)
        quantized.set_dtype(mx.float16)
        assert q.bytes_for(choice) == sum(v.nbytes for _, v in nn.utils.tree_flatten(quantized.parameters()))
        module.set_dtype(mx.float16)
        assert q.bytes_for(KEEP) == sum(v.nbytes for _, v in nn.utils.tree_flatten(module.parameters()))


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_microscaled_formats_price_store_and_read_back_as_mlx_does(mode):
    from lsaq_mlx.planning.choices import choice_from_config
    from lsaq_mlx.planning.microscaled import Microscaled

    choice = Microscaled(mode)
    linear = nn.Linear(128, 96)
    linear.weight = mx.random.normal((96, 128)) * 0.05
    q = QuantModule("m", 0, 96, 128, 96)
    quantized = choice.module(linear)
    quantized.set_dtype(mx.float16)  # the float bias; the codes and 8-bit scales keep their types
    assert quantized.mode == mode and quantized.get("biases") is None
    assert q.bytes_for(choice) == sum(v.nbytes for _, v in nn.utils.tree_flatten(quantized.parameters()))
    fisher = mx.random.uniform(shape=linear.weight.shape)
    codes, scales = mx.quantize(linear.weight, choice.group_size, choice.bits, mode=mode)
    held = mx.dequantize(codes, scales, None, choice.group_size, choice.bits, mode=mode)
    expected = (fisher * mx.square(linear.weight - held)).sum().item()
    assert module_errors(linear.weight, fisher, [choice])[mode] == pytest.approx(expected, rel=1e-5)
    assert choice_from_config(choice.config()) == choice
    with pytest.raises(UserError):
        choice_from_config({"bits": 8, "group_size": 16, "mode": mode})  # not the format's


def test_microscaled_formats_are_planned_only_when_asked_and_only_where_they_fit():
    from lsaq_mlx.planning.microscaled import Microscaled

    model = tiny_model("llama")
    assert not PlanningContext(model, "fp").extra_options
    ctx = PlanningContext(model, "fp", codecs=("affine", "nvfp4", "mxfp8"))
    for q in ctx.modules:
        assert ctx.extra_options[q.path] == [Microscaled("nvfp4"), Microscaled("mxfp8")]
        assert set(ctx.extra_options[q.path]) <= set(ctx.candidates(q))
    with pytest.raises(UserError, match="codecs must be affine"):
        PlanningContext(model, "fp", codecs=("nvfp4",))


@pytest.fixture(scope="module")
def planning():
    model = tiny_model("llama")
    ctx = PlanningContext(model, "fp")
    weights = {q.path: module_at(model, q.path).weight for q in ctx.modules}
    errors = CostTable({q.path: module_errors(weights[q.path], mx.ones_like(weights[q.path]), q.choices())
                        for q in ctx.modules})
    scores = LayerScores("fp", "jaccard", {}, [0.2, 0.9])
    return model, ctx, errors, scores


def test_module_errors_equal_mlx_round_trip_errors():
    """The elementwise pricing gives what quantizing with mx.quantize and reading back
    with mx.dequantize (float16 scales and biases) gives, edge cases included: groups of
    zeros, constant groups, groups whose extreme of larger magnitude is negative, and a
    matrix spread over many row chunks."""
    mx.random.seed(3)
    w = mx.random.normal((700, 384)) * 0.05
    w[0] = 0.0
    w[1] = 0.25
    w[2, :128] = -mx.abs(w[2, :128]) - 0.01
    w[3, :64] = mx.linspace(-1.0, 0.001, 64)
    fisher = mx.random.uniform(shape=w.shape)
    mx.eval(w, fisher)
    choices = [Affine(b, g) for b in BITS for g in GROUP_SIZES] + [KEEP]
    errors = module_errors(w, fisher, choices)
    assert errors["keep"] == 0.0
    for c in choices[:-1]:
        terms = np.array(fisher * mx.square(w - roundtrip(w, c))).astype(np.float64)
        assert errors[c.key] == pytest.approx(terms.sum(), rel=2e-4), c.key  # float32 sums
        rows = affine_errors(w[:4], fisher[:4], [c]) + affine_errors(w[4:5], fisher[4:5], [c])
        assert rows == pytest.approx([terms[:4].sum(), terms[4].sum()], rel=1e-6), c.key


def test_lsaq_plans_fit_their_budget_and_spend_it(planning):
    model, ctx, errors, scores = planning
    weights = layer_weights(scores.scores, ctx.modules)
    assert set(weights.values()) == {1.0}  # IMPORTANCE_POWER 0: the Fisher alone weighs modules
    costs = []
    for budget in (2.75, 3.0, 4.0, 5.0, 8.0):
        plan = plan_lsaq(ctx, Budget(budget), errors, weights, scores)
        assert budget - 0.05 <= plan.predicted_bits_per_weight <= budget
        assert set(plan.modules) == {q.path for q in ctx.modules}
        costs.append(plan.details["cost"])
    assert costs == sorted(costs, reverse=True)  # more bits, less cost


def test_budgets_outside_the_feasible_range_name_it(planning):
    model, ctx, errors, scores = planning
    weights = layer_weights(scores.scores, ctx.modules)
    with pytest.raises(UserError, match=r"outside what lsaq can do for this model: \d+\.\d+ to 16\.000 bits per weight"):
        plan_lsaq(ctx, Budget(1.5), errors, weights)
    with pytest.raises(UserError, match="lsaq-tiers"):
        plan_tiers(ctx, Budget(3.0), scores, "lsaq-tiers", high=8, low=4)


def test_tiers_give_the_important_layer_the_high_bits(planning):
    model, ctx, errors, scores = planning
    four = plan_uniform(ctx, None, 4, 64).predicted_bits_per_weight
    plan = plan_tiers(ctx, Budget(four + 1.5), scores, "lsaq-tiers", high=8, low=4)
    assert plan.details["high_layers"] == [1]
    assert plan.modules["model.layers.1.self_attn.q_proj"].bits == 8
    assert plan.modules["model.layers.0.self_attn.q_proj"].bits == 4
    assert plan.modules["model.embed_tokens"].bits == 4


def test_uniform_and_recipe(planning):
    model, ctx, _, _ = planning
    plan = plan_uniform(ctx, Budget(4.6))
    assert set(plan.modules.values()) == {Affine(4, 64)}
    recipe = plan_recipe(ctx, model, "mixed_3_6")
    assert {c.bits for c in recipe.modules.values()} == {3, 6}


def test_the_printed_plan_names_its_budget(planning):
    from io import StringIO

    from rich.console import Console

    from lsaq_mlx.cli.render.plan import print_plan

    model, ctx, errors, scores = planning
    weights = layer_weights(scores.scores, ctx.modules)
    plans = {"budget 4.5 bits per weight": plan_lsaq(ctx, Budget(4.5), errors, weights),
             "budget 100.0 KB of weights": plan_lsaq(ctx, Budget(bytes=100_000), errors, weights),
             "no budget (recipe)": plan_recipe(ctx, model, "mixed_3_6")}
    for expected, plan in plans.items():
        out = StringIO()
        print_plan(plan, console=Console(file=out, width=200))
        assert expected in out.getvalue().splitlines()[-1]


def test_overrides_pin_modules(planning):
    model, _, errors, scores = planning
    ctx = PlanningContext(model, "fp", [Override.parse(r"down_proj$=8:32"), Override.parse("embed=keep")])
    plan = plan_lsaq(ctx, Budget(6.0), errors, layer_weights(scores.scores, ctx.modules))
    assert plan.modules["model.layers.0.mlp.down_proj"] == Affine(8, 32)
    assert plan.modules["model.embed_tokens"] == KEEP
    for bad in ("nothing", "x=7", "(=4", "q_proj=4:48"):
        with pytest.raises(UserError, match="override"):
            Override.parse(bad)
    with pytest.raises(UserError, match="matches no"):
        PlanningContext(model, "fp", [Override.parse("no_such_module=4")])


def test_plans_round_trip_as_json(planning, tmp_path):
    model, ctx, errors, scores = planning
    weights = layer_weights(scores.scores, ctx.modules)
    plans = [plan_lsaq(ctx, Budget(b), errors, weights, scores) for b in (5.0, 3.0)]
    plans[0].save(tmp_path / "p.json")
    assert QuantPlan.load(tmp_path / "p.json") == plans[0]
    PlanSet(plans).save(tmp_path / "s.json")
    loaded = PlanSet.load(tmp_path / "s.json")
    assert [p.predicted_bytes for p in loaded.plans] == sorted(p.predicted_bytes for p in plans)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="plan file .* is not valid JSON"):
        QuantPlan.load(tmp_path / "bad.json")
    assert json.loads((tmp_path / "p.json").read_text())["type"] == "QuantPlan"
