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


class PipelineStage:
    """``model`` (one rank's stage) called as mlx-lm calls a model: logits of the last
    position (all of them with ``all_positions``), the same on every rank. Everything
    else (``layers``, ``make_cache``, ``args``) is the model's."""

    def __init__(self, model: nn.Module, pipeline: PipelinePlan, rank: int, vocabulary: int, group=None):
        self.model, self.rank, self.vocabulary, self.group = model, rank, vocabulary, group
        self.share: RankShare = pipeline.share(rank)
        self.is_last = rank == len(pipeline.ranks) - 1
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
        out = self.model(inputs, cache=cache, **kwargs)
        positions = out.shape[1] if self.all_positions else 1
        if self.sender is not None:
            sent = self.sender.sent
            _carry(cache[self.share.end_layer - 1] if cache else None, sent)
            logits = mx.depends(mx.zeros((out.shape[0], positions, self.vocabulary), mx.float32), sent)
        else:
            logits = out[:, -positions:, :].astype(mx.float32)
        return mx.distributed.all_sum(logits, group=self.group)


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
    """Ends this rank with one line (rank 0 only; the others quietly) when no token
    arrives for ``seconds``, or when mlx.launch stops it because another rank ended: a
    dead or stalled rank never leaves the others waiting."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds, self.last = rank, seconds, time.monotonic()
        self.active = False
        signal.signal(signal.SIGTERM, lambda *_: self._end("mlx.launch stopped this rank: another rank ended"))

    def start(self, grace: float = 0.0) -> "StallGuard":
        """Watch for tokens from now on, the first allowed ``grace`` seconds more (the
        other ranks may still be loading)."""
        self.active, self.last = True, time.monotonic() + grace
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self.active = False

    def _watch(self) -> None:
        while self.active:
            time.sleep(min(1.0, self.seconds / 4))
            if self.active and time.monotonic() - self.last > self.seconds:
                self._end(f"no progress for {self.seconds:g} s: another rank stalled or ended")

    def _end(self, why: str) -> None:
        if self.rank == 0:
            print(f"error: the pipeline stopped ({why})", file=sys.stderr, flush=True)
        os._exit(1)


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


def load_planned(source, plan: QuantPlan | PipelinePlan, ranks):
    """``(model, config)``: ``source`` quantized as ``plan`` says, in the compute mode;
    under ``mlx.launch`` (``ranks.size`` > 1) this rank's stage of a PipelinePlan, as a
    ``PipelineStage``."""
    from lsaq_mlx.backend.compute import prepare_for_compute
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
    prepare_for_compute(model)
    vocabulary = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return PipelineStage(model, plan, ranks.rank, int(vocabulary), ranks.group), config


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
