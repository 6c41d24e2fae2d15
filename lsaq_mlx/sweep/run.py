"""``lsaq-mlx sweep SPEC.toml``: evaluate the cells of a spec (``sweep.spec``).

Each cell's result is keyed by a fingerprint of everything that determines it and
appended to ``results.jsonl`` as soon as it is known, so a rerun evaluates only what is
missing (and retries failed cells). Each model is loaded once, with its planner, for all
its cells. Under ``mlx.launch`` the pending cells are dealt out to the ranks round by
round; rank 0 gathers each round's results and writes the files.
"""

import json
import platform
from contextlib import contextmanager
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lsaq_mlx.backend.ranks import Ranks
from lsaq_mlx.cache import fingerprint_bytes
from lsaq_mlx.errors import UserError
from lsaq_mlx.evaluation.run import EVAL_VERSION
from lsaq_mlx.planning.methods import RECIPES
from lsaq_mlx.progress import progress_bar, stderr
from lsaq_mlx.sources.streaming import StreamedModel, streams
from lsaq_mlx.sweep.results import append_row, claim_results_folder, read_results, write_rows
from lsaq_mlx.sweep.spec import SOURCE, Cell, SweepSpec
from lsaq_mlx.settings import settings

SWEEP_VERSION = 1


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
    def __init__(self, spec: SweepSpec, ranks: Ranks | None = None, force: bool = False):
        """``force``: write into a results folder that a sweep did not make."""
        self.spec, self.ranks, self.force = spec, ranks or Ranks(), force
        self.sources, self.planners, self.references = {}, {}, {}

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
                                 settings().numeric_key(),
                                 str(EVAL_VERSION))

    def status(self) -> list[dict]:
        """Every cell, and whether an earlier run evaluated it."""
        done, _ = read_results(self.spec.out / "results.jsonl")
        return [{"cell": c.label, "done": done.get(self.key(c), {}).get("status") == "ok"} for c in self.spec.cells]

    def check_inputs(self) -> None:
        """Missing data files end the sweep before any cell runs, in one line that names
        the spec's key (not a flag of the CLI)."""
        from lsaq_mlx.evaluation.data_sources import load_tasks, read_ppl_text

        with self._about("[eval] ppl"):
            if self.spec.eval["ppl"] not in (None, "none"):
                read_ppl_text(self.spec.eval["ppl"], max_chars=1 << 16)
            elif self.spec.eval["kl"]:
                raise UserError("KL needs text: set ppl, or kl = false")
        with self._about("[eval] tasks"):
            load_tasks(self.spec.eval["tasks"], 1, self.spec.eval["data_dir"])
        for model in {c.model for c in self.spec.cells}:
            with self._about(f"model '{model}'"):
                self.source(model)

    @contextmanager
    def _about(self, key: str):
        try:
            yield
        except UserError as e:
            raise UserError(f"{self.spec.path} {key}: {e}") from None

    # ---- running ----
    def run(self) -> SweepSummary:
        start, spec, ranks = time.perf_counter(), self.spec, self.ranks
        self.check_inputs()
        done, malformed = ranks.from_rank0(read_results(spec.out / "results.jsonl") if ranks.rank == 0 else ({}, 0))
        keys = [self.key(c) for c in spec.cells]
        pending = [(i, c) for i, (c, k) in enumerate(zip(spec.cells, keys)) if done.get(k, {}).get("status") != "ok"]
        if ranks.rank == 0:
            claim_results_folder(spec.out, self.force)
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
            if settings().debug:
                traceback.print_exc()
        row["wall_seconds"] = time.perf_counter() - start
        stderr.print(f"[rank {self.ranks.rank}] {cell.label}: " + (
            f"{row['bits_per_weight']:.3f} bpw, {_summary(row['eval'])}" if row["status"] == "ok" else
            f"FAILED: {row['error']}") + f" ({row['wall_seconds']:.0f} s)", markup=False, highlight=False, soft_wrap=True)
        return row

    def _evaluate_cell(self, cell: Cell, advance) -> dict:
        from lsaq_mlx.backend.compute import prepare_for_compute
        from lsaq_mlx.convert import convert, quantized_model
        from lsaq_mlx.evaluation.run import EvalRequest, evaluate
        from lsaq_mlx.sources import load_model, resolve_model
        from lsaq_mlx.sources.inspection import stored_bits_per_weight

        source, e = self.source(cell.model), self.spec.eval
        planner = self._planner(cell.model)
        float_model, tokenizer = self._float_source(cell.model)
        plan, info, net = None, {}, float_model
        if cell.method == SOURCE:
            info["bits_per_weight"] = stored_bits_per_weight(source)
            if net is None:
                net = load_model(source)[0]
        else:
            plan = planner.plan(_request(cell))
            info = {"bits_per_weight": plan.predicted_bits_per_weight, "predicted_bytes": plan.predicted_bytes,
                    "layer_bits": layer_bits(plan, planner.context().modules)}
        advance()
        if plan is not None and self.spec.convert:
            folder = self.spec.out / "models" / f"{cell.model}-{cell.method}-{self.key(cell)[:12]}".replace("/", "_")
            convert(source, plan, folder, force=True, float_model=float_model)
            net, tokenizer, _ = load_model(resolve_model(str(folder)))
            info["folder"] = str(folder)
        elif plan is not None:
            net, _ = quantized_model(source, plan, float_model)
            prepare_for_compute(net)
        advance()
        request = EvalRequest(ppl=None if e["ppl"] in (None, "none") else e["ppl"], tasks=e["tasks"],
                              max_tokens=e["max_tokens"], seq_len=e["seq_len"], limit=e["limit"],
                              task_dir=e["data_dir"])
        result = evaluate(source, request, model=(net, tokenizer),
                          distributions=self._reference(cell.model) if e["kl"] else None)
        advance()
        return info | {"eval": result.to_dict()}

    def _planner(self, model: str):
        """The planner of ``model``, which holds its float weights: one model at a time
        is kept (cells come grouped by model), each loaded once for all its cells."""
        from lsaq_mlx.planning.planner import Planner

        if model not in self.planners:
            self.planners, self.references = {model: Planner(self.source(model))}, {}
        return self.planners[model]

    def _reference(self, model: str):
        """The source's next-token distributions on the eval text, once per model."""
        from lsaq_mlx.evaluation.divergence import ReferenceDistributions
        from lsaq_mlx.evaluation.run import ppl_tokens

        if model not in self.references:
            float_model, tokenizer = self._float_source(model)
            _, tokens = ppl_tokens(tokenizer, self.spec.eval["ppl"], self.spec.eval["max_tokens"])
            seq_len = self.spec.eval["seq_len"]
            self.references[model] = (
                ReferenceDistributions.compute(float_model, tokens, seq_len) if float_model is not None else
                ReferenceDistributions.compute_streamed(StreamedModel(self.source(model)), tokens, seq_len))
        return self.references[model]

    def _float_source(self, model: str):
        """``(float model, tokenizer)``: the source in memory, loaded once for all its
        cells; ``(None, tokenizer)`` for a model too large for that (it is read one
        layer at a time instead)."""
        from lsaq_mlx.sources.load import load_tokenizer

        source = self.source(model)
        return (None, load_tokenizer(source)) if streams(source) else self._planner(model).loaded()


def _request(cell: Cell):
    from lsaq_mlx.planning.planner import PlanRequest

    recipe = cell.method if cell.method in RECIPES else None
    return PlanRequest(method=cell.method if not recipe else "lsaq",
                       bits_budgets=[cell.budget] if cell.budget is not None else [], recipe=recipe,
                       high_bits=cell.high_bits, low_bits=cell.low_bits, group_size=cell.group_size,
                       low_fraction=cell.low_fraction)


def layer_bits(plan, modules) -> list[float]:
    """Bits per weight of each decoder layer's quantizable modules, scales included."""
    params: dict[int, int] = {}
    for q in modules:
        if q.layer is not None:
            params[q.layer] = params.get(q.layer, 0) + q.params
    by_layer = plan.details["module_bytes_by_layer"]
    return [by_layer[str(i)] * 8 / params[i] for i in sorted(params)]


def _summary(result: dict) -> str:
    parts = []
    if result.get("perplexity"):
        parts.append(f"perplexity {result['perplexity']['perplexity']:.3f}")
    if result.get("divergence"):
        parts.append(f"KL {result['divergence']['kl']:.4f}")
    parts += [f"{t['task']} {t['acc']:.3f}" for t in result.get("tasks", [])]
    return ", ".join(parts)
