"""``lsaq-mlx sweep SPEC.toml``: evaluate a grid of models x methods x budgets.

A spec (every key but ``grid`` optional)::

    out = "sweep-results"        # results.jsonl, results.md, *.png (default: <spec>-results beside it)
    convert = false              # true: write each cell's model folder under out/models, evaluate that

    [eval]
    ppl = "wikitext2"            # or a text file, or "none"
    max_tokens = 2048
    seq_len = 512
    kl = true                    # KL and top-1 agreement against each model's source
    tasks = ["piqa"]             # zero-shot tasks (see ``lsaq-mlx eval --help``)
    limit = 200                  # items per task
    data_dir = "../shared/data/tasks"

    [[grid]]                     # any number of grids; their cells are pooled
    models = ["default"]
    methods = ["source", "lsaq", "uniform", "lsaq-tiers", "mixed_3_6"]
    budgets = [3.0, 4.0]         # bits per weight, for the methods that take one
    low_fractions = [0.25, 0.5]  # tiers methods: this share of layers at low_bits instead
    high_bits = 8
    low_bits = 4
    group_size = 64

Each cell's result is keyed by a fingerprint of everything that determines it and
appended to ``results.jsonl`` as soon as it is known, so a rerun evaluates only what is
missing (and retries failed cells). Under ``mlx.launch`` the pending cells are dealt out
to the ranks round by round; rank 0 gathers each round's results and writes the files.
"""

import json
import os
import platform
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lsaq_mlx.cache import atomic_file, fingerprint_bytes
from lsaq_mlx.errors import UserError
from lsaq_mlx.evaluation.run import EVAL_VERSION
from lsaq_mlx.planning.methods import METHODS, RECIPES, TIER_METRICS
from lsaq_mlx.progress import progress_bar, stderr
from lsaq_mlx.backend.ranks import Ranks

SWEEP_VERSION = 1
SOURCE = "source"  # the model as loaded, unquantized: the table's reference row
EVAL_DEFAULTS = {"ppl": "wikitext2", "max_tokens": 2048, "seq_len": 512, "kl": True, "tasks": [], "limit": None,
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
    def load(cls, path: Path, out: Path | None = None) -> "SweepSpec":
        path = Path(path)
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"sweep spec not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid TOML: {e}") from None
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
        target = Path(out or path.parent / data.get("out", f"{path.stem}-results"))
        return cls(path, target, cells, EVAL_DEFAULTS | evals, bool(data.get("convert", False)))


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
            if fractions and method not in TIER_METRICS:
                fractions = []
            if not budgets + fractions:
                raise UserError(f"{where}: method '{method}' needs budgets"
                                + (" or low_fractions" if method in TIER_METRICS else ""))
            cells += budgets + fractions
    return cells


@dataclass
class SweepSummary:
    out: Path
    cells: int
    evaluated: int
    reused: int
    failed: int
    malformed_rows: int
    wall_seconds: float
    ranks: int
    rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out)}


