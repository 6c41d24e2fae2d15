"""One rank's stage of a model pipelined over ``mlx.launch`` ranks (a ``PipelinePlan``).

Every rank builds the whole mlx-lm model lazily and keeps only what its share holds: the
layers of other ranks become parameterless stand-ins, so nothing of theirs is read and
module paths (plans, swaps) stay the model's own, and any architecture's forward runs
unchanged. The stand-in just before a rank's first layer receives the activations from
the rank before (``mx.distributed.recv_like``); the one just after its last layer sends
them on (``mx.distributed.send``). The last rank's logits of the last position reach
every rank by ``all_sum`` (the others add zeros), so all ranks sample the same token.
A send is tied into the cache of the rank's last layer (as mlx-lm's pipelined models
do), so evaluating the cache during a prefill sends too.
"""

import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from lsaq_mlx.errors import UserError
from lsaq_mlx.modules import layer_index
from lsaq_mlx.planning.pipeline import PipelinePlan, RankShare
from lsaq_mlx.planning.plan import QuantPlan


class OtherRanksLayer(nn.Module):
    """A decoder layer another rank holds: the activations pass through. It keeps the
    layer's plain attributes (``use_sliding``, ``is_linear``...), which a model's forward
    and ``make_cache`` read."""

    def like(self, layer: nn.Module) -> "OtherRanksLayer":
        for name, value in vars(layer).items():
            if not name.startswith("_"):
                object.__setattr__(self, name, value)
        return self

    def __call__(self, x, *args, **kwargs):
        return x


class ReceiveActivations(OtherRanksLayer):
    """In place of the layer before this rank's first: the previous rank's activations."""

    def __init__(self, source: int):
        super().__init__()
        self.source = source

    def __call__(self, x, *args, **kwargs):
        return mx.distributed.recv_like(x, self.source)


class SendActivations(OtherRanksLayer):
    """In place of the layer after this rank's last: the activations go to the next rank."""

    def __init__(self, target: int):
        super().__init__()
        self.target = target
        self.sent = None

    def __call__(self, x, *args, **kwargs):
        self.sent = mx.distributed.send(x, self.target)
        return x


class EmbeddingStandIn(nn.Module):
    """The token embedding on a rank that does not hold it: zeros of the activations'
    shape, which the received activations replace (and a head that computes nothing)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.dtype = mx.float32

    def __call__(self, tokens):
        return mx.zeros((*tokens.shape, self.hidden), self.dtype)

    def as_linear(self, x):
        return x


class HeadStandIn(nn.Module):
    """The LM head (or a final module outside the layers) on a rank other than the last."""

    def __call__(self, x, *args, **kwargs):
        return x


def rank_plan(pipeline: PipelinePlan, rank: int) -> QuantPlan:
    """The modules of ``pipeline``'s plan that ``rank`` holds."""
    from dataclasses import replace

    plan = pipeline.plan
    return replace(plan, modules={p: c for p, c in plan.modules.items() if rank in pipeline.rank_of(p)})


def keep_share(model: nn.Module, pipeline: PipelinePlan, rank: int) -> None:
    """Replace what ``rank`` does not hold in ``model`` (lazily loaded: nothing replaced
    is ever read) with stand-ins, and put the transfers in the slots around its layers."""
    share = pipeline.share(rank)
    layers = _decoder_layers(model)
    for i in range(len(layers)):
        if i not in share.layers:
            stand_in = (ReceiveActivations(rank - 1) if i == share.first_layer - 1 else
                        SendActivations(rank + 1) if i == share.end_layer else OtherRanksLayer())
            layers[i] = stand_in.like(layers[i])
    hidden = _hidden_size(model)
    for path, module in list(model.named_modules()):
        if layer_index(path) is not None or not path or rank in pipeline.rank_of(path):
            continue
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            _replace(model, path, EmbeddingStandIn(hidden))
        elif isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            _replace(model, path, HeadStandIn())


def _decoder_layers(model: nn.Module) -> list:
    """The model's own list of decoder layers (``model.layers`` may be a copy: mlx-lm's
    pipelined models return a slice of it)."""
    first = next(path for path, _ in model.named_modules() if path.endswith("layers.0"))
    parent, _, name = first.removesuffix(".0").rpartition(".")
    return (dict(model.named_modules())[parent] if parent else model)[name]


def _hidden_size(model) -> int:
    args = getattr(model, "args", None)
    size = getattr(args, "hidden_size", None) or getattr(getattr(args, "text_config", None), "hidden_size", None)
    if not size:
        raise UserError("cannot find this model's hidden size to pipeline it")
    return int(size)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = dict(model.named_modules())[parent_path] if parent_path else model
    setattr(parent, name, module)


