"""``QuantPlan`` and ``PlanSet``: which precision every quantizable module gets, and its bytes.

A module's choice is a ``planning.choices`` value (``Affine``, ``Keep``, ``SWSC``); in
the plan's JSON it is what mlx-lm records in ``config.json``: ``{"bits", "group_size",
"mode"}``, ``false`` (float16), or ``{"codec": "swsc", ...}``, so plans written before
the types existed read unchanged. Everything that is not quantizable (norms, biases)
stays float16. Byte counts follow MLX's storage exactly, so bits per weight is mlx-lm's
own figure.
"""

import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten

from lsaq_mlx.cache import write_json_atomic
from lsaq_mlx.errors import UserError
from lsaq_mlx.modules import layer_index
from lsaq_mlx.planning.choices import BITS, FLOAT_BYTES, GROUP_SIZES, KEEP, SWSC, Affine, Choice, choice_from_config
from lsaq_mlx.documents import read_json

PLAN_VERSION = 1


@dataclass(frozen=True)
class QuantModule:
    """A module the planner may quantize: a linear layer, the token embedding, or the
    stacked matrices of a layer's experts (``copies`` of them: mlx-lm's ``SwitchLinear``
    stores one setting for all)."""

    path: str
    layer: int | None  # decoder layer index; None for embeddings and the LM head
    rows: int
    cols: int  # the input dimension, along which groups run
    extra_params: int  # e.g. the bias of a linear layer, stored in float
    copies: int = 1  # matrices of this shape under one setting: the experts of a SwitchLinear

    @property
    def params(self) -> int:
        return self.copies * self.rows * self.cols + self.extra_params

    def choices(self) -> list[Choice]:
        """Every (bits, group size) whose groups divide the input dimension, and keep."""
        return [Affine(b, g) for b in BITS for g in GROUP_SIZES if self.cols % g == 0] + [KEEP]

    def bytes_for(self, choice: Choice) -> int:
        return self.copies * choice.weight_bytes(self.rows, self.cols) + self.extra_params * FLOAT_BYTES


def quantizable_modules(model: nn.Module) -> list[QuantModule]:
    """The modules of an mlx-lm model that ``nn.quantize`` would quantize, in model order
    (a model built from its config alone will do: only shapes are read). A weight of more
    than two dimensions (stacked experts, DeepSeek's ``MultiLinear``) is that many
    matrices under one setting, as mlx-lm stores it."""
    modules = []
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=lambda x: isinstance(x, nn.Module)):
        if not hasattr(m, "to_quantized") or "weight" not in m:
            continue
        if "scales" in m:
            raise ValueError("plan on float weights: dequantize the model first")
        *stack, rows, cols = m.weight.shape
        extra = m.bias.size if "bias" in m else 0
        modules.append(QuantModule(path, layer_index(path), int(rows), int(cols), int(extra), math.prod(stack)))
    return modules


ROUTER_FLOOR = Affine(8, 64)  # what mlx-lm's qwen3_moe asks for its router


def model_floors(model: nn.Module) -> dict[str, Choice]:
    """The least a plan gives each module: what the model class's own ``quant_predicate``
    (mlx-lm's) asks (``KEEP`` where it keeps one in float, the setting it names where it
    names one), and for a router the predicate is silent on, ``ROUTER_FLOOR``: the
    gradient the cost table prices it by does not see an expert chosen instead of
    another, and a router's bytes are a rounding error of its layer's."""
    predicate = getattr(model, "quant_predicate", None)
    floors = {path: ROUTER_FLOOR for path in _routers(model)}
    if predicate is None:
        return floors
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=lambda x: isinstance(x, nn.Module)):
        if hasattr(m, "to_quantized") and "weight" in m:
            wanted = predicate(path, m)
            if wanted is False:
                floors[path] = KEEP
            elif isinstance(wanted, dict) and wanted.get("bits") in BITS and wanted.get("group_size") in GROUP_SIZES:
                floors[path] = Affine(wanted["bits"], wanted["group_size"])
    return floors


def _routers(model: nn.Module) -> list[str]:
    """Paths of the linear modules beside a layer's stacked experts with one output per expert."""
    from mlx_lm.models.switch_layers import SwitchLinear

    routers = []
    for path, m in model.named_modules():
        children = {k: v for k, v in m.children().items() if isinstance(v, nn.Module)}
        experts = {s.weight.shape[0] for child in children.values() for _, s in child.named_modules()
                   if isinstance(s, SwitchLinear)}
        routers += [f"{path}.{name}" if path else name for name, child in children.items()
                    if isinstance(child, nn.Linear) and child.weight.shape[0] in experts]
    return routers


