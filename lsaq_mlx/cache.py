"""The cache folder, content fingerprints and atomic writes of files and folders."""

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "LSAQ_MLX_CACHE"


def cache_dir() -> Path:
    """Root of all caches: $LSAQ_MLX_CACHE, else ~/.cache/lsaq-mlx."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lsaq-mlx"
    return Path(root).expanduser()


def fingerprint_bytes(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, remembered by (path, size, mtime) so large
    files are hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    index = cache_dir() / "hashes.json"
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    known = _read_json(index)
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    known[key] = h.hexdigest()
    write_json_atomic(index, known)
    return known[key]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


@contextmanager
def atomic_dir(target: Path, force: bool = False):
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    On any exception (Ctrl-C included) the temporary folder is removed, so a
    half-written result never appears under the target name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.exists():
            if not force:
                raise FileExistsError(target)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: Path):
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    On any exception the temporary file is removed, so a half-written file never
    appears under the target name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
