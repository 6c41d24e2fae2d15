"""A model split over several Macs (``mlx.launch`` ranks): which contiguous decoder layers
each rank holds, what it needs in memory, and one plan of per-module settings for them
all (``PipelinePlan``, saved as JSON). ``planning.joint`` chooses both together.

Rank 0 holds the token embedding and the first layers, the last rank the final norm and
the LM head (a tied head is the embedding: the last rank holds it too). A rank's memory
is its weights, its layers' KV cache at ``context`` tokens (float16, as on a Mac) and a
reserve: 10 % of its memory plus the activations of one prefill chunk.
"""

import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

from mlx.utils import tree_flatten

from lsaq_mlx.cache import write_json_atomic
from lsaq_mlx.documents import read_json
from lsaq_mlx.errors import UserError
from lsaq_mlx.modules import layer_index
from lsaq_mlx.planning.budgets import KV_BYTES
from lsaq_mlx.planning.choices import FLOAT_BYTES
from lsaq_mlx.planning.plan import PLAN_VERSION, QuantModule, QuantPlan
from lsaq_mlx.sizes import parse_size

PREFILL_CHUNK = 2048  # tokens mlx-lm's generate prefills at once
ACTIVATION_BYTES = 4  # float32 on the CPU; an upper bound for float16 on a Mac
RESERVE_SHARE = 0.10
MAX_RANKS = 1024  # a plan file naming more is not one we wrote


def parse_ranks(text: str) -> list[int]:
    """``--ranks``: memory sizes (``64GB,32GB``), or an mlx.launch hostfile (a JSON list of
    hosts, or ``{"hosts": [...]}``) whose hosts carry a ``memory`` field."""
    path = Path(text).expanduser()
    if path.is_file():
        hosts = read_json(path)
        if isinstance(hosts, dict):
            hosts = hosts.get("hosts")
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, dict) for h in hosts):
            raise UserError(f"{path} is not an mlx.launch hostfile (a JSON list of hosts)", setting="ranks")
        missing = [i for i, h in enumerate(hosts) if not isinstance(h.get("memory"), (str, int)) or isinstance(h.get("memory"), bool)]
        if missing:
            raise UserError(f"{path}: host {missing[0]} has no memory field (e.g. \"memory\": \"64GB\")", setting="ranks")
        sizes = [h["memory"] if isinstance(h["memory"], int) else parse_size(h["memory"]) for h in hosts]
    else:
        sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise UserError(f"--ranks takes two or more memory sizes (64GB,32GB) or a hostfile, not {text!r}",
                        setting="ranks")
    return sizes


def is_tied(paths) -> bool:
    """Whether the LM head is the embedding: no quantizable module outside the layers but it."""
    return not any(layer_index(p) is None and "embed" not in p for p in paths)


def outside_holders(path: str, tied: bool, n_ranks: int) -> tuple[int, ...]:
    """The ranks that hold a module outside the decoder layers: the embedding on rank 0
    (and the last, when it is the head too), every other one on the last."""
    if "embed" in path:
        return (0, n_ranks - 1) if tied else (0,)
    return (n_ranks - 1,)


@dataclass(frozen=True)
class ModelLayout:
    """What the split needs of a model, from its structure alone: its quantizable
    modules, the float bytes outside them (norms) by layer, the KV cache bytes a layer
    needs per token, one prefill chunk's activations, and whether the LM head is the
    embedding."""

    modules: list[QuantModule]
    float_bytes_by_layer: dict  # {layer or None: bytes}
    kv_bytes_per_token: int  # per layer
    activation_bytes: int
    tied: bool
    n_layers: int

    @classmethod
    def of(cls, model, config: dict, modules: list[QuantModule]) -> "ModelLayout":
        quantized = {f"{q.path}.{name}" for q in modules for name in ("weight", "bias")}
        floats: dict = {}
        for name, value in tree_flatten(model.parameters()):
            if name not in quantized:
                floats[layer_index(name)] = floats.get(layer_index(name), 0) + value.size * FLOAT_BYTES
        heads = config.get("num_attention_heads") or 1
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        hidden = config["hidden_size"]
        inner = max(config.get("intermediate_size") or 0, config.get("moe_intermediate_size") or 0) or 4 * hidden
        tied = is_tied([q.path for q in modules])
        return cls(modules, floats, 2 * kv_heads * head_dim * KV_BYTES,
                   PREFILL_CHUNK * (4 * hidden + 3 * inner) * ACTIVATION_BYTES, tied,
                   1 + max(q.layer for q in modules if q.layer is not None))

    def holder(self, q: QuantModule, n_ranks: int) -> tuple[int, ...]:
        """The ranks that hold ``q`` given a split's first and last ranks: the embedding
        on rank 0 (and the last, tied), every other module outside the layers on the last."""
        if q.layer is not None:
            raise ValueError("a decoder layer's module goes where its layer goes")
        return outside_holders(q.path, self.tied, n_ranks)


@dataclass
class RankShare:
    """One rank's part of a ``PipelinePlan``."""

    rank: int
    memory_bytes: int
    first_layer: int
    end_layer: int  # one past its last
    weight_bytes: int
    kv_bytes: int
    reserve_bytes: int
    parameters: int

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)

    @property
    def free_bytes(self) -> int:
        return self.memory_bytes - self.weight_bytes - self.kv_bytes - self.reserve_bytes

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bytes * 8 / max(1, self.parameters)