def fixed_params(model: nn.Module, modules: list[QuantModule]) -> int:
    """Parameters outside the quantizable modules (norms...), stored in float16."""
    return sum(v.size for _, v in tree_flatten(model.parameters())) - sum(q.params for q in modules)


@dataclass
class QuantPlan:
    model_fingerprint: str
    method: str
    budget: dict  # {"bits_per_weight": x} or {"bytes": n, ...}; {} for a recipe
    modules: dict[str, Choice]  # module path -> its choice
    predicted_bytes: int
    predicted_bits_per_weight: float
    parameters: int
    scores: dict = field(default_factory=dict)  # metric, key and values of the scores used
    details: dict = field(default_factory=dict)  # method-specific: cost, bound, tiers...
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.loads(json.dumps(data | {"modules": {p: c.config() for p, c in self.modules.items()}}))

    def save(self, path: Path, force: bool = True, make_folders: bool = True) -> None:
        write_json_atomic(Path(path), {"type": "QuantPlan", **self.to_dict()}, force, make_folders)

    def swsc_modules(self) -> dict:
        """``{path: SWSCSettings}`` of the modules the plan gives to the SWSC codec."""
        return {p: c.settings for p, c in self.modules.items() if isinstance(c, SWSC)}

    @classmethod
    def from_dict(cls, data, where: str = "the plan") -> "QuantPlan":
        """A QuantPlan from its JSON form, every field checked."""
        if not isinstance(data, dict):
            raise UserError(f"{where} is not a QuantPlan")
        data = {k: v for k, v in data.items() if k != "type"}
        if data.get("version") != PLAN_VERSION:
            raise UserError(f"unsupported plan version {data.get('version')!r} in {where} (this lsaq-mlx reads {PLAN_VERSION})")
        fields = cls.__dataclass_fields__
        required = {k for k, f in fields.items() if f.default is MISSING and f.default_factory is MISSING}
        if set(data) - set(fields) or not required <= set(data):
            raise UserError(f"{where} has the wrong fields for a QuantPlan")
        types = {"model_fingerprint": str, "method": str, "budget": dict, "modules": dict, "predicted_bytes": int,
                 "predicted_bits_per_weight": (int, float), "parameters": int, "scores": dict, "details": dict}
        for key, kind in types.items():
            if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
                raise UserError(f"{where}: {key} has the wrong type")
        modules = {path: choice_from_config(choice, f"{where}, {str(path)[:80]}") for path, choice in data["modules"].items()}
        return cls(**data | {"modules": modules})

    @classmethod
    def load(cls, path: Path) -> "QuantPlan":
        return cls.from_dict(_read_plan_json(path), str(path))

    def quantization_config(self) -> dict:
        """The ``quantization`` entry of config.json: defaults plus every module (SWSC
        modules as chosen here; ``lsaq_mlx.swsc.format`` rewrites their entries)."""
        chosen = [c for c in self.modules.values() if isinstance(c, Affine)]
        common = max(chosen, key=lambda c: sum(c == d for d in chosen)) if chosen else Affine(4, 64)
        entries = {p: c.config() for p, c in self.modules.items()}
        return {"group_size": common.group_size, "bits": common.bits, "mode": "affine", **entries}


@dataclass
class PlanSet:
    """Plans for several budgets from the same scores, smallest first."""

    plans: list[QuantPlan]
    version: int = PLAN_VERSION

    def __post_init__(self):
        self.plans.sort(key=lambda p: p.predicted_bytes)

    def to_dict(self) -> dict:
        return {"type": "PlanSet", "version": self.version, "plans": [p.to_dict() for p in self.plans]}

    def save(self, path: Path, force: bool = True, make_folders: bool = True) -> None:
        write_json_atomic(Path(path), self.to_dict(), force, make_folders)

    @classmethod
    def load(cls, path: Path) -> "PlanSet":
        data = _read_plan_json(path)
        if not isinstance(data, dict) or data.get("type") != "PlanSet" or not isinstance(data.get("plans"), list):
            raise UserError(f"{path} is not a PlanSet")
        return cls([QuantPlan.from_dict(p, str(path)) for p in data["plans"]])


def _read_plan_json(path: Path) -> dict:
    if not Path(path).exists():
        raise UserError(f"plan file not found: {path}")
    return read_json(path, f"plan file {path}")
