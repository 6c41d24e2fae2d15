"""The ``Planner``: plans for one model source, for any budget, cheaply.

What a method needs is gathered once and kept: the model's structure (built from its
config alone: no weights are read), layer scores and the cost table (each cached on
disk by content fingerprint), and the float weights, loaded at most once and only when
a score or the cost table has to be computed. A ``PlanRequest`` says what to plan.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

from lsaq_mlx.errors import UserError
from lsaq_mlx.planning import cost_table
from lsaq_mlx.planning.budgets import Budget, check_bits_budget, memory_budget
from lsaq_mlx.planning.choices import BITS, GROUP_SIZES
from lsaq_mlx.planning.cost import CostTable
from lsaq_mlx.planning.cost_table import CarriedCosts
from lsaq_mlx.planning.method_table import METHODS
from lsaq_mlx.planning.methods import RECIPES, Override, PlanningContext, check_codecs, plan_recipe
from lsaq_mlx.planning.plan import PlanSet, QuantPlan
from lsaq_mlx.scoring.calibration import load_calibration
from lsaq_mlx.scoring.run import ScoreOptions, score
from lsaq_mlx.scoring.scores import LayerScores
from lsaq_mlx.sources import ModelSource, load_model
from lsaq_mlx.sources.load import load_tokenizer, model_tensors, skeleton_model
from lsaq_mlx.sources.streaming import StreamedModel
from lsaq_mlx.sources.tensors import stored_settings


@dataclass(kw_only=True)
class PlanRequest:
    method: str = "lsaq"
    bits_budgets: list[float] = field(default_factory=list)
    memory_budget: str | None = None
    context: int = 4096  # tokens of KV cache a memory budget reserves
    recipe: str | None = None
    scores_file: Path | None = None
    calib: str | None = None
    high_bits: int = 8
    low_bits: int = 4
    group_size: int | None = None
    bits: int | None = None  # uniform: a fixed bit width
    overrides: list[str] = field(default_factory=list)
    low_fraction: float | None = None  # tiers: this share of the layers at low bits, instead of a budget
    codecs: tuple[str, ...] = ("affine",)  # ("affine", "swsc"): lsaq may also choose SWSC (not for stock mlx-lm)
    importance_power: float = 0.0  # lsaq: weight each layer's cost by (jaccard importance / mean)^power

    def check(self) -> None:
        if self.recipe is None and self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}' (one of {', '.join(METHODS)}, or a recipe: "
                            f"{', '.join(RECIPES)})", setting="method")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise UserError(f"unknown recipe '{self.recipe}' (one of {', '.join(RECIPES)})", setting="recipe")
        budgets = bool(self.bits_budgets) + bool(self.memory_budget)
        if self.low_fraction is not None and (self.method not in METHODS or not METHODS[self.method].tier_metric
                                              or budgets):
            raise UserError("a share of layers at low bits goes with a tiers method and no budget")
        fixed = self.method == "uniform" and self.bits or self.low_fraction is not None
        if self.recipe is None and budgets != 1 and not (fixed and not budgets):
            raise UserError(f"method {self.method} needs one budget: bits per weight (one or more) or a memory size",
                            setting="budget")
        for b in self.bits_budgets:
            check_bits_budget(b)
        for name, value in (("bits", self.bits), ("high_bits", self.high_bits), ("low_bits", self.low_bits)):
            if value is not None and value not in BITS:
                raise UserError(f"{name.replace('_', ' ')} must be one of {', '.join(map(str, BITS))}, not {value}",
                                setting=name)
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise UserError(f"the group size must be one of {', '.join(map(str, GROUP_SIZES))}, not {self.group_size}",
                            setting="group_size")
        if self.context < 1:
            raise UserError(f"the context must be at least 1 token, not {self.context}", setting="context")
        if self.low_fraction is not None and not 0 <= self.low_fraction <= 1:
            raise UserError(f"the share of layers at low bits must be between 0 and 1, not {self.low_fraction}",
                            setting="low_fraction")
        check_codecs(self.codecs)


class Planner:
    """Plans for ``source``. ``loaded`` may hand over the float source already in memory
    (``(model, tokenizer)`` in the compute mode); otherwise it is loaded when needed."""

    def __init__(self, source: ModelSource, loaded=None):
        self.source = source
        self._loaded = loaded
        self._structure = None
        self._contexts: dict = {}
        self._tables: dict = {}

    # ---- what the methods need, each gathered once ----
    @property
    def structure(self):
        """``(model, config)``: the source's model built from its config, without weights."""
        if self._structure is None:
            self._structure = skeleton_model(self.source)
        return self._structure

    def loaded(self):
        """``(model, tokenizer)``: the float source in the compute mode, loaded once."""
        if self._loaded is None:
            model, tokenizer, _ = load_model(self.source)
            self._loaded = (model, tokenizer)
        return self._loaded

    def model_in_memory(self):
        """The float source if this planner loaded it (or was given it), else None."""
        return self._loaded[0] if self._loaded else None

    def release(self) -> None:
        """Forget the float source (plans that need it load it again)."""
        self._loaded = None

    def context(self, overrides=(), codecs=("affine",), ceilings: dict | None = None) -> PlanningContext:
        """``ceilings``: most bits per module (``{path: bits}``), on top of what a
        quantized source stores."""
        key = (tuple(overrides), tuple(codecs), tuple(sorted((ceilings or {}).items())))
        if key not in self._contexts:
            parsed = [Override.parse(o) for o in overrides]
            model, config = self.structure
            settings = {} if self.source.kind == "config" else stored_settings(model_tensors(self.source), config)
            stored = {p: q["bits"] for p, q in settings.items()}
            limits = {p: min(stored.get(p, 16), (ceilings or {}).get(p, 16)) for p in {*stored, *(ceilings or {})}}
            formats = {p: q["mode"] for p, q in settings.items() if q.get("mode", "affine") != "affine"}
            self._contexts[key] = PlanningContext(model, self.source.fingerprint, parsed, codecs, limits, formats)
        return self._contexts[key]

    def cost_table(self, ctx: PlanningContext, calib: str | None = None) -> CostTable:
        """The cost model's errors of ``ctx``'s candidates: from memory, the cache, or computed."""
        text = load_calibration(calib)
        key = (id(ctx), text.fingerprint)
        if key not in self._tables:
            table = cost_table.cached_table(self.source.fingerprint, text, ctx)
            if table is None and cost_table.adopt_carried_table(self.source, text, ctx):
                table = cost_table.cached_table(self.source.fingerprint, text, ctx)
            if table is None:
                table = cost_table.compute_table(self.source.fingerprint, text, ctx, StreamedModel(self.source),
                                                 load_tokenizer(self.source))
            self._tables[key] = table
        return self._tables[key]

    def priced(self, calib: str | None = None) -> CarriedCosts | None:
        """The cost table the plans made so far were priced by (None when none was: recipes,
        uniform plans, a plan file)."""
        text = load_calibration(calib)
        tables = [t for (_, fingerprint), t in self._tables.items() if fingerprint == text.fingerprint]
        return CarriedCosts(text, tables[-1]) if tables else None

    def scores(self, metric: str, calib: str | None = None, scores_file: Path | None = None) -> LayerScores:
        if scores_file:
            scores = LayerScores.load(scores_file)
            if scores.model_fingerprint != self.source.fingerprint:
                raise UserError(f"{scores_file} holds scores of another model (fingerprint {scores.model_fingerprint})")
            return scores
        return score(self.source, ScoreOptions(metric, calib), model=lambda: self.loaded())

    # ---- plans ----
    def plans(self, request: PlanRequest, ceilings: dict | None = None) -> list[QuantPlan]:
        """One plan per budget of ``request`` (or the recipe's), smallest first; no module
        above its ``ceilings`` bits."""
        request.check()
        ctx = self.context(request.overrides, request.codecs, ceilings)
        model, config = self.structure
        if request.recipe:
            return [plan_recipe(ctx, model, request.recipe, request.group_size or 64)]
        budgets = [Budget(bits_per_weight=b) for b in request.bits_budgets]
        if request.memory_budget:
            budgets = [memory_budget(request.memory_budget, config, request.context)]
        return METHODS[request.method].plan(self, ctx, budgets, request)

    def plan(self, request: PlanRequest) -> QuantPlan:
        """The one plan of a request with one budget."""
        return self.plans(request)[0]

    def pipeline_plan(self, request: PlanRequest, memories: list[int], shape_only: bool = False,
                      rank_budgets: list[float] = ()):
        """The joint plan over ranks of ``memories`` bytes (``planning.joint``);
        ``shape_only``: priced from the config alone (``shape_cost``), no weights read;
        ``rank_budgets``: each rank also gets plans of these bits per weight below its
        share, for its own memory policy."""
        from lsaq_mlx.planning.joint import add_rank_plans, plan_pipeline
        from lsaq_mlx.planning.pipeline import ModelLayout
        from lsaq_mlx.planning.shape_cost import shape_costs

        replace(request, bits_budgets=request.bits_budgets or [16.0]).check()  # the ranks' memory is a budget
        if request.method != "lsaq" or request.recipe or request.memory_budget or len(request.bits_budgets) > 1:
            raise UserError("a plan over ranks takes the lsaq method and at most one -b (each rank's memory is "
                            "its budget)", setting="ranks")
        ctx = self.context(request.overrides, request.codecs)
        costs = shape_costs(ctx) if shape_only else self.cost_table(ctx, request.calib)
        layout = ModelLayout.of(*self.structure, ctx.modules)
        budget = Budget(bits_per_weight=request.bits_budgets[0]) if request.bits_budgets else None
        pipeline = plan_pipeline(ctx, costs, layout, memories, request.context, budget)
        return add_rank_plans(pipeline, ctx, costs, layout, list(rank_budgets)) if rank_budgets else pipeline

    def nested_plans(self, request: PlanRequest) -> PlanSet:
        """The plans of ``request``'s budgets where no module of a smaller plan has more
        bits than the largest plan gives it: every plan can be made from the largest's
        weights (an adaptive folder, ``lsaq_mlx.adaptive``)."""
        budgets = sorted(request.bits_budgets)
        if len(budgets) < 2:
            raise UserError("an adaptive folder needs at least two budgets", setting="adaptive")
        top = self.plan(replace(request, bits_budgets=budgets[-1:]))
        ceilings = {p: c.bits for p, c in top.modules.items() if hasattr(c, "bits")}
        return PlanSet(self.plans(replace(request, bits_budgets=budgets[:-1]), ceilings) + [top])


