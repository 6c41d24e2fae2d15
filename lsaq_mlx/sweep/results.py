"""A sweep's ``results.jsonl``: one JSON row per evaluated cell, appended as each is
known (so a stopped sweep resumes), rewritten whole at the end."""

import json
import os
from pathlib import Path

from lsaq_mlx.cache import MARKER, atomic_file, is_ours, make_parent
from lsaq_mlx.documents import parse_json, read_text
from lsaq_mlx.errors import UserError

MAX_RESULTS_BYTES = 256 << 20  # a row is a few KB


def read_results(path: Path) -> tuple[dict, int]:
    """``({key: row}, malformed rows)``; the last row of a key wins."""
    rows, malformed = {}, 0
    if not path.is_file():
        return rows, 0
    text = read_text(path, max_bytes=MAX_RESULTS_BYTES, errors="replace")  # a damaged line is one malformed row
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = parse_json(line, "a row")
            _check_row(row)
        except (UserError, ValueError, TypeError, KeyError, AttributeError):
            malformed += 1
            continue
        rows[row["key"]] = row
    return rows, malformed


def _check_row(row) -> None:
    """Raise unless ``row`` has every field the report reads, of the right type."""
    if not isinstance(row, dict) or not isinstance(row.get("key"), str) or row.get("status") not in ("ok", "failed"):
        raise ValueError("no key or status")
    _typed(row, {"model": str, "method": str}, required=True)
    _typed(row, {"budget": _NUMBER, "low_fraction": _NUMBER, "low_bits": int, "high_bits": int})
    if row["status"] == "failed":
        return _typed(row, {"error": str}, required=True)
    _typed(row, {"bits_per_weight": _NUMBER, "eval": dict}, required=True)
    layer_bits = row.get("layer_bits")
    if layer_bits is not None and not (isinstance(layer_bits, list) and all(isinstance(b, _NUMBER) for b in layer_bits)):
        raise ValueError("layer_bits")
    e = row["eval"]
    if not isinstance(e.get("tasks", []), list):
        raise ValueError("tasks")
    for task in e.get("tasks", []):
        _typed(task, {"task": str, "acc": _NUMBER}, required=True)
        _typed(task, {"acc_norm": _NUMBER})
    if e.get("perplexity") is not None:
        _typed(e["perplexity"], {"perplexity": _NUMBER}, required=True)
    if e.get("divergence") is not None:
        _typed(e["divergence"], {"kl": _NUMBER, "kl_stderr": _NUMBER, "top1_agreement": _NUMBER}, required=True)


_NUMBER = (int, float)


def _typed(table, types: dict, required: bool = False) -> None:
    if not isinstance(table, dict):
        raise ValueError("not an object")
    for key, kind in types.items():
        value = table.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(key)


def claim_results_folder(out: Path, force: bool) -> None:
    """Make ``out`` the sweep's folder: a new one, or one lsaq-mlx made (its marker) or an
    empty one; a folder of the user's only with ``force``. A rerun then rewrites its
    ``results.md`` and plots, and never those of a folder the user keeps other work in."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: the sweep's results need a folder")
    if out.exists() and not is_ours(out) and not force:
        raise UserError(f"{out} holds files lsaq-mlx did not write: not writing the sweep's results there "
                        "(choose another --out, or --force)", setting="force")
    make_parent(out / MARKER)
    if not (out / MARKER).exists():
        (out / MARKER).write_text('{"written_by": "lsaq-mlx sweep"}\n')


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