def rank_needs(layout: ModelLayout, n_ranks: int, rank: int, layers: range, context: int, memory: int) -> tuple[int, int, int]:
    """``(float bytes, KV bytes, reserve bytes)`` of a rank holding ``layers``."""
    floats = sum(layout.float_bytes_by_layer.get(i, 0) for i in layers)
    if rank == n_ranks - 1:
        floats += layout.float_bytes_by_layer.get(None, 0)  # the final norm
    kv = len(layers) * layout.kv_bytes_per_token * context
    return floats, kv, int(memory * RESERVE_SHARE) + layout.activation_bytes


@dataclass
class PipelinePlan:
    """The joint plan: every module's setting (``plan``) and each rank's layers."""

    plan: QuantPlan
    ranks: list[RankShare]
    context: int
    details: dict = field(default_factory=dict)
    rank_plans: list = field(default_factory=list)  # per rank: plans of its own modules, smallest first, its share last
    version: int = PLAN_VERSION

    def rank_of(self, path: str) -> list[int]:
        """The ranks that hold the module at ``path``."""
        index, last = layer_index(path), len(self.ranks) - 1
        if index is not None:
            return [s.rank for s in self.ranks if index in s.layers]
        return list(outside_holders(path, is_tied(self.plan.modules), last + 1))

    def share(self, rank: int) -> RankShare:
        return self.ranks[rank]

    def to_dict(self) -> dict:
        return {"type": "PipelinePlan", "version": self.version, "context": self.context, "details": self.details,
                "ranks": [asdict(s) for s in self.ranks], "plan": self.plan.to_dict(),
                "rank_plans": [[p.to_dict() for p in plans] for plans in self.rank_plans]}

    def save(self, path: Path, force: bool = True) -> None:
        write_json_atomic(Path(path), json.loads(json.dumps(self.to_dict())), force, False)

    @classmethod
    def from_dict(cls, data, where: str = "the pipeline plan") -> "PipelinePlan":
        if not isinstance(data, dict) or data.get("type") != "PipelinePlan":
            raise UserError(f"{where} is not a PipelinePlan (from plan --ranks)")
        if data.get("version") != PLAN_VERSION:
            raise UserError(f"unsupported plan version {data.get('version')!r} in {where}")
        ranks = data.get("ranks")
        context = data.get("context")
        if (not isinstance(ranks, list) or not 2 <= len(ranks) <= MAX_RANKS or not isinstance(context, int)
                or isinstance(context, bool) or context < 1):
            raise UserError(f"{where} has the wrong fields for a PipelinePlan")
        shares = [_share(r, i, where) for i, r in enumerate(ranks)]
        plan = QuantPlan.from_dict(data.get("plan"), where)
        n_layers = 1 + max((layer_index(p) for p in plan.modules if layer_index(p) is not None), default=-1)
        bounds = [(s.first_layer, s.end_layer) for s in shares]
        if bounds[0][0] != 0 or bounds[-1][1] != n_layers or any(
                a >= b for a, b in bounds) or any(bounds[i][1] != bounds[i + 1][0] for i in range(len(bounds) - 1)):
            raise UserError(f"{where}: the ranks' layers do not cover the model's {n_layers} layers in order")
        details = data.get("details") if isinstance(data.get("details"), dict) else {}
        pipeline = cls(plan, shares, context, details)
        pipeline.rank_plans = _rank_plans(data.get("rank_plans", []), pipeline, where)
        return pipeline

    @classmethod
    def load(cls, path: Path) -> "PipelinePlan":
        return cls.from_dict(read_json(Path(path)), str(path))


def _rank_plans(data, pipeline: PipelinePlan, where: str) -> list:
    """Each rank's plans, checked: as many lists as ranks (or none), each plan naming
    exactly the modules its rank holds."""
    if not isinstance(data, list) or (data and len(data) != len(pipeline.ranks)):
        raise UserError(f"{where}: rank_plans must hold one list of plans per rank")
    sets = []
    for rank, plans in enumerate(data):
        held = {p for p in pipeline.plan.modules if rank in pipeline.rank_of(p)}
        if not isinstance(plans, list) or not plans:
            raise UserError(f"{where}: rank {rank} has no plans")
        loaded = [QuantPlan.from_dict(p, f"{where}, rank {rank}") for p in plans]
        if any(set(p.modules) != held for p in loaded):
            raise UserError(f"{where}: a plan of rank {rank} names other modules than the rank holds")
        sets.append(sorted(loaded, key=lambda p: p.predicted_bytes))
    return sets


def _share(data, rank: int, where: str) -> RankShare:
    fields = RankShare.__dataclass_fields__
    if not isinstance(data, dict) or set(data) != {k for k, f in fields.items() if f.default is MISSING}:
        raise UserError(f"{where}: rank {rank} has the wrong fields")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in data.values()) or data["rank"] != rank:
        raise UserError(f"{where}: rank {rank} has a value that is not a count of layers or bytes")
    return RankShare(**data)