FORWARD, STOP, STATE, TICK = 1, 2, 3, 4  # what rank 0 tells the ranks that follow it


class PipelineStage:
    """``model`` (one rank's stage) called as mlx-lm calls a model: logits of the last
    position (all of them with ``all_positions``), the same on every rank. Everything
    else (``layers``, ``make_cache``, ``args``) is the model's.

    ``driven``: only rank 0 decides what to compute (a chat, a server); before each call
    it tells the other ranks, which ``follow``, the input's shape and where its cache
    stands, and every call is evaluated at once, so all ranks run the same transfers in
    the same order whatever the caller evaluates."""

    def __init__(self, model: nn.Module, pipeline: PipelinePlan, ranks, vocabulary: int, driven: bool = False):
        self.model, self.ranks, self.vocabulary, self.driven = model, ranks, vocabulary, driven
        self.rank, self.group = ranks.rank, ranks.group
        self.plan = rank_plan(pipeline, ranks.rank)
        self._last_cache = None
        self.guard: StallGuard | None = None
        self.float_paths: set = set()  # the modules with float32 copies (the CPU's compute mode)
        self.control = None  # a PrecisionController when this rank adapts to its memory
        self.adaptation: RankAdaptation | None = None  # a following rank's own policy
        self.share: RankShare = pipeline.share(self.rank)
        self.all_positions = False
        dtype = next((v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)),
                     mx.float32)
        for _, module in model.named_modules():
            if isinstance(module, EmbeddingStandIn):
                module.dtype = dtype
        self.sender = next((m for m in model.layers if isinstance(m, SendActivations)), None)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        if self.driven and self.rank == 0:
            self._announce(FORWARD, cache, inputs.shape)
        with self.guard or nullcontext():  # a driven rank 0 waits between calls as long as you type
            logits = self._forward(inputs, cache, **kwargs)
            if self.driven:
                mx.eval(logits)
        return logits

    def _forward(self, inputs, cache, **kwargs):
        out = self.model(inputs, cache=cache, **kwargs)
        positions = out.shape[1] if self.all_positions else 1
        if self.sender is not None:
            sent = self.sender.sent
            _carry(cache[self.share.end_layer - 1] if cache else None, sent)
            logits = mx.depends(mx.zeros((out.shape[0], positions, self.vocabulary), mx.float32), sent)
        else:
            logits = out[:, -positions:, :].astype(mx.float32)
        return mx.distributed.all_sum(logits, group=self.group)

    def _announce(self, op: int, cache=None, shape=(0, 0)) -> None:
        new = cache is not self._last_cache
        self._last_cache = cache
        header = [op, int(new), self._offset(cache), *shape, int(self.all_positions)]
        mx.eval(mx.distributed.all_sum(mx.array(header, dtype=mx.int32), group=self.group))

    def _offset(self, cache) -> int:
        """Tokens in the cache of this rank's first layer that counts them; -1 if none."""
        for i in self.share.layers:
            if cache and hasattr(cache[i], "offset"):
                return int(cache[i].offset)
        return -1

    def ranks_state(self) -> list[dict]:
        """Rank 0: every rank's layers, plan and memory, in rank order."""
        self._announce(STATE)
        return self.ranks.gather(self._own_state())

    def _own_state(self) -> dict:
        import psutil

        from lsaq_mlx.runtime.layers import layer_bits, module_precision

        state = {"rank": self.rank, "layers": [self.share.first_layer, self.share.end_layer],
                 "weight_bytes": self.share.weight_bytes, "bits_per_weight": self.share.bits_per_weight,
                 "plan_index": None, "plans": 1, "swaps": 0}
        if self.control is not None:
            info, policy = self.control.plan_info(), self.control.policy
            state |= {"weight_bytes": info["weight_bytes"], "bits_per_weight": info["bits_per_weight"],
                      "plan_index": policy.current if policy else None,
                      "plans": len(policy.plans.plans) if policy else 1, "swaps": self.control.swaps}
            held = self.control.layer_bits()["layers"]
        else:
            held = layer_bits(module_precision(self.model), self.plan.modules)["layers"]
        return state | {"layer_bits": held, "mlx_active_bytes": mx.get_active_memory(),
                        "mlx_peak_bytes": mx.get_peak_memory(), "rss_bytes": psutil.Process().memory_info().rss,
                        "available_bytes": psutil.virtual_memory().available}

    def tick_followers(self) -> None:
        """Rank 0, idle: the ranks that follow it check their memory (they adapt after
        every call otherwise)."""
        if self.driven and self.rank == 0:
            self._announce(TICK)

    def release_followers(self) -> None:
        """Rank 0, at the end: the ranks that follow it stop."""
        if self.driven and self.rank == 0:
            self._announce(STOP)

    def follow(self) -> None:
        """Ranks after 0: run the calls rank 0 announces, on caches that track rank 0's
        (a new cache, or one trimmed back to where rank 0's stands), until it stops."""
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        cache = None
        while True:
            header = mx.distributed.all_sum(mx.zeros((6,), mx.int32), group=self.group).tolist()
            op, new, offset, batch, length, all_positions = header
            if op == STOP:
                return
            if op == STATE:
                self.ranks.gather(self._own_state())
                continue
            if op == TICK:
                if self.adaptation:
                    self.adaptation.between_calls(idle=True)
                continue
            if op != FORWARD:
                raise UserError(f"rank {self.rank}: rank 0 sent an unknown request ({op})")
            if new or cache is None:
                cache = make_prompt_cache(self)
            elif offset >= 0 and self._offset(cache) > offset:
                trim_prompt_cache(cache, self._offset(cache) - offset)
            self.all_positions = bool(all_positions)
            self(mx.zeros((batch, length), mx.int32), cache=cache)
            if self.adaptation:
                self.adaptation.between_calls()


