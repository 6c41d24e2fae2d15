"""The models this machine has for lsaq-mlx (``lsaq-mlx list``): every folder ``convert``
wrote, recorded in the cache as it is written (``converted.json``: a folder made
elsewhere, moved or deleted since is shown as gone), beside the models imported into the
cache (``cache_inventory``)."""

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from lsaq_mlx.cache import cache_dir, read_cache_json, write_json_atomic

MAX_RECORDS = 1000  # the newest folders are kept
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertedModel:
    path: str
    source: str
    bits_per_weight: float
    written_bytes: int
    method: str
    quantizer: str
    written_at: float  # time.time()

    @property
    def present(self) -> bool:
        return (Path(self.path) / "config.json").is_file()

    def to_dict(self) -> dict:
        return asdict(self) | {"present": self.present}


def record_converted(report) -> None:
    """Add a written folder (a ``convert.ConvertReport``) to the index; a cache that
    cannot be written is said in one line, and the folder stays written."""
    entry = ConvertedModel(str(Path(report.out).resolve()), report.source, report.bits_per_weight,
                           report.written_bytes, report.method, report.quantizer, time.time())
    kept = [m for m in converted_models() if m.path != entry.path][-(MAX_RECORDS - 1):]
    try:
        write_json_atomic(_index_path(), [asdict(m) for m in kept + [entry]])
    except OSError as e:
        log.warning("warning: %s is not in the index of converted models (%s)", entry.path, e.strerror or e)


def converted_models() -> list[ConvertedModel]:
    """The recorded folders, oldest first; malformed records are left out."""
    data = read_cache_json(_index_path(), "index of converted models", _check_list)
    return [m for record in data or [] if (m := _record(record)) is not None]


def _index_path() -> Path:
    return cache_dir() / "converted.json"


def _check_list(data):
    if not isinstance(data, list):
        raise ValueError("it is not a list")
    return data


_TYPES = {"path": str, "source": str, "bits_per_weight": (int, float), "written_bytes": int, "method": str,
          "quantizer": str, "written_at": (int, float)}


def _record(record) -> ConvertedModel | None:
    if not isinstance(record, dict) or set(record) != {f.name for f in fields(ConvertedModel)}:
        return None
    for key, kind in _TYPES.items():
        value = record[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, str) and (len(value) > 4096 or any(ord(c) < 32 for c in value)):  # no terminal codes
            return None
    return ConvertedModel(**record)