def plan_from_file(path: Path, source: ModelSource, codecs=("affine",), plan: QuantPlan | None = None) -> QuantPlan:
    """A plan file written for ``source`` (by ``plan --out``), checked against it;
    ``plan``: the file already read (a caller reads it before the model, to fail fast)."""
    plan = plan or QuantPlan.load(path)
    if plan.model_fingerprint != source.fingerprint:
        raise UserError(f"{path} is a plan for another model (fingerprint {plan.model_fingerprint})")
    if plan.swsc_modules() and "swsc" not in codecs:
        raise UserError(f"{path} gives {len(plan.swsc_modules())} modules to SWSC, which stock mlx-lm cannot open: "
                        "allow the codecs affine,swsc", setting="codecs")
    return plan


class FixedPlans:
    """Plans made beforehand, handed out by budget (bits per weight): a planner for an
    engine whose plans are already known (a PlanSet file, a benchmark, a test)."""

    def __init__(self, by_budget: dict):
        self.by_budget = {float(b): p for b, p in by_budget.items()}

    def plans(self, request: PlanRequest) -> list[QuantPlan]:
        missing = [b for b in request.bits_budgets if float(b) not in self.by_budget]
        if missing:
            known = ", ".join(f"{b:g}" for b in sorted(self.by_budget))
            raise UserError(f"no plan of {missing[0]:g} bits per weight here (plans: {known})", setting="bits_budget")
        return [self.by_budget[float(b)] for b in request.bits_budgets]

    def model_in_memory(self):
        return None

    def release(self) -> None:
        pass
