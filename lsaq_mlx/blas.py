"""Finding and preloading an optimized BLAS for MLX's CPU backend on Linux.

MLX's Linux CPU wheel links the reference BLAS (1.3 s for a float32 1024^3 GEMM
on our 2-core machines, 0.017 s with OpenBLAS). The dynamic loader only honours
LD_PRELOAD at process start, so we re-execute the same command once with it set.
This module imports no MLX so that the re-exec happens before any heavy import.
"""

import ctypes.util
import os
import sys
from pathlib import Path

BLAS_ENV = "LSAQ_MLX_BLAS"  # a library path, or "reference" to keep MLX's own
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
    wanted = os.environ.get(BLAS_ENV)
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