def _carry(cache, sent) -> None:
    """Make evaluating ``cache`` (what a prefill evaluates) evaluate ``sent`` too."""
    if getattr(cache, "keys", None) is not None:
        cache.keys = mx.depends(cache.keys, sent)
    elif isinstance(getattr(cache, "cache", None), list) and cache.cache and cache.cache[0] is not None:
        cache.cache[0] = mx.depends(cache.cache[0], sent)
    else:
        mx.eval(sent)


def bytes_between_ranks(pipeline: PipelinePlan, hidden: int, vocabulary: int, tokens: int = 1) -> int:
    """What crosses between ranks for ``tokens`` positions: each rank's activations to
    the next (float32) and the logits' all-sum (each rank sends about its size once)."""
    n = len(pipeline.ranks)
    return tokens * (n - 1) * hidden * 4 + n * vocabulary * 4


class StallGuard:
    """Ends this rank with one line (rank 0 only; the others quietly) when no progress
    comes for ``seconds`` while it watches, or when mlx.launch stops it because another
    rank ended: a dead or stalled rank never leaves the others waiting."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds = rank, seconds
        self.deadline: float | None = None  # progress must come by then; None: not watching
        self._watcher: threading.Thread | None = None
        signal.signal(signal.SIGTERM, lambda *_: self._end("mlx.launch stopped this rank: another rank ended"))

    def start(self, grace: float = 0.0) -> "StallGuard":
        """Watch from now on, the first wait allowed ``grace`` seconds more (the other
        ranks may still be loading)."""
        self.deadline = time.monotonic() + self.seconds + grace
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()
        return self

    def beat(self) -> None:
        if self.deadline is not None:
            self.deadline = time.monotonic() + self.seconds

    def stop(self) -> None:
        self.deadline = None

    def __enter__(self):  # watch one call
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                self._end(f"no progress for {self.seconds:g} s: another rank stalled or ended")

    def _end(self, why: str) -> None:
        if self.rank == 0:
            print(f"error: the pipeline stopped ({why})", file=sys.stderr, flush=True)
        os._exit(1)


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
    from lsaq_mlx.sources.model_tensors import ModelTensors
    from lsaq_mlx.sources.tensors import DequantizedTensors, source_tensors, stored_bits

    weights = ModelTensors(source_tensors(source), stage.model)
    ceilings = stored_bits(weights, config)
    if config.get("quantization"):
        weights = DequantizedTensors(weights, config)
    policy = Policy(PlanSet(list(plans)), **(policy_options or {}))
    policy.current = len(policy.plans.plans) - 1
    return PrecisionController(stage.model, policy.plans.plans[-1], module_precision(stage.model), policy, weights,
                               None, stage.float_paths, compute_mode() == "float32", None, 0, ceilings)


@dataclass
class RankAdaptation:
    """A following rank's own memory policy: between rank 0's calls it samples its
    memory (at most every ``every`` seconds) and swaps its own layers, a layer group
    per call (all of them when idle)."""

    control: object  # runtime.precision.PrecisionController
    sampler: object
    every: float = 1.0
    sampled: float = float("-inf")

    def between_calls(self, idle: bool = False) -> None:
        control = self.control
        while control.swap:
            control.step()
            if not idle:
                return
        if time.monotonic() - self.sampled < self.every:
            return
        self.sampled = time.monotonic()
        sample = self.sampler.sample()
        choice = control.policy.decide(sample)
        if choice is not None:
            control.start(control.policy.plans.plans[choice], f"rank memory: {sample.available_bytes / 1e9:.2f} GB "
                          "available")
            if idle:
                while control.swap:
                    control.step()


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
