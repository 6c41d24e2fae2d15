"""From layer scores to a ``QuantPlan`` under a budget.

Methods:
- ``lsaq`` (default): per-module (bits, group size) or float, chosen by the
  multiple-choice knapsack on the cost model of ``lsaq_mlx.planning.cost`` (importance-weighted,
  activation-weighted quantization error); with the ``swsc`` codec also the SWSC
  settings of ``lsaq_mlx.swsc.candidates`` for every decoder-layer linear module;
- ``lsaq-tiers``: the LSAQ paper's two tiers: the n layers with the highest jaccard
  importance at ``high`` bits, the rest (and the embeddings / LM head) at ``low`` bits,
  n as large as the budget allows; ``tiers-cosine``, ``tiers-zscore``, ``tiers-random``
  order the layers by those metrics instead;
- ``uniform``: one (bits, group size) everywhere, the largest that fits;
- mlx-lm's mixed recipes (``mixed_3_6``...) through mlx-lm's own predicate.
"""

import re
from dataclasses import dataclass

import mlx.nn as nn

from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.budgets import Budget
from lsaq_mlx.planning.cost import CostTable
from lsaq_mlx.planning.knapsack import solve_mckp
from lsaq_mlx.sizes import format_size
from lsaq_mlx.planning.choices import BITS, FLOAT_BYTES, GROUP_SIZES, KEEP, SWSC, Affine, Choice
from lsaq_mlx.planning.microscaled import FORMATS, Microscaled
from lsaq_mlx.planning.plan import QuantModule, QuantPlan, fixed_params, model_floors, quantizable_modules
from lsaq_mlx.swsc.candidates import candidates as swsc_candidates
from lsaq_mlx.swsc.codec import SWSCSettings

RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
DEFAULT_GROUP_SIZE = 64
CODECS = ("affine", "swsc", *FORMATS)


@dataclass
class Override:
    pattern: str
    choice: Choice

    @classmethod
    def parse(cls, text: str) -> "Override":
        """``REGEX=BITS[:GROUP]``, ``REGEX=keep`` or ``REGEX=swsc:K:R`` (k clusters, rank r)."""
        pattern, sep, value = text.rpartition("=")
        try:
            re.compile(pattern)
            if not sep or not pattern:
                raise ValueError
            if value in ("keep", "float", "16"):
                return cls(pattern, KEEP)
            if value.startswith("swsc:"):
                k, r = value.removeprefix("swsc:").split(":")
                return cls(pattern, SWSC(SWSCSettings(int(k), int(r))))
            bits, _, group = value.partition(":")
            choice = Affine(int(bits), int(group or DEFAULT_GROUP_SIZE))
        except (re.error, ValueError):
            raise UserError(f"bad override '{text}': expected REGEX=BITS[:GROUP], REGEX=keep or REGEX=swsc:K:R",
                            setting="override") from None
        if choice.bits not in BITS or choice.group_size not in GROUP_SIZES:
            raise UserError(f"bad override '{text}': bits one of {BITS}, group size one of {GROUP_SIZES}", setting="override")
        return cls(pattern, choice)


def check_codecs(codecs) -> None:
    if any(c not in CODECS for c in codecs) or "affine" not in codecs:
        raise UserError(f"codecs must be affine, with any of swsc, {', '.join(FORMATS)} beside it (e.g. affine,nvfp4), "
                        f"not '{','.join(codecs)}'", setting="codecs")


