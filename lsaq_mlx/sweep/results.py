"""A sweep's ``results.jsonl``: one JSON row per evaluated cell, appended as each is
known (so a stopped sweep resumes), rewritten whole at the end."""

import json
import os
from pathlib import Path

from lsaq_mlx.cache import atomic_file


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
