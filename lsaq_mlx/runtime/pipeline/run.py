"""A session on a plan file (``--plan``): reading it, loading this rank's share (or the
whole plan), checking it fits this Mac, and this rank's own memory policy."""

from dataclasses import dataclass
from pathlib import Path

from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.pipeline import PipelinePlan
from lsaq_mlx.planning.plan import QuantPlan
from lsaq_mlx.runtime.pipeline.guard import StallGuard
from lsaq_mlx.runtime.pipeline.stage import PipelineStage, RankAdaptation
from lsaq_mlx.runtime.pipeline.stand_ins import keep_share, rank_plan


@dataclass
class PlannedRun:
    """A chat, TUI or server session on a plan file (``--plan``): the plan, this
    process's place among the ranks, and under mlx.launch its stall guard."""

    plan: QuantPlan | PipelinePlan
    ranks: object  # backend.ranks.Ranks
    guard: StallGuard | None = None
    adapts: bool = False  # each rank follows its memory through its own plans (--auto)
    trace: str | None = None  # this rank replays this memory trace

    @classmethod
    def open(cls, path, source, rank_timeout: float = 60.0, auto: bool = False, trace: str | None = None
             ) -> "PlannedRun":
        """``trace``: ``FILE`` for every rank, ``RANK:FILE`` for one (the others follow
        their own memory)."""
        from lsaq_mlx.backend.ranks import Ranks

        ranks = Ranks()
        guard = StallGuard(ranks.rank, rank_timeout) if ranks.size > 1 else None
        plan = read_plan_file(path, source)
        run = cls(plan, ranks, guard, auto or trace is not None)
        if run.adapts and not (ranks.size > 1 and isinstance(plan, PipelinePlan) and plan.rank_plans):
            raise UserError("--auto with --plan needs a pipeline plan with rank plans (plan --ranks ... "
                            "--rank-budgets 3,4,5) run under mlx.launch", setting="auto")
        if trace is not None:
            rank, _, file = str(trace).partition(":")
            run.trace = (file if int(rank) == ranks.rank else None) if rank.isdigit() and file else str(trace)
        return run

    def sampler(self):
        """This rank's memory: its trace, or the machine's."""
        from lsaq_mlx.runtime.memory import ScriptedSampler, SystemSampler

        return ScriptedSampler(Path(self.trace)) if self.trace else SystemSampler()

    def adaptation(self, source, stage: "PipelineStage", config: dict, policy_options: dict | None = None):
        """This rank's own policy over its plans: ``(PrecisionController, None)`` for
        rank 0's engine, else a ``RankAdaptation``; None when the run does not adapt."""
        if not self.adapts:
            return None
        control = rank_control(source, stage, config, self.plan.rank_plans[self.ranks.rank], policy_options)
        stage.control = control
        if self.ranks.rank == 0:
            return control
        stage.adaptation = RankAdaptation(control, self.sampler())
        return stage.adaptation

    @property
    def pipelined(self) -> bool:
        return self.ranks.size > 1

    def load(self, source):
        """``(model, config)``, rank 0 driving the others."""
        model, config = load_planned(source, self.plan, self.ranks, driven=True)
        if self.pipelined:
            model.guard = self.guard
        return model, config

    def held_plan(self) -> QuantPlan:
        """What this process holds of the plan."""
        if isinstance(self.plan, PipelinePlan):
            return rank_plan(self.plan, self.ranks.rank) if self.pipelined else self.plan.plan
        return self.plan


def rank_control(source, stage: "PipelineStage", config: dict, plans: list, policy_options: dict | None = None):
    """A PrecisionController of this rank's modules: its memory policy over ``plans``
    (its share last, where it starts), swaps re-reading its own copy of the source."""
    from lsaq_mlx.backend.compute import compute_mode
    from lsaq_mlx.planning.plan import PlanSet
    from lsaq_mlx.runtime.layers import module_precision
    from lsaq_mlx.runtime.policy import Policy
    from lsaq_mlx.runtime.precision import PrecisionController
    from lsaq_mlx.sources.load import model_tensors
    from lsaq_mlx.sources.tensors import DequantizedTensors, stored_bits

    weights = model_tensors(source)
    ceilings = stored_bits(weights, config)
    if config.get("quantization"):
        weights = DequantizedTensors(weights, config)
    policy = Policy(PlanSet(list(plans)), **(policy_options or {}))
    policy.current = len(policy.plans.plans) - 1
    return PrecisionController(stage.model, policy.plans.plans[-1], module_precision(stage.model), policy, weights,
                               None, stage.float_paths, compute_mode() == "float32", None, 0, ceilings)


def read_plan_file(path, source) -> QuantPlan | PipelinePlan:
    """``--plan``: a QuantPlan (plan -o, one process) or a PipelinePlan (plan --ranks),
    checked against ``source``."""
    from lsaq_mlx.documents import read_json
    from lsaq_mlx.planning.planner import plan_from_file

    data = read_json(path)
    if isinstance(data, dict) and data.get("type") == "PipelinePlan":
        pipeline = PipelinePlan.from_dict(data, str(path))
        plan_from_file(path, source, plan=pipeline.plan)
        return pipeline
    return plan_from_file(path, source)


def load_planned(source, plan: QuantPlan | PipelinePlan, ranks, driven: bool = False):
    """``(model, config)``: ``source`` quantized as ``plan`` says, in the compute mode;
    under ``mlx.launch`` (``ranks.size`` > 1) this rank's stage of a PipelinePlan, as a
    ``PipelineStage`` (``driven``: by rank 0, the others follow)."""
    from lsaq_mlx.backend.compute import float_copy_bytes, float_copy_paths, prepare_for_compute
    from lsaq_mlx.convert import quantized_model

    if ranks.size == 1:
        whole = plan.plan if isinstance(plan, PipelinePlan) else plan
        model, config = quantized_model(source, whole)
        return prepare_for_compute(model), config
    if not isinstance(plan, PipelinePlan) or len(plan.ranks) != ranks.size:
        have = f"a plan for {len(plan.ranks)} ranks" if isinstance(plan, PipelinePlan) else "a plan for one process"
        raise UserError(f"mlx.launch runs {ranks.size} ranks and --plan is {have}: plan with --ranks for "
                        f"{ranks.size} Macs", setting="plan")
    check_rank_memory(plan, ranks)
    model, config = quantized_model(source, rank_plan(plan, ranks.rank), keep=lambda m: keep_share(m, plan, ranks.rank))
    float_paths = float_copy_paths(model, float_copy_bytes())
    prepare_for_compute(model, float_paths=float_paths)
    vocabulary = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    stage = PipelineStage(model, plan, ranks, int(vocabulary), driven)
    stage.float_paths = float_paths
    return stage, config


def check_rank_memory(plan: PipelinePlan, ranks) -> None:
    """Refuse, on every rank and before loading, a share that this Mac's memory cannot
    hold; rank 0 names the rank and the shortfall."""
    import psutil

    from lsaq_mlx.sizes import format_size

    share = plan.share(ranks.rank)
    need = share.weight_bytes + share.kv_bytes + share.reserve_bytes
    have = psutil.virtual_memory().available
    shortfalls = ranks.gather(max(0, need - have))
    short = next((r for r, s in enumerate(shortfalls) if s > 0), None)
    if short is not None:
        raise UserError(f"rank {short} cannot hold its share of the plan: it is short by "
                        f"{format_size(shortfalls[short])} of available memory (weights, KV and reserve); "
                        "plan again with --ranks giving it less", setting="plan")