class PlanningContext:
    """A float model's quantizable modules and parameter counts, for planning; with the
    ``swsc`` codec, every decoder-layer linear module's SWSC candidates too."""

    def __init__(self, model: nn.Module, fingerprint: str, overrides: list[Override] = (), codecs=("affine",),
                 ceilings: dict | None = None, stored_formats: dict | None = None):
        """``ceilings``: the bits each module of a quantized source stores; no candidate
        goes above them (there is nothing finer to quantize from). ``stored_formats``: the
        modules it stores in a microscaling format (``{path: mode}``), which may keep it
        as it is stored, whatever the codecs. The model class's own
        ``quant_predicate`` gives floors (``plan.model_floors``): a module it keeps in
        float is pinned there, one it names a setting for gets no fewer bits."""
        check_codecs(codecs)
        self.ceilings = ceilings or {}
        self.modules = quantizable_modules(model)
        self.codecs = tuple(codecs)
        self.stored_formats = stored_formats or {}
        self.extra_options = {q.path: self._extra_options(q) for q in self.modules}
        self.extra_options = {p: options for p, options in self.extra_options.items() if options}
        self.floors = model_floors(model)
        self.fixed_params = fixed_params(model, self.modules)
        self.parameters = self.fixed_params + sum(q.params for q in self.modules)
        self.fingerprint = fingerprint
        self.n_layers = 1 + max(q.layer for q in self.modules if q.layer is not None)
        self.pinned = {p: KEEP for p, floor in self.floors.items() if floor == KEEP}
        for o in overrides:
            matched = [q for q in self.modules if re.search(o.pattern, q.path)]
            if not matched:
                raise UserError(f"override '{o.pattern}' matches no quantizable module", setting="override")
            for q in matched:
                if isinstance(o.choice, SWSC):
                    self._check_swsc_override(o, q)
                elif not o.choice.fits(q.cols):
                    raise UserError(f"override '{o.pattern}': group size {o.choice.group_size} does not divide {q.path}'s "
                                    f"input size {q.cols}", setting="override")
                self.pinned[q.path] = o.choice

    def _extra_options(self, q: QuantModule) -> list[Choice]:
        """``q``'s choices of the codecs beyond affine: SWSC for the linear layers of decoder
        layers, the microscaled formats (and the one it is stored in) whose groups divide
        its input dimension."""
        modes = [c for c in self.codecs if c in FORMATS] + [self.stored_formats.get(q.path)]
        formats = [Microscaled(m) for m in dict.fromkeys(modes) if m in FORMATS and Microscaled(m).fits(q.cols)]
        if "swsc" in self.codecs and q.layer is not None and q.copies == 1:
            return [SWSC(s) for s in swsc_candidates(q.rows, q.cols)] + formats
        return formats

    def _check_swsc_override(self, o: Override, q: QuantModule) -> None:
        if "swsc" not in self.codecs:
            raise UserError(f"override '{o.pattern}=swsc:...' needs the codecs affine,swsc (the output is then not for "
                            "stock mlx-lm)", setting="codecs")
        if q.layer is None:
            raise UserError(f"override '{o.pattern}': SWSC is for the linear layers of decoder layers, not {q.path}",
                            setting="override")
        try:
            o.choice.settings.check(q.rows, q.cols)
        except UserError as e:
            raise UserError(f"override '{o.pattern}' on {q.path}: {e}", setting="override") from None

    def candidates(self, q: QuantModule) -> list[Choice]:
        """Every choice the cost model prices for ``q``: affine, keep, then SWSC; for a
        quantized source, none above the bits it stores; none below the model's floor."""
        choices = q.choices() + self.extra_options.get(q.path, [])
        ceiling = self.ceilings.get(q.path, 16)
        floor = min(getattr(self.floors.get(q.path), "bits", 0), ceiling)
        return [c for c in choices if floor <= getattr(c, "bits", 16) <= ceiling]

    def options(self, q: QuantModule) -> list[Choice]:
        return [self.pinned[q.path]] if q.path in self.pinned else self.candidates(q)

    def total_bytes(self, choices: dict) -> int:
        return self.fixed_params * FLOAT_BYTES + sum(q.bytes_for(choices[q.path]) for q in self.modules)

    def module_budget(self, budget: Budget) -> int:
        """Bytes the quantizable modules may take."""
        total = budget.bytes if budget.bytes is not None else int(budget.bits_per_weight * self.parameters / 8)
        return total - self.fixed_params * FLOAT_BYTES

    def plan(self, method: str, budget: Budget, choices: dict, scores=None, details=None) -> QuantPlan:
        choices = {q.path: self.pinned.get(q.path, choices[q.path]) for q in self.modules}
        size = self.total_bytes(choices)
        by_layer = {}
        for q in self.modules:
            name = "rest" if q.layer is None else str(q.layer)
            by_layer[name] = by_layer.get(name, 0) + q.bytes_for(choices[q.path])
        details = (details or {}) | {"module_bytes_by_layer": by_layer, "float_bytes": self.fixed_params * FLOAT_BYTES}
        return QuantPlan(
            self.fingerprint, method, budget.describe(), choices, size, size * 8 / self.parameters, self.parameters,
            _scores_summary(scores), details,
        )

    def check_not_above(self, budget: Budget, method: str, low: dict, high: dict) -> None:
        """A bits-per-weight budget above the largest plan is an error, as one below the
        smallest is (a memory budget is a ceiling: more than enough is fine)."""
        if budget.bits_per_weight is not None and budget.bits_per_weight * self.parameters > 8 * self.total_bytes(high) + 1e-6:
            raise self.infeasible(budget, method, low, high)

    def infeasible(self, budget: Budget, method: str, low: dict, high: dict) -> UserError:
        lo, hi = self.total_bytes(low), self.total_bytes(high)
        asked = (f"{budget.bits_per_weight:g} bits per weight" if budget.bits_per_weight is not None
                 else f"{format_size(budget.bytes)} of weights")
        return UserError(
            f"budget {asked} is outside what {method} can do for this model: "
            f"{lo * 8 / self.parameters:.3f} to {hi * 8 / self.parameters:.3f} bits per weight "
            f"({format_size(lo)} to {format_size(hi)} of weights)"
        )


def _scores_summary(scores) -> dict:
    if scores is None:
        return {}
    return {"metric": scores.metric, "key": scores.key, "params": scores.params, "scores": scores.scores}


