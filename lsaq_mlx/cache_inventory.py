"""What the cache holds, for which model, and removing it (``lsaq-mlx cache``).

Every entry is keyed by the content fingerprint of its model: imported GGUF files
(``models/<fp>``), unpacked packs (``packs/<fp>``), cost tables (``errors/<fp>/``),
layer stores (``layers/<fp>-mlx…``); scores files name theirs inside. Evaluation data
fetched from the hub (``data/wikitext-2-raw``, ``data/tasks/<task>``) belongs to no model
and is named by its folder. Only entries
lsaq-mlx made are listed or removed: names that are not ours are left alone.
"""

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lsaq_mlx.cache import cache_dir, is_key, is_ours
from lsaq_mlx.documents import read_json
from lsaq_mlx.errors import UserError

KINDS = {"models": "GGUF import", "packs": "unpacked pack", "errors": "cost tables", "scores": "layer scores",
         "layers": "layer store", "data": "evaluation data"}


@dataclass
class CacheEntry:
    kind: str  # one of KINDS
    path: str
    bytes: int
    modified: float  # time.time() of the newest file in it
    model_fingerprint: str | None
    model: str | None  # what the model was called when the entry was made, where known

    def to_dict(self) -> dict:
        return asdict(self)


def cache_entries() -> list[CacheEntry]:
    """Every entry of the cache, models' names filled in from the entries that know them."""
    root = cache_dir()
    entries = []
    for kind in KINDS:
        folder = root / kind
        if folder.is_dir():
            paths = sorted(folder.iterdir()) if kind != "data" else _data_folders(folder)
            entries += [e for p in paths if (e := _entry(kind, p)) is not None]
    names = {}
    for e in sorted(entries, key=lambda e: e.kind != "models"):  # an import names its file: preferred
        if e.model:
            names.setdefault(e.model_fingerprint, e.model)
    for e in entries:
        e.model = names.get(e.model_fingerprint, e.model)
    return entries


def remove(entries: list[CacheEntry]) -> int:
    """Delete ``entries``; the bytes freed."""
    freed = 0
    for e in entries:
        path = Path(e.path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        freed += e.bytes
    return freed


def older_than(entries: list[CacheEntry], seconds: float) -> list[CacheEntry]:
    cutoff = time.time() - seconds
    return [e for e in entries if e.modified < cutoff]


def _entry(kind: str, path: Path) -> CacheEntry | None:
    if path.name.startswith(".") or path.is_symlink():
        return None
    fingerprint, model = None, None
    if kind in ("models", "packs", "errors") and is_key(path.name) and path.is_dir():
        fingerprint = path.name
        model = _origin(path) if kind == "models" else None
    elif kind == "layers" and path.is_dir() and is_key(path.name.split("-")[0]):
        fingerprint = path.name.split("-")[0]
    elif kind == "scores" and path.suffix == ".json" and is_key(path.stem):
        fingerprint, model = _scores_model(path)
    elif kind == "data" and path.is_dir() and is_ours(path):
        model = path.relative_to(path.parents[1] if path.parent.name == "tasks" else path.parent).as_posix()
    else:
        return None
    size, newest = _size(path)
    return CacheEntry(kind, str(path), size, newest, fingerprint, model)


def _data_folders(root: Path) -> list[Path]:
    tasks = root / "tasks"
    return [root / "wikitext-2-raw", *(sorted(tasks.iterdir()) if tasks.is_dir() and not tasks.is_symlink() else [])]


def _size(path: Path) -> tuple[int, float]:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file() and not f.is_symlink()]
    stats = [f.stat() for f in files]
    return sum(s.st_size for s in stats), max((s.st_mtime for s in stats), default=path.stat().st_mtime)


def _origin(folder: Path) -> str | None:
    try:
        source = read_json(folder / "config.json").get("lsaq_source", {})
        return Path(source["file"]).name if isinstance(source, dict) and isinstance(source.get("file"), str) else None
    except (UserError, AttributeError):
        return None


def _scores_model(path: Path) -> tuple[str | None, str | None]:
    try:
        data = read_json(path)
    except UserError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    fp, model = data.get("model_fingerprint"), data.get("model")
    return (fp if isinstance(fp, str) and is_key(fp) else None), (model if isinstance(model, str) else None)
