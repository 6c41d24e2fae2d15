"""``QuantPlan`` and ``PlanSet``: which precision every quantizable module gets, and its bytes.

A module's choice is what mlx-lm records in ``config.json``: ``{"bits", "group_size",
"mode"}`` to quantize it (MLX affine), or ``False`` to keep it in float (float16 in the
written model); or ``{"codec": "swsc", ...}`` for the SWSC codec (``lsaq_mlx.swsc``),
which stock mlx-lm cannot open. A choice without ``codec`` is affine, so plans written
before SWSC existed read unchanged. Everything that is not quantizable (norms, biases)
stays float16.
Byte counts follow MLX's storage exactly: ``bits/8`` bytes per weight, one float16
scale and one float16 bias per group, so bits per weight is mlx-lm's own figure.
"""

import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten

from lsaq_mlx.cache import write_json_atomic
from lsaq_mlx.errors import UserError
from lsaq_mlx.swsc.codec import SWSCSettings, is_swsc

PLAN_VERSION = 1
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
FLOAT_BYTES = 2  # float16: kept modules, norms, biases, and the scales and biases of groups


@dataclass(frozen=True)
class QuantModule:
    """A module the planner may quantize: a linear layer or the token embedding."""

    path: str
    layer: int | None  # decoder layer index; None for embeddings and the LM head
    rows: int
    cols: int  # the input dimension, along which groups run
    extra_params: int  # e.g. the bias of a linear layer, stored in float

    @property
    def params(self) -> int:
        return self.rows * self.cols + self.extra_params

    def choices(self) -> list[dict | bool]:
        """Every (bits, group size) whose groups divide the input dimension, and keep."""
        quantized = [
            {"bits": b, "group_size": g, "mode": "affine"} for b in BITS for g in GROUP_SIZES if self.cols % g == 0
        ]
        return quantized + [False]

    def bytes_for(self, choice: dict | bool) -> int:
        if choice is False:
            return self.params * FLOAT_BYTES
        if is_swsc(choice):
            return SWSCSettings.from_choice(choice).nbytes(self.rows, self.cols) + self.extra_params * FLOAT_BYTES
        weights = self.rows * self.cols
        return weights * choice["bits"] // 8 + 2 * FLOAT_BYTES * weights // choice["group_size"] + (
            self.extra_params * FLOAT_BYTES
        )


def quantizable_modules(model: nn.Module) -> list[QuantModule]:
    """The modules of an mlx-lm model that MLX can quantize, in model order."""
    modules = []
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=lambda x: isinstance(x, nn.Module)):
        if not hasattr(m, "to_quantized") or "weight" not in m:
            continue
        if "scales" in m:
            raise ValueError("plan on float weights: dequantize the model first")
        rows, cols = m.weight.shape
        extra = m.bias.size if "bias" in m else 0
        modules.append(QuantModule(path, _layer_index(path), int(rows), int(cols), int(extra)))
    return modules


def _layer_index(path: str) -> int | None:
    parts = path.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts):
        index = parts[parts.index("layers") + 1]
        return int(index) if index.isdigit() else None
    return None


def fixed_params(model: nn.Module, modules: list[QuantModule]) -> int:
    """Parameters outside the quantizable modules (norms...), stored in float16."""
    return sum(v.size for _, v in tree_flatten(model.parameters())) - sum(q.params for q in modules)


@dataclass
class QuantPlan:
    model_fingerprint: str
    method: str
    budget: dict  # {"bits_per_weight": x} or {"bytes": n, ...}; {} for a recipe
    modules: dict  # module path -> {"bits", "group_size", "mode"} or False
    predicted_bytes: int
    predicted_bits_per_weight: float
    parameters: int
    scores: dict = field(default_factory=dict)  # metric, key and values of the scores used
    details: dict = field(default_factory=dict)  # method-specific: cost, bound, tiers...
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        write_json_atomic(Path(path), {"type": "QuantPlan", **self.to_dict()})

    def swsc_modules(self) -> dict:
        """``{path: SWSCSettings}`` of the modules the plan gives to the SWSC codec."""
        return {p: SWSCSettings.from_choice(c) for p, c in self.modules.items() if is_swsc(c)}

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
        for path, choice in data["modules"].items():
            if not _valid_choice(choice):
                raise UserError(f"{where}: the choice for {str(path)[:80]} is not bits/group_size, false or swsc")
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> "QuantPlan":
        return cls.from_dict(_read_plan_json(path), str(path))

    def quantization_config(self) -> dict:
        """The ``quantization`` entry of config.json: defaults plus every module (SWSC
        modules as chosen here; ``lsaq_mlx.swsc.format`` rewrites their entries)."""
        chosen = [c for c in self.modules.values() if c and not is_swsc(c)]
        common = max(chosen, key=lambda c: sum(c == d for d in chosen)) if chosen else {"bits": 4, "group_size": 64}
        return {"group_size": common["group_size"], "bits": common["bits"], "mode": "affine", **self.modules}


@dataclass
class PlanSet:
    """Plans for several budgets from the same scores, smallest first."""

    plans: list[QuantPlan]
    version: int = PLAN_VERSION

    def __post_init__(self):
        self.plans.sort(key=lambda p: p.predicted_bytes)

    def save(self, path: Path) -> None:
        write_json_atomic(Path(path), {"type": "PlanSet", "version": self.version, "plans": [p.to_dict() for p in self.plans]})

    @classmethod
    def load(cls, path: Path) -> "PlanSet":
        data = _read_plan_json(path)
        if not isinstance(data, dict) or data.get("type") != "PlanSet" or not isinstance(data.get("plans"), list):
            raise UserError(f"{path} is not a PlanSet")
        return cls([QuantPlan.from_dict(p, str(path)) for p in data["plans"]])


def _valid_choice(choice) -> bool:
    if choice is False:
        return True
    if not isinstance(choice, dict):
        return False
    if is_swsc(choice):
        try:
            SWSCSettings.from_choice(choice)
        except UserError:
            return False
        return True
    return choice.get("bits") in BITS and choice.get("group_size") in GROUP_SIZES and choice.get("mode", "affine") == "affine"


def _read_plan_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"plan file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a plan JSON file: {e}") from None
