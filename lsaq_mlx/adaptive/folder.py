"""Reading an adaptive folder: its plan set, checked against what the folder stores, and
its store of module settings; the planner an engine on it uses (``AdaptivePlans``)."""

import logging
from pathlib import Path

from lsaq_mlx.adaptive.store import SideStore
from lsaq_mlx.documents import read_json
from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.choices import Affine
from lsaq_mlx.planning.plan import PlanSet, QuantPlan

log = logging.getLogger(__name__)

PLANS_FILE = "lsaq_plans.json"
SIDE_FOLDER = "lsaq_adaptive"
BUDGET_TOLERANCE = 1e-6  # bits per weight


class AdaptiveFolder:
    """``plans``: smallest first, the last the one the folder stores; ``store``: the
    module settings made when it was converted (None when missing: all are derived)."""

    def __init__(self, path: Path, plans: PlanSet, store: SideStore | None):
        self.path, self.plans, self.store = Path(path), plans, store

    @property
    def top(self) -> QuantPlan:
        return self.plans.plans[-1]

    @classmethod
    def open(cls, folder: Path) -> "AdaptiveFolder | None":
        """The adaptive folder at ``folder``; None when it is not one, or when its plan
        set is damaged (a warning: the folder then serves its stored plan only)."""
        folder = Path(folder)
        if not (folder / PLANS_FILE).is_file():
            return None
        try:
            plans = PlanSet.load(folder / PLANS_FILE)
            config = read_json(folder / "config.json", f"{folder}/config.json")
            check_plans(plans, config.get("quantization") if isinstance(config, dict) else None)
        except UserError as e:
            log.warning("warning: %s: %s; it serves its stored plan only", folder, e)
            return None
        side = folder / SIDE_FOLDER
        if not side.is_dir():
            log.warning("warning: %s has no %s/: the smaller plans round the stored weights", folder, SIDE_FOLDER)
        return cls(folder, plans, SideStore(folder, SIDE_FOLDER, plans.plans[-1]) if side.is_dir() else None)

    @classmethod
    def of(cls, source) -> "AdaptiveFolder | None":
        """``open`` for a resolved model: only folders (local or from the hub) can be adaptive."""
        return cls.open(source.path) if source.kind in ("folder", "hub") else None

    def budgets(self) -> list[float]:
        return [budget_of(p) for p in self.plans.plans]

    def plan_for(self, bits: float) -> QuantPlan:
        """The plan of budget ``bits``, or else the largest below it; one line outside the set."""
        budgets = self.budgets()
        if not budgets[0] - BUDGET_TOLERANCE <= bits <= budgets[-1] + BUDGET_TOLERANCE:
            listed = ", ".join(f"{b:g}" for b in budgets)
            raise UserError(f"{self.path} serves {budgets[0]:g} to {budgets[-1]:g} bits per weight (plans: {listed}), "
                            f"not {bits:g}", setting="bits_budget")
        return max((p for p, b in zip(self.plans.plans, budgets) if b <= bits + BUDGET_TOLERANCE), key=budget_of)

    def model_at(self, source, plan: QuantPlan):
        """``(model, tokenizer)``: the folder's model at ``plan`` built as the runtime
        builds it (the stored model, then the plan's swaps), in its stored form."""
        from lsaq_mlx.runtime.swap import swap_modules
        from lsaq_mlx.sources import load_model
        from lsaq_mlx.sources.model_tensors import ModelTensors
        from lsaq_mlx.sources.tensors import DequantizedTensors, source_tensors

        model, tokenizer, config = load_model(source, compute=False, lazy=True)
        weights = DequantizedTensors(ModelTensors(source_tensors(source), model), config)
        changes = {p: c for p, c in plan.modules.items() if self.top.modules[p] != c}
        report = swap_modules(model, changes, weights, False, self.store, set())
        if report.failed:
            path, why = next(iter(report.failed.items()))
            raise UserError(f"cannot build the plan of {budget_of(plan):g} bits per weight: {path}: {why}")
        return model, tokenizer

    def describe(self) -> dict:
        """Each plan's budget, size and how many of its settings the store holds or a
        swap rounds; the store's bytes."""
        held = set(self.store.settings()) if self.store else set()
        plans = []
        for plan, budget in zip(self.plans.plans, self.budgets()):
            changed = [(p, c.key) for p, c in plan.modules.items() if c != self.top.modules[p]]
            stored = sum(k in held for k in changed)
            plans.append({"budget": budget, "bits_per_weight": plan.predicted_bits_per_weight,
                          "bytes": plan.predicted_bytes, "settings_stored": stored,
                          "settings_rounded": len(changed) - stored})
        return {"plans": plans, "side_bytes": self.side_bytes()}

    def side_bytes(self) -> int:
        return self.store.bytes() if self.store else 0


def budget_of(plan: QuantPlan) -> float:
    """The bits per weight a plan was made for (its prediction when it had no such budget)."""
    value = plan.budget.get("bits_per_weight")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else plan.predicted_bits_per_weight


def check_plans(plans: PlanSet, quantization) -> None:
    """The set's top plan is what ``quantization`` (config.json's) stores; every other
    plan names the same modules and gives none more bits than the top."""
    if len(plans.plans) < 2 or not isinstance(quantization, dict):
        raise UserError(f"{PLANS_FILE} does not describe this folder")
    top = plans.plans[-1]
    for path, choice in top.modules.items():
        stored = quantization.get(path)
        if isinstance(stored, dict):
            stored = {"mode": "affine"} | stored
        if choice.config() != stored:
            raise UserError(f"{PLANS_FILE}: its largest plan is not what the folder stores ({path[:80]})")
    for plan in plans.plans[:-1]:
        if set(plan.modules) != set(top.modules):
            raise UserError(f"{PLANS_FILE}: its plans name different modules")
        above = [p for p, c in plan.modules.items()
                 if not isinstance(c, Affine) and top.modules[p] != c
                 or isinstance(c, Affine) and isinstance(top.modules[p], Affine) and c.bits > top.modules[p].bits]
        if above:
            raise UserError(f"{PLANS_FILE}: a plan gives {above[0][:80]} more bits than the folder stores")


class AdaptivePlans:
    """The planner of an engine on an adaptive folder: its plans, by budget; scores for
    displays from an ordinary ``Planner`` (``planner``)."""

    def __init__(self, folder: AdaptiveFolder, planner):
        self.folder, self.planner = folder, planner
        self.stored_plan, self.side_store, self.plan_set = folder.top, folder.store, folder.plans

    def plans(self, request) -> list[QuantPlan]:
        return [self.folder.plan_for(b) for b in request.bits_budgets]

    def scores(self, *args, **kwargs):
        return self.planner.scores(*args, **kwargs)

    def model_in_memory(self):
        return None

    def release(self) -> None:
        pass


def planner_for(source):
    """An adaptive folder's ``AdaptivePlans``, else a ``Planner`` for ``source``."""
    from lsaq_mlx.planning.planner import Planner

    folder = AdaptiveFolder.of(source)
    return AdaptivePlans(folder, Planner(source)) if folder else Planner(source)
