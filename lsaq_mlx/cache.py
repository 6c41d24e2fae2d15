"""The cache folder, content fingerprints, and writes that are atomic and clean up after
themselves.

Everything is first written to a temporary beside its target, named
``.<target>.lsaq-tmp-<host>-<pid>-<random>``, and renamed into place when complete. On any
error (Ctrl-C and SIGTERM included) the temporary is removed; one left by a killed
process is swept by the next write in that folder, or at the start of a command for the
cache, once its process is gone (or a newer process holds its PID). Folders we write
carry a marker file, and an existing folder is only ever replaced when it carries it:
nothing is deleted that lsaq-mlx did not create.
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from lsaq_mlx.errors import UserError
from lsaq_mlx.documents import read_json, read_json_object
from lsaq_mlx.settings import settings

MARKER = ".lsaq-mlx"  # in every folder lsaq-mlx writes; hidden, so pack leaves it out
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\..+\.lsaq-tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^/]*$")
_KEY = re.compile(r"^[0-9a-f]{16,64}$")

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of all caches: $LSAQ_MLX_CACHE, else ~/.cache/lsaq-mlx."""
    return settings().cache


def is_key(name: str) -> bool:
    """Whether ``name`` is a key lsaq-mlx computes (hex digits, 16 to 64)."""
    return bool(_KEY.match(name))


def cache_entry(kind: str, key: str, suffix: str = "") -> Path:
    """``<cache>/<kind>/<key><suffix>``; ``key`` must be a fingerprint we computed (hex),
    so no name read from a file can point a cache entry elsewhere."""
    if not _KEY.match(key):
        raise ValueError(f"cache key {key!r} is not a fingerprint")
    return cache_dir() / kind / f"{key}{suffix}"


