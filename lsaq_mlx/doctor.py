"""``lsaq-mlx doctor``: what this machine will run models with."""

import importlib.metadata
import time

import mlx.core as mx

from lsaq_mlx.cache import cache_dir
from lsaq_mlx.backend.compute import describe
from lsaq_mlx.errors import UserError
from lsaq_mlx.sources.resolve import default_gguf


def gemm_gflops(n: int = 512, repeats: int = 3) -> float:
    """Achieved float32 GEMM rate on MLX's default device, in GFLOP/s."""
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def diagnose() -> dict:
    try:
        default_model = str(default_gguf())
    except UserError as e:
        default_model = str(e)
    return {
        "lsaq-mlx": _version("lsaq-mlx"),
        **describe(),
        "float32_gemm_gflops": round(gemm_gflops(), 1),
        "mlx-lm": _version("mlx-lm"),
        "default_model": default_model,
        "cache": str(cache_dir()),
    }
