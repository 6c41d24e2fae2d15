"""The cost table: the cost model's error of every module at every candidate choice,
computed once per model and calibration text and cached as JSON, keyed by choice
(``{path: {choice.key: error}}``). Planning any budget is then a cheap step over it.

It is computed in one streamed pass (``planning.fisher``): each module's candidates are
priced while its layer is in memory, one choice at a time on row chunks, so memory is
one layer's worth whatever the model's size. SWSC candidates (k-means, SVD) are priced
and the microscaled formats (``--codecs``) only when a plan may use them, in a table of
their own, keyed by the options.

A converted folder carries the table its plan was made by (``lsaq_costs.json``, priced
on the float source): planning on the folder later (pipeline ranks, live plans) adopts
it instead of a Fisher pass over the stored weights.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lsaq_mlx.cache import cache_entry, fingerprint_bytes, read_cache_json, write_json_atomic
from lsaq_mlx.planning.cost import CostTable, module_errors
from lsaq_mlx.planning.fisher import streamed_fisher
from lsaq_mlx.progress import progress_bar
from lsaq_mlx.scoring.calibration import CalibrationText, token_sequences

COST_VERSION = 4  # part of every table's key: bump when the cost model changes (4: computed layer by layer)
EXTRA_COST_VERSION = 4  # 4: microscaled formats beside SWSC
FISHER_TOKENS = 2048  # calibration tokens for the cost model's Fisher information
FISHER_SEQ_LEN = 256
CARRIED_FILE = "lsaq_costs.json"


def table_key(fingerprint: str, calib: CalibrationText) -> str:
    return fingerprint_bytes(fingerprint, calib.fingerprint, str(FISHER_TOKENS), str(COST_VERSION))


def cached_table(fingerprint: str, calib: CalibrationText, ctx) -> CostTable | None:
    """The cached errors of ``ctx``'s candidates, or None when any part is missing or damaged."""
    table = read_cache_json(_path(fingerprint, calib), "cost table", lambda d: _check(d, _keys(ctx.modules)))
    if table is None:
        return None
    if not ctx.extra_options:
        return CostTable(table)
    extra = read_cache_json(_extra_path(fingerprint, calib, ctx), "cost table of the other codecs",
                            lambda d: _check(d, {p: {c.key for c in cs} for p, cs in ctx.extra_options.items()}))
    return None if extra is None else _merge(table, extra)


def compute_table(fingerprint: str, calib: CalibrationText, ctx, streamed, tokenizer) -> CostTable:
    """Compute (what is not cached of) the errors of ``ctx``'s candidates on ``streamed``
    (the float source, a ``StreamedModel``), and cache them."""
    path, extra_path = _path(fingerprint, calib), _extra_path(fingerprint, calib, ctx)
    table = read_cache_json(path, "cost table", lambda d: _check(d, _keys(ctx.modules)))
    extra_keys = {p: {c.key for c in cs} for p, cs in ctx.extra_options.items()}
    extra = {} if not ctx.extra_options else read_cache_json(extra_path, "cost table of the other codecs",
                                                             lambda d: _check(d, extra_keys))
    if table is None or extra is None:
        wanted = {q.path: (q.choices() if table is None else []) + (ctx.extra_options.get(q.path, []) if extra is None else [])
                  for q in ctx.modules}
        errors = {path: dict.fromkeys((c.key for c in choices), 0.0) for path, choices in wanted.items()}

        def price(path, weight, fisher):  # a module (or a row block of it) while it is in memory
            for key, err in module_errors(weight, fisher, wanted[path]).items():
                errors[path][key] += err

        sequences = token_sequences(tokenizer, calib, FISHER_TOKENS, FISHER_SEQ_LEN)
        with progress_bar("cost table (layers forward, then back)", 2 * len(streamed.layers) + 2) as advance:
            streamed_fisher(streamed, sequences, ctx.modules, price, advance)
        if table is None:
            table = {q.path: {c.key: errors[q.path][c.key] for c in q.choices()} for q in ctx.modules}
            write_json_atomic(path, table)
        if extra is None:
            extra = {p: {c.key: errors[p][c.key] for c in cs} for p, cs in ctx.extra_options.items()}
            write_json_atomic(extra_path, extra)
    return _merge(table, extra)


@dataclass
class CarriedCosts:
    """The cost table a plan was made by, and the calibration text it was priced on."""

    calibration: CalibrationText
    table: CostTable

    def save(self, folder: Path) -> None:
        write_json_atomic(Path(folder) / CARRIED_FILE, {
            "cost_version": COST_VERSION, "fisher_tokens": FISHER_TOKENS,
            "calibration": self.calibration.fingerprint, "errors": self.table.errors}, make_folders=False)


def adopt_carried_table(source, calib: CalibrationText, ctx) -> bool:
    """Cache, as ``source``'s own, the table its folder carries, where it was priced on
    ``calib`` by this cost model and prices every candidate of ``ctx``."""
    path = Path(source.path) / CARRIED_FILE
    if source.kind not in ("folder", "hub") or not path.is_file():
        return False
    keys = _keys(ctx.modules)
    table = read_cache_json(path, "cost table the folder carries", lambda d: _carried(d, calib, keys))
    if not table:
        return False
    write_json_atomic(_path(source.fingerprint, calib), table)
    return True


def _carried(data, calib: CalibrationText, keys: dict) -> dict | None:
    """The errors of ``keys`` that ``data`` (a carried table) holds, checked; None when it
    was priced otherwise or lacks one."""
    if not isinstance(data, dict) or not isinstance(data.get("errors"), dict):
        raise ValueError("it holds no errors")
    if (data.get("cost_version"), data.get("fisher_tokens"), data.get("calibration")) != (
            COST_VERSION, FISHER_TOKENS, calib.fingerprint):
        return None
    errors = data["errors"]
    if not all(isinstance(errors.get(p), dict) and ks <= errors[p].keys() for p, ks in keys.items()):
        return None
    return _check({p: {k: errors[p][k] for k in ks} for p, ks in keys.items()}, keys)


def _merge(table: dict, extra: dict) -> CostTable:
    return CostTable({p: errs | extra.get(p, {}) for p, errs in table.items()})


def _keys(modules) -> dict:
    return {q.path: {c.key for c in q.choices()} for q in modules}


def _path(fingerprint: str, calib: CalibrationText):
    """``errors/<model fingerprint>/<key>.json``: a model's tables in one folder (``cache rm``)."""
    return cache_entry("errors", fingerprint) / f"{table_key(fingerprint, calib)}.json"


def _extra_path(fingerprint: str, calib: CalibrationText, ctx):
    options = {p: [c.key for c in choices] for p, choices in ctx.extra_options.items()}
    key = fingerprint_bytes(table_key(fingerprint, calib), json.dumps(options, sort_keys=True), str(EXTRA_COST_VERSION))
    return cache_entry("errors", fingerprint) / f"extra-{key}.json"


def _check(data, keys: dict) -> dict:
    """``data`` if it holds, for every module, a finite error for each of its choices."""
    if not isinstance(data, dict) or set(data) != set(keys):
        raise ValueError("its modules are not this model's")
    for path, errs in data.items():
        if (not isinstance(errs, dict) or set(errs) != keys[path]
                or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in errs.values())):
            raise ValueError(f"the errors of {path} are malformed")
    return data
