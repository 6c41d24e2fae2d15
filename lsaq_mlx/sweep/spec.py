"""A sweep's spec: the TOML file that lists the cells of a grid of models x methods x
budgets, every value's type checked.

A spec (every key but ``grid`` optional)::

    out = "sweep-results"        # results.jsonl, results.md, *.png (default: <spec>-results beside it)
    convert = false              # true: write each cell's model folder under out/models, evaluate that

    [eval]
    ppl = "auto"                 # WikiText-2 from a data folder or the hub, else the packaged text; or wikitext2, packaged, a file, "none"
    max_tokens = 2048
    seq_len = 512
    kl = true                    # KL and top-1 agreement against each model's source
    tasks = ["piqa"]             # zero-shot tasks (see ``lsaq-mlx eval --help``)
    limit = 200                  # items per task
    data_dir = "../shared/data/tasks"  # default: $LSAQ_MLX_DATA/tasks, ../shared/data/tasks, else the hub

    [[grid]]                     # any number of grids; their cells are pooled
    models = ["default"]
    methods = ["source", "lsaq", "uniform", "lsaq-tiers", "mixed_3_6"]
    budgets = [3.0, 4.0]         # bits per weight, for the methods that take one
    low_fractions = [0.25, 0.5]  # tiers methods: this share of layers at low_bits instead
    high_bits = 8
    low_bits = 4
    group_size = 64
"""

from dataclasses import dataclass
from pathlib import Path

from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.method_table import METHODS
from lsaq_mlx.planning.methods import RECIPES
from lsaq_mlx.documents import read_toml

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of TOML
SOURCE = "source"  # the model as loaded, unquantized: the table's reference row
EVAL_DEFAULTS = {"ppl": "auto", "max_tokens": 2048, "seq_len": 512, "kl": True, "tasks": [], "limit": None,
                 "data_dir": None}
GRID_KEYS = {"models", "methods", "budgets", "low_fractions", "high_bits", "low_bits", "group_size"}
GRID_TYPES = {"models": [str], "methods": [str], "budgets": [(int, float)], "low_fractions": [(int, float)],
              "high_bits": int, "low_bits": int, "group_size": int}
EVAL_TYPES = {"ppl": str, "max_tokens": int, "seq_len": int, "kl": bool, "tasks": [str], "limit": int,
              "data_dir": str}


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    budget: float | None = None
    low_fraction: float | None = None
    high_bits: int = 8
    low_bits: int = 4
    group_size: int | None = None

    @property
    def label(self) -> str:
        at = (f" {self.budget:g} bpw" if self.budget is not None else
              f" {self.low_fraction:.0%} of layers at {self.low_bits} bits" if self.low_fraction is not None else "")
        return f"{Path(self.model).name} {self.method}{at}"


@dataclass
class SweepSpec:
    path: Path
    out: Path
    cells: list[Cell]
    eval: dict
    convert: bool = False

    @classmethod
    def load(cls, path: Path, out: Path | None = None, force: bool = False) -> "SweepSpec":
        """The spec at ``path``; its results go to ``out`` (a path the user typed), else
        to the spec's ``out``, which must lie inside the spec's folder unless ``force``."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"sweep spec not found: {path}")
        data = read_toml(path, max_bytes=MAX_SPEC_BYTES)
        unknown = set(data) - {"out", "convert", "eval", "grid"}
        if unknown:
            raise UserError(f"{path}: unknown key '{sorted(unknown)[0]}' (out, convert, eval, grid)")
        _check_types(data, {"out": str, "convert": bool, "eval": dict, "grid": list}, str(path))
        evals = data.get("eval", {})
        _check_types(evals, EVAL_TYPES, f"{path} [eval]")
        for key in ("max_tokens", "seq_len"):
            if key in evals and evals[key] < 2:
                raise UserError(f"{path} [eval]: {key} must be at least 2")
        if set(evals) - set(EVAL_DEFAULTS):
            raise UserError(f"{path}: unknown [eval] key '{sorted(set(evals) - set(EVAL_DEFAULTS))[0]}' "
                            f"({', '.join(EVAL_DEFAULTS)})")
        cells = [c for i, grid in enumerate(data.get("grid", []), 1) for c in _grid_cells(path, i, grid)]
        cells = list(dict.fromkeys(cells))
        if not cells:
            raise UserError(f"{path} describes no cells: add a [[grid]] with models and methods")
        target = Path(out) if out else _inside(path, data.get("out", f"{path.stem}-results"), force)
        return cls(path, target, cells, EVAL_DEFAULTS | evals, bool(data.get("convert", False)))


def _inside(spec: Path, out: str, force: bool) -> Path:
    """The spec's ``out`` beside it; one that leads outside the spec's folder (absolute, or
    through ``..`` or a link) needs ``force``: a spec from elsewhere must not choose where we write."""
    folder = spec.resolve().parent
    target = spec.parent / out
    if not force and not target.resolve().is_relative_to(folder):
        raise UserError(f"{spec}: out = '{out}' leads outside the spec's folder {folder}; run with --force to "
                        "write there, or give --out", setting="force")
    return target


def _check_types(table: dict, types: dict, where: str) -> None:
    """Each known key of ``table`` must hold its type (lists: of that element type)."""
    for key, kind in types.items():
        if key not in table:
            continue
        value, element = table[key], None
        if isinstance(kind, list):
            kind, element = list, kind[0]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
        if ok and element is not None:
            ok = all(isinstance(v, element) and not isinstance(v, bool) for v in value)
        if not ok:
            raise UserError(f"{where}: {key} has the wrong type ({type(value).__name__})")


def _grid_cells(path: Path, index: int, grid: dict) -> list[Cell]:
    where = f"{path} grid {index}"
    if not isinstance(grid, dict):
        raise UserError(f"{where} is not a table")
    _check_types(grid, GRID_TYPES, where)
    if set(grid) - GRID_KEYS:
        raise UserError(f"{where}: unknown key '{sorted(set(grid) - GRID_KEYS)[0]}' ({', '.join(sorted(GRID_KEYS))})")
    known = (SOURCE, *METHODS, *RECIPES)
    for method in grid.get("methods", []):
        if method not in known:
            raise UserError(f"{where}: unknown method '{method}' (one of {', '.join(known)})")
    fixed = {k: grid[k] for k in ("high_bits", "low_bits", "group_size") if k in grid}
    cells = []
    for model in grid.get("models", []):
        for method in grid.get("methods", []):
            if method == SOURCE or method in RECIPES:
                cells.append(Cell(str(model), method, **({"group_size": fixed["group_size"]} if method in RECIPES and
                                                          "group_size" in fixed else {})))
                continue
            budgets = [Cell(str(model), method, float(b), **fixed) for b in grid.get("budgets", [])]
            fractions = [Cell(str(model), method, None, float(f), **fixed) for f in grid.get("low_fractions", [])]
            tiers = METHODS[method].tier_metric is not None
            if fractions and not tiers:
                fractions = []
            if not budgets + fractions:
                raise UserError(f"{where}: method '{method}' needs budgets" + (" or low_fractions" if tiers else ""))
            cells += budgets + fractions
    return cells
