"""Every planning method (``--method``), one entry each: adding a method is adding an entry here.

An entry holds its help text (the CLI's is made from these), what it plans by (the
layer-importance metric of a tiers method, which also lets it take a share of layers at
low bits instead of a budget), and ``plan(planner, ctx, budgets, request)``: one plan per
budget, from what the planner has (scores, the cost table) and ``planning.methods``.
"""

from dataclasses import dataclass
from typing import Callable

from lsaq_mlx.planning.budgets import Budget
from lsaq_mlx.planning.cost import layer_weights
from lsaq_mlx.planning.methods import plan_lsaq, plan_tiers, plan_uniform


@dataclass(frozen=True)
class PlanningMethod:
    name: str
    help: str
    plan: Callable  # (planner, PlanningContext, [Budget], PlanRequest) -> [QuantPlan]
    tier_metric: str | None = None  # a tiers method: the metric that ranks the layers


METHODS: dict[str, PlanningMethod] = {}


def register(method: PlanningMethod) -> PlanningMethod:
    METHODS[method.name] = method
    return method


def method_help() -> str:
    return " | ".join(f"{m.name} ({m.help})" for m in METHODS.values())


def _lsaq(planner, ctx, budgets, request):
    errors = planner.cost_table(ctx, request.calib)
    scores = planner.scores("jaccard", request.calib, request.scores_file) if request.importance_power else None
    weights = layer_weights(scores.scores if scores else None, ctx.modules, request.importance_power)
    return [plan_lsaq(ctx, b, errors, weights, scores) for b in budgets]


def _tiers(name: str, metric: str):
    def plan(planner, ctx, budgets, request):
        scores = planner.scores(metric, request.calib, request.scores_file)
        return [plan_tiers(ctx, b, scores, name, request.high_bits, request.low_bits, request.group_size or 64,
                           request.low_fraction) for b in budgets or [Budget()]]

    return PlanningMethod(name, f"layers ranked by {metric} at two bit widths", plan, metric)


def _uniform(planner, ctx, budgets, request):
    if not budgets:
        return [plan_uniform(ctx, None, request.bits, request.group_size or 64)]
    return [plan_uniform(ctx, b, request.bits, request.group_size) for b in budgets]


register(PlanningMethod("lsaq", "knapsack on the Fisher-weighted quantization error of every module", _lsaq))
register(_tiers("lsaq-tiers", "jaccard"))
register(_tiers("tiers-cosine", "cosine"))
register(_tiers("tiers-zscore", "zscore"))
register(_tiers("tiers-random", "random"))
register(PlanningMethod("uniform", "one setting for every module: --bits, or the largest that fits", _uniform))