class Sweep:
    def __init__(self, spec: SweepSpec, ranks: Ranks | None = None):
        self.spec, self.ranks = spec, ranks or Ranks()
        self.sources, self.references, self.tokenizers = {}, {}, {}

    # ---- what is there to do ----
    def source(self, model: str):
        from lsaq_mlx.sources import resolve_model

        if model not in self.sources:
            self.sources[model] = resolve_model(None if model == "default" else model)
        return self.sources[model]

    def key(self, cell: Cell) -> str:
        e = {k: v for k, v in self.spec.eval.items() if k != "data_dir"}
        return fingerprint_bytes(self.source(cell.model).fingerprint, json.dumps(asdict(cell) | {"model": None}),
                                 json.dumps(e, sort_keys=True), str(self.spec.convert), str(SWEEP_VERSION),
                                 str(EVAL_VERSION))

    def check_inputs(self) -> None:
        """Missing data files end the sweep before any cell runs, in one line."""
        from lsaq_mlx.evaluation.run import load_tasks, read_ppl_text

        if self.spec.eval["ppl"] not in (None, "none"):
            read_ppl_text(self.spec.eval["ppl"])
        elif self.spec.eval["kl"]:
            raise UserError("KL needs text: set ppl in [eval], or kl = false")
        load_tasks(self.spec.eval["tasks"], 1, self.spec.eval["data_dir"])
        for model in {c.model for c in self.spec.cells}:
            self.source(model)

    # ---- running ----
    def run(self) -> SweepSummary:
        start, spec, ranks = time.perf_counter(), self.spec, self.ranks
        self.check_inputs()
        done, malformed = ranks.from_rank0(read_results(spec.out / "results.jsonl") if ranks.rank == 0 else ({}, 0))
        keys = [self.key(c) for c in spec.cells]
        pending = [(i, c) for i, (c, k) in enumerate(zip(spec.cells, keys)) if done.get(k, {}).get("status") != "ok"]
        if ranks.rank == 0:
            spec.out.mkdir(parents=True, exist_ok=True)
            stderr.print(f"sweep: {len(spec.cells)} cells, {len(spec.cells) - len(pending)} already done, "
                         f"{len(pending)} to evaluate on {ranks.size} rank(s)"
                         + (f"; {malformed} malformed rows in results.jsonl ignored" if malformed else ""),
                         markup=False, highlight=False, soft_wrap=True)
        rows = dict(done)
        with progress_bar("sweep", len(pending)) as advance:
            for first in range(0, len(pending), ranks.size):
                mine = pending[first + ranks.rank] if first + ranks.rank < len(pending) else None
                row = self.run_cell(*mine, keys[mine[0]]) if mine else None
                for got in ranks.gather(row):
                    if got is None:
                        continue
                    rows[got["key"]] = got
                    if ranks.rank == 0:
                        append_row(spec.out / "results.jsonl", got)
                    advance()
        ordered = [rows[k] for k in keys if k in rows]
        if ranks.rank == 0:
            from lsaq_mlx.sweep.report import write_report

            known = set(keys)
            others = [r for k, r in rows.items() if k not in known]  # cells of earlier specs stay cached
            write_rows(spec.out / "results.jsonl", ordered + others)
            write_report(ordered, spec.out)
        failed = sum(r["status"] != "ok" for r in ordered)
        return SweepSummary(spec.out, len(spec.cells), len(pending), len(spec.cells) - len(pending), failed,
                            malformed, time.perf_counter() - start, ranks.size, ordered)

    def run_cell(self, index: int, cell: Cell, key: str) -> dict:
        start = time.perf_counter()
        row = {"key": key, "index": index, **asdict(cell), "rank": self.ranks.rank, "host": platform.node()}
        try:
            with progress_bar(f"{cell.label}", 3) as advance:
                row |= self._evaluate_cell(cell, advance)
            row["status"] = "ok"
        except Exception as e:  # a crashing cell is recorded; the sweep goes on
            row |= {"status": "failed", "error": str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"}
            if os.environ.get("LSAQ_MLX_DEBUG"):
                traceback.print_exc()
        row["wall_seconds"] = time.perf_counter() - start
        stderr.print(f"[rank {self.ranks.rank}] {cell.label}: " + (
            f"{row['bits_per_weight']:.3f} bpw, {_summary(row['eval'])}" if row["status"] == "ok" else
            f"FAILED: {row['error']}") + f" ({row['wall_seconds']:.0f} s)", markup=False, highlight=False, soft_wrap=True)
        return row

    def _evaluate_cell(self, cell: Cell, advance) -> dict:
        from lsaq_mlx.backend.compute import prepare_for_compute
        from lsaq_mlx.convert import convert, quantized_model
        from lsaq_mlx.evaluation.run import evaluate
        from lsaq_mlx.sources import load_model, resolve_model

        source, e = self.source(cell.model), self.spec.eval
        plan, info = None, {}
        if cell.method == SOURCE:
            from lsaq_mlx.swsc.layer import model_bits_per_weight

            net, tokenizer, _ = load_model(source, compute=False)
            info["bits_per_weight"] = model_bits_per_weight(net)
            prepare_for_compute(net)
        else:
            plan, layer_params = self._plan(cell, source)
            info = {"bits_per_weight": plan.predicted_bits_per_weight, "predicted_bytes": plan.predicted_bytes,
                    "layer_bits": layer_bits(plan, layer_params)}
        advance()
        if plan is not None and self.spec.convert:
            folder = self.spec.out / "models" / f"{cell.model}-{cell.method}-{self.key(cell)[:12]}".replace("/", "_")
            convert(source, plan, folder, force=True)
            net, tokenizer, _ = load_model(resolve_model(str(folder)))
            info["folder"] = str(folder)
        elif plan is not None:
            net, _ = quantized_model(source, plan)
            prepare_for_compute(net)
            tokenizer = self._tokenizer(cell.model)
        advance()
        ppl = None if e["ppl"] in (None, "none") else e["ppl"]
        result = evaluate(source, ppl, e["tasks"], None, e["max_tokens"], e["seq_len"], e["limit"], e["data_dir"],
                          model=(net, tokenizer), distributions=self._reference(cell.model) if e["kl"] else None)
        advance()
        return info | {"eval": result.to_dict()}

    def _plan(self, cell: Cell, source):
        from lsaq_mlx.planning.plan import quantizable_modules
        from lsaq_mlx.planning.planner import PlanRequest, make_plans

        recipe = cell.method if cell.method in RECIPES else None
        request = PlanRequest(cell.method if not recipe else "lsaq", [cell.budget] if cell.budget is not None else [],
                              recipe=recipe, high_bits=cell.high_bits, low_bits=cell.low_bits,
                              group_size=cell.group_size, low_fraction=cell.low_fraction)
        plans, model, _ = make_plans(source, request)
        params = {}
        for q in quantizable_modules(model):
            params[q.layer] = params.get(q.layer, 0) + q.params
        return plans[0], params

    def _tokenizer(self, model: str):
        from lsaq_mlx.sources import load_model

        if model not in self.tokenizers:
            self.tokenizers[model] = load_model(self.source(model), compute=False, lazy=True)[1]
        return self.tokenizers[model]

    def _reference(self, model: str):
        from lsaq_mlx.evaluation.run import ppl_tokens, reference_distributions

        if model not in self.references:
            _, tokens = ppl_tokens(self._tokenizer(model), self.spec.eval["ppl"], self.spec.eval["max_tokens"])
            # one model's distributions at a time (hundreds of MB each); cells come grouped by model
            self.references = {model: reference_distributions(self.source(model), tokens, self.spec.eval["seq_len"])}
        return self.references[model]


def layer_bits(plan, layer_params: dict) -> list[float]:
    """Bits per weight of each decoder layer's quantizable modules, scales included."""
    by_layer = plan.details["module_bytes_by_layer"]
    return [by_layer[str(i)] * 8 / layer_params[i] for i in sorted(k for k in layer_params if k is not None)]


def _summary(result: dict) -> str:
    parts = []
    if result.get("perplexity"):
        parts.append(f"perplexity {result['perplexity']['perplexity']:.3f}")
    if result.get("divergence"):
        parts.append(f"KL {result['divergence']['kl']:.4f}")
    parts += [f"{t['task']} {t['acc']:.3f}" for t in result.get("tasks", [])]
    return ", ".join(parts)


# ---- results.jsonl ----
def read_results(path: Path) -> tuple[dict, int]:
    """``({key: row}, malformed rows)``; the last row of a key wins."""
    rows, malformed = {}, 0
    if not path.is_file():
        return rows, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("key"), str) or "status" not in row:
                raise ValueError
            if row["status"] == "ok" and not isinstance(row.get("eval"), dict):
                raise ValueError
        except ValueError:
            malformed += 1
            continue
        rows[row["key"]] = row
    return rows, malformed


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