def plan_lsaq(ctx: PlanningContext, budget: Budget, costs: CostTable, weights: dict, scores=None) -> QuantPlan:
    """The multiple-choice knapsack over every module's options on the cost model."""
    items = [[(q.bytes_for(c), weights[q.path] * costs.cost(q.path, c)) for c in ctx.options(q)] for q in ctx.modules]
    smallest = {q.path: min(ctx.options(q), key=q.bytes_for) for q in ctx.modules}
    largest = {q.path: max(ctx.options(q), key=q.bytes_for) for q in ctx.modules}
    ctx.check_not_above(budget, "lsaq", smallest, largest)
    solution = solve_mckp(items, ctx.module_budget(budget))
    if solution is None:
        raise ctx.infeasible(budget, "lsaq", smallest, largest)
    picks = {q.path: ctx.options(q)[j] for q, j in zip(ctx.modules, solution.picks)}
    details = {"cost": solution.cost, "dp_unit_bytes": solution.unit,
               "optimality": f"cost <= exact optimum for a budget {solution.unit * len(items)} bytes smaller"}
    return ctx.plan("lsaq", budget, picks, scores, details)


def plan_tiers(ctx: PlanningContext, budget: Budget, scores, method: str, high: int = 8, low: int = 4,
               group_size: int = DEFAULT_GROUP_SIZE, low_fraction: float | None = None) -> QuantPlan:
    """Top-n layers by ``scores`` at ``high`` bits, the rest at ``low``; n as large as fits,
    or, with ``low_fraction`` (the LSAQ paper's setting), that share of the layers at ``low``."""
    if len(scores.scores) != ctx.n_layers:
        raise UserError(f"the scores have {len(scores.scores)} layers, the model {ctx.n_layers}")
    if high <= low:
        raise UserError(f"the high bits ({high}) must be above the low bits ({low})", setting="tier_bits")
    ranking = sorted(range(ctx.n_layers), key=lambda i: -scores.scores[i])

    def choices_for(n):
        top = set(ranking[:n])
        return {q.path: _uniform_choice(q, high if q.layer in top else low, group_size) for q in ctx.modules}

    if low_fraction is not None:
        if not 0.0 <= low_fraction <= 1.0:
            raise UserError(f"the share of layers at low bits must be between 0 and 1, not {low_fraction:g}")
        n = ctx.n_layers - round(low_fraction * ctx.n_layers)
    else:
        limit = ctx.module_budget(budget) + ctx.fixed_params * FLOAT_BYTES
        fitting = [n for n in range(ctx.n_layers + 1)
                   if ctx.total_bytes(ctx.plan(method, budget, choices_for(n)).modules) <= limit]
        if not fitting:
            raise ctx.infeasible(budget, method, choices_for(0), choices_for(ctx.n_layers))
        n = max(fitting)
    details = {"high_bits": high, "low_bits": low, "group_size": group_size, "high_layers": sorted(ranking[:n])}
    return ctx.plan(method, budget, choices_for(n), scores, details)


def _uniform_choice(q: QuantModule, bits: int, group_size: int) -> Choice:
    """``bits`` at ``group_size``, or the nearest group size that divides the module."""
    dividing = [g for g in GROUP_SIZES if q.cols % g == 0]
    group = min(dividing, key=lambda g: (abs(g - group_size), -g), default=None)
    return KEEP if group is None else Affine(bits, group)


def plan_uniform(ctx: PlanningContext, budget: Budget | None, bits: int | None = None, group_size: int | None = None) -> QuantPlan:
    """One setting for every module: the given one, or the largest that fits the budget."""
    top = min(ctx.ceilings.values(), default=max(BITS))  # a quantized source: no module above what it stores
    settings = [(b, g) for b in BITS for g in GROUP_SIZES if (bits in (None, b) and group_size in (None, g)) and b <= top]
    if not settings:
        raise UserError(f"this model stores modules at {top} bits: a uniform {bits}-bit plan needs the float source")
    plans = [ctx.plan("uniform", budget or Budget(), {q.path: _uniform_choice(q, b, g) for q in ctx.modules},
                      details={"bits": b, "group_size": g}) for b, g in settings]
    if budget is None or budget.bits_per_weight is None and budget.bytes is None:
        return plans[0]
    limit = ctx.module_budget(budget) + ctx.fixed_params * FLOAT_BYTES
    fitting = [p for p in plans if p.predicted_bytes <= limit]
    smallest, largest = min(plans, key=lambda p: p.predicted_bytes), max(plans, key=lambda p: p.predicted_bytes)
    ctx.check_not_above(budget, "uniform", smallest.modules, largest.modules)
    if not fitting:
        raise ctx.infeasible(budget, "uniform", smallest.modules, largest.modules)
    return max(fitting, key=lambda p: (p.predicted_bytes, p.details["bits"]))


def plan_recipe(ctx: PlanningContext, model: nn.Module, recipe: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantPlan:
    """mlx-lm's mixed recipe, through mlx-lm's own predicate (and its group-size rule)."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    if recipe not in RECIPES:
        raise UserError(f"unknown recipe '{recipe}' (one of {', '.join(RECIPES)})")
    predicate = mixed_quant_predicate_builder(recipe, model, group_size)
    modules = dict(model.named_modules())
    choices = {}
    for q in ctx.modules:
        choice = predicate(q.path, modules[q.path]) if q.cols % group_size == 0 else False
        choices[q.path] = Affine(choice["bits"], choice["group_size"]) if choice else KEEP
    return ctx.plan(recipe, Budget(), choices, details={"recipe": recipe, "group_size": group_size})
