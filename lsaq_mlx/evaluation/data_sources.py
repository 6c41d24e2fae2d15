"""Where evaluation text and task files come from.

Data folders are laid out like ``../shared/data`` and searched in order:
``$LSAQ_MLX_DATA``, ``../shared/data`` (from the working folder or this checkout), then
what was fetched from the Hugging Face hub into the cache (``hub.py``). WikiText-2 and
task files missing from all of them are downloaded when ``datasets`` is installed and
the hub answers; offline, ``--ppl auto`` uses the public-domain text shipped with the
package and tasks need ``--data-dir``.
"""

from pathlib import Path

from lsaq_mlx.errors import UserError
from lsaq_mlx.evaluation import hub
from lsaq_mlx.evaluation.tasks import TASK_FOLDERS, TASKS, load_task
from lsaq_mlx.settings import settings

DATA_ENV = "LSAQ_MLX_DATA"
PACKAGED_TEXT = Path(__file__).resolve().parents[1] / "data" / "eval.txt"
PACKAGED_NAME = "packaged: State of the Union addresses 1961-1963 (public domain)"
WIKITEXT_FILE = Path("wikitext-2-raw") / "wiki.test.raw"


def data_roots() -> list[Path]:
    """The data folders that exist, in the order they are searched."""
    candidates = [settings().data, "../shared/data", Path(__file__).resolve().parents[3] / "shared" / "data",
                  hub.hub_data_root()]
    return [Path(c) for c in candidates if c and Path(c).is_dir()]


def local_wikitext() -> Path | None:
    return next((r / WIKITEXT_FILE for r in data_roots() if (r / WIKITEXT_FILE).is_file()), None)


def read_ppl_text(spec: str, max_chars: int = -1) -> tuple[str, str]:
    """``(name, text)`` for ``--ppl``: ``auto`` (WikiText-2 test from a data folder or the
    hub, else the packaged text), ``wikitext2``, ``packaged``, a text file, or a folder
    holding ``wiki.test.raw`` (or ``wikitext-2-raw/wiki.test.raw``); the text's first
    ``max_chars`` characters (-1: all of it)."""
    if spec == "packaged":
        return PACKAGED_NAME, _read_text(PACKAGED_TEXT, max_chars)
    if spec in ("auto", "wikitext2"):
        path = local_wikitext()
        if path is None:
            try:
                path = hub.fetch_wikitext()
            except hub.HubUnavailable as e:
                if spec == "auto":
                    return PACKAGED_NAME, _read_text(PACKAGED_TEXT, max_chars)
                raise UserError(f"WikiText-2 test is not in a data folder and not downloadable ({e}): set "
                                f"{DATA_ENV} to a folder with {WIKITEXT_FILE}, or give a text file or packaged",
                                setting="ppl") from None
    else:
        path = Path(spec)
        if path.is_dir():
            path = next((p for p in (path / "wiki.test.raw", path / WIKITEXT_FILE) if p.is_file()), path)
    return _wikitext_name(path), _read_text(path, max_chars)


def _wikitext_name(path: Path) -> str:
    origin = hub.source_label(path.parent, path.name) if path.name == "wiki.test.raw" else None
    return f"WikiText-2 test from {origin} ({path})" if origin else str(path)


def _read_text(path: Path, max_chars: int = -1) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(max_chars)
    except FileNotFoundError:
        raise UserError(f"perplexity text not found: {path}", setting="ppl") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise UserError(f"perplexity text {path} is not a UTF-8 text file", setting="ppl") from None
    except OSError as e:
        raise UserError(f"perplexity text {path} cannot be read: {e.strerror}", setting="ppl") from None


def load_tasks(tasks: list[str], limit: int | None, task_dir: Path | None = None) -> list:
    """The named tasks, from ``task_dir`` when given, else from the first data folder
    that has each one, else downloaded from the hub."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task '{unknown[0]}' (one of {', '.join(TASKS)})")
    if task_dir is not None and not Path(task_dir).is_dir():
        raise UserError(f"task folder not found: {task_dir}", setting="data_dir")
    return [load_task(t, Path(task_dir) if task_dir else task_root(t), limit) for t in tasks]


def task_root(task: str) -> Path:
    folder = TASK_FOLDERS[task]
    found = next((r / "tasks" for r in data_roots() if (r / "tasks" / folder).is_dir()), None)
    if found is not None:
        return found
    try:
        return hub.fetch_task_folder(folder).parent
    except hub.HubUnavailable as e:
        raise UserError(f"{task} files are not in a data folder and not downloadable ({e}): give the task folder "
                        f"(laid out like ../shared/data/tasks) or set {DATA_ENV}", setting="data_dir") from None