def fingerprint_bytes(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def model_fingerprint(config: bytes, weight_shas: dict[str, str]) -> str:
    """The content fingerprint of a model: its config.json bytes and each top-level
    weight file's name and SHA-256 (a folder and a pack of it have the same)."""
    parts = [config]
    for name in sorted(weight_shas):
        parts += [name, weight_shas[name]]
    return fingerprint_bytes(*parts)


def stat_memo(path: Path, kind: str, compute) -> str:
    """``compute(path)`` (a hex digest of the file's content), remembered by (kind, path,
    size, mtime) so a large file is read once."""
    path = Path(path).resolve()
    st = path.stat()
    index = cache_dir() / "hashes.json"
    key = f"{kind}|{path}|{st.st_size}|{st.st_mtime_ns}"
    known = read_json_object(index)
    value = known.get(key)
    if isinstance(value, str) and _KEY.match(value):
        return value
    known[key] = compute(path)
    try:
        write_json_atomic(index, known)
    except OSError as e:  # a read-only cache only costs the next run a re-read
        log.info("cannot remember the hash of %s in %s: %s", path, index, e.strerror)
    return known[key]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, remembered by (path, size, mtime)."""

    def digest(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        return h.hexdigest()

    return stat_memo(path, "sha256", digest)


def read_cache_json(path: Path, what: str, parse=lambda data: data):
    """``parse(data)`` of the JSON cache entry at ``path``, or None when there is none.
    A damaged entry (unreadable, not JSON, or refused by ``parse`` with ValueError,
    TypeError, KeyError or UserError) is reported in one line and treated as missing, so
    the caller recomputes it."""
    if not Path(path).is_file():
        return None
    try:
        return parse(read_json(path))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UserError) as e:
        log.warning("warning: the cached %s %s is damaged (%s); recomputing it", what, path, _reason(e))
        return None


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def write_json_atomic(path: Path, data, force: bool = True, make_folders: bool = True) -> None:
    with atomic_file(path, force, make_folders) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def temp_prefix(name: str) -> str:
    return f".{name}.lsaq-tmp-{_HOST}-{os.getpid()}-"


def sweep_stale(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` that lsaq-mlx processes of this machine left
    when they were killed; return what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m["host"] != _HOST:
            continue
        try:
            if not _process_gone(int(m["pid"]), entry.stat(follow_symlinks=False).st_mtime):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue
    if removed:
        log.info("removed %d stale temporaries in %s", len(removed), folder)
    return removed


def _process_gone(pid: int, made_at: float) -> bool:
    """Whether process ``pid``, which made a file at ``made_at``, no longer runs."""
    import psutil

    if pid == os.getpid():
        return False
    try:
        return psutil.Process(pid).create_time() > made_at + 1.0  # the PID was reused
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def sweep_cache() -> None:
    """Sweep stale temporaries in every folder of the cache."""
    root = cache_dir()
    for folder in [root, *(p for p in _subfolders(root))]:
        sweep_stale(folder)


def _subfolders(root: Path):
    try:
        return [Path(e.path) for e in os.scandir(root) if e.is_dir(follow_symlinks=False) and not _TEMP.match(e.name)]
    except OSError:
        return []


def is_ours(folder: Path) -> bool:
    """Whether ``folder`` is a real folder that lsaq-mlx wrote (it has the marker, or is
    an entry of the cache: ``<cache>/<kind>/<fingerprint>``), or is empty."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    in_cache = folder.parent.parent.resolve() == cache_dir().resolve() and _KEY.match(folder.name)
    return bool(in_cache) or (folder / MARKER).is_file() or not any(folder.iterdir())


@contextmanager
def atomic_dir(target: Path, force: bool = False):
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    An existing ``target`` is replaced only with ``force`` and only when lsaq-mlx wrote
    it (``is_ours``); otherwise ``FileExistsError`` or a ``UserError``. On any exception
    the temporary folder is removed, so a half-written result never appears under the
    target name. Failed writes become ``OSError``s naming ``target`` and the cause.
    """
    target = Path(target)
    with _write_errors_name(target):
        make_parent(target)
        sweep_stale(target.parent)
        check_replaceable(target, force)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target.name)))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide a user's model from other users
        try:
            yield tmp
            (tmp / MARKER).write_text('{"written_by": "lsaq-mlx"}\n')
            with _signals_held():
                check_replaceable(target, force)
                if target.exists() or target.is_symlink():
                    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target.name)))
                    os.rename(target, old / "old")
                    os.rename(tmp, target)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(target: Path, force: bool) -> None:
    """Raise unless ``target`` is absent, or ``force`` is given and lsaq-mlx wrote it:
    ``FileExistsError`` without ``force``, a ``UserError`` for a folder not ours."""
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    if not is_ours(target):
        raise UserError(f"{target} exists and was not written by lsaq-mlx: not replacing it "
                        "(remove it yourself or choose another output)")


@contextmanager
def atomic_file(target: Path, force: bool = True, make_folders: bool = True):
    """Yield a temporary path beside ``target``; on success it replaces ``target`` (an
    existing one only with ``force``) and has the permissions ``open`` would give it.
    ``make_folders``: create the folders it goes in (not for a path the user typed:
    a missing folder there is more likely a typo).

    On any exception the temporary file is removed, so a half-written file never
    appears under the target name; failed writes name ``target`` and the cause.
    """
    target = Path(target)
    with _write_errors_name(target):
        check_output_file(target, force, make_folders)  # no file in the way of its folders, either
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target.parent)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target.name))
        os.close(fd)
        try:
            yield Path(tmp)
            if os.path.exists(tmp):
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, as if written with open()
            _check_new(target, force)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def check_output_file(target: Path, force: bool, make_folders: bool = False) -> None:
    """Before the work that makes it: whether a file the user named can be written (it
    does not exist, or ``force``; it is not a folder; no file stands where a folder of
    its path should be; its folder exists, unless ``make_folders``)."""
    target = Path(target)
    _check_new(target, force)
    if target.is_dir():
        raise UserError(f"{target} is a folder: name a file to write")
    _no_file_in_the_way(target)
    if not make_folders and not target.parent.is_dir():
        raise UserError(f"the folder {target.parent} does not exist: cannot write {target}")


def _no_file_in_the_way(target: Path) -> None:
    for folder in reversed(Path(target).parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file, not a folder: cannot write {target}")


def _check_new(target: Path, force: bool) -> None:
    if not force and (target.exists() or target.is_symlink()):
        raise UserError(f"{target} already exists", setting="force")


def make_parent(target: Path) -> None:
    """Create the folder ``target`` goes in; a file in the way is a ``UserError`` naming it."""
    _no_file_in_the_way(target)
    Path(target).parent.mkdir(parents=True, exist_ok=True)


_UMASK: list[int] = []
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask (read once: reading it means setting it)."""
    with _UMASK_LOCK:
        if not _UMASK:
            old = os.umask(0o022)
            os.umask(old)
            _UMASK.append(old)
    return _UMASK[0]


@contextmanager
def _write_errors_name(target: Path):
    """OSErrors without a file name, and MLX's write failures (RuntimeErrors that name
    neither the file nor the cause), become OSErrors naming ``target`` and the cause."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(target)) from None
        raise
    except RuntimeError as e:
        if not str(e).startswith(("[write]", "[save", "[open]")):
            raise
        code = _disk_errno(target)
        raise OSError(code, os.strerror(code) if code else str(e), str(target)) from None


def _disk_errno(target: Path) -> int:
    """Why writing under ``target`` fails: a read-only or full file system, or permission."""
    folder = Path(target)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return errno.EIO
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < 1 << 20:
        return errno.ENOSPC
    if not os.access(folder if folder.is_dir() else folder.parent, os.W_OK):
        return errno.EACCES
    return errno.EIO


@contextmanager
def _signals_held():
    """Within the block (a rename pair), SIGINT and SIGTERM wait: a target is never left
    half replaced. Only the main thread can hold them."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
