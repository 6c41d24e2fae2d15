"""Finding and preloading an optimized BLAS for MLX's CPU backend on Linux.

MLX's Linux CPU wheel links the reference BLAS (1.3 s for a float32 1024^3 GEMM
on our 2-core machines, 0.017 s with OpenBLAS). The dynamic loader only honours
LD_PRELOAD at process start, so we re-execute the same command once with it set.
This module imports no MLX so that the re-exec happens before any heavy import.
"""

import ctypes.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from lsaq_mlx.documents import read_json
from lsaq_mlx.errors import UserError
from lsaq_mlx.settings import settings

_REEXEC_MARK = "LSAQ_MLX_BLAS_REEXEC"
_OPENBLAS_NAMES = ("libopenblas.so.0", "libopenblasp.so.0")
_OPENBLAS_DIRS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
)


def find_fast_blas() -> str | None:
    """Path of an optimized BLAS that can stand in for MLX's reference one."""
    wanted = settings().blas
    if wanted:
        return None if wanted == "reference" else wanted
    for folder in _OPENBLAS_DIRS:
        for name in _OPENBLAS_NAMES:
            if Path(folder, name).exists():
                return str(Path(folder, name))
    found = ctypes.util.find_library("openblas")
    return found if found and Path(found).is_absolute() else None


def reexec_with_fast_blas(before_exec=None) -> None:
    """On Linux, restart this same command with an optimized BLAS preloaded.

    A no-op on macOS (MLX uses Accelerate), when already done, when the user set
    LSAQ_MLX_BLAS=reference, or when no such library is installed. ``before_exec``
    runs just before the restart (pytest uses it to give back stdout and stderr).
    """
    if not sys.platform.startswith("linux") or os.environ.get(_REEXEC_MARK):
        return
    lib = find_fast_blas()
    if lib is None or lib in os.environ.get("LD_PRELOAD", ""):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD")) if p)
    env[_REEXEC_MARK] = lib
    if before_exec is not None:
        before_exec()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def share_cores_with_local_ranks() -> None:
    """Give this process's OpenBLAS its share of the cores when several ranks run here
    (each would otherwise start a thread per core)."""
    library = preloaded_openblas()
    if local_rank_count() > 1 and library is not None and "OPENBLAS_NUM_THREADS" not in os.environ:
        library.openblas_set_num_threads(_cores_per_local_rank())


def preloaded_openblas():
    """The OpenBLAS this process preloaded (see ``reexec_with_fast_blas``), as a ctypes library."""
    for lib in os.environ.get("LD_PRELOAD", "").split(":"):
        if "openblas" in Path(lib).name.lower():
            try:
                library = ctypes.CDLL(lib)
                return library if hasattr(library, "openblas_set_num_threads") else None
            except OSError:
                return None
    return None


def cores_for_this_process() -> int:
    """Cores this process may keep busy: its OpenBLAS thread count when one is
    preloaded (set by OPENBLAS_NUM_THREADS or shared with local ranks), else its
    share of the machine's cores."""
    library = preloaded_openblas()
    if library is not None:
        return max(1, library.openblas_get_num_threads())
    return _cores_per_local_rank()


def _cores_per_local_rank() -> int:
    return max(1, (os.cpu_count() or 1) // local_rank_count())


@contextmanager
def single_threaded_blas():
    """Within the block, a preloaded OpenBLAS runs each GEMM on the calling thread only."""
    library = preloaded_openblas()
    if library is None:
        yield
        return
    threads = library.openblas_get_num_threads()
    library.openblas_set_num_threads(1)
    try:
        yield
    finally:
        library.openblas_set_num_threads(threads)


def local_rank_count() -> int:
    """How many ranks of an ``mlx.launch`` (ring hostfile) or MPI run share this machine; 1 outside one."""
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    hostfile, rank = os.environ.get("MLX_HOSTFILE"), os.environ.get("MLX_RANK", "")
    if not hostfile or not rank.isdigit():
        return 1
    try:  # one list of "ip:port" per rank
        hosts = [entry[0].rsplit(":", 1)[0] for entry in read_json(hostfile, max_bytes=1 << 20)]
        return hosts.count(hosts[int(rank)])
    except (UserError, ValueError, TypeError, IndexError, KeyError, AttributeError):
        return 1


def active_blas() -> str:
    """Which BLAS serves MLX's CPU matmuls in this process (numpy's own bundled
    OpenBLAS may be mapped too, so only a preloaded library counts)."""
    if sys.platform == "darwin":
        return "Accelerate"
    maps = Path("/proc/self/maps")
    mapped = set(maps.read_text().split()) if maps.exists() else set()
    for lib in os.environ.get("LD_PRELOAD", "").split(":"):
        if lib and os.path.realpath(lib) in mapped:
            return f"{_blas_name(lib)} ({lib})"
    return "reference BLAS bundled with mlx (slow: install OpenBLAS, e.g. apt-get install libopenblas0-pthread)"


def _blas_name(lib: str) -> str:
    name = Path(lib).name.lower()
    return "OpenBLAS" if "openblas" in name else "BLIS" if "blis" in name else "MKL" if "mkl" in name else Path(lib).name
