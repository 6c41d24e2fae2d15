"""The settings the environment gives (``LSAQ_MLX_*``), read in this one place.

The CLI reads them once when a command starts (``use_settings``) and every stage asks
``settings()``; library code called outside the CLI gets the environment as it is then.
The settings that change numbers (how a model computes, whether it streams) are part of
the cache keys of what is computed with them (``numeric_key``).
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lsaq_mlx.errors import UserError

COMPUTE_MODES = ("float32", "quantized")
STREAM_MODES = ("auto", "always", "never")
DEFAULT_FLOAT_COPY = "256MB"


@dataclass(frozen=True)
class Settings:
    cache: Path  # LSAQ_MLX_CACHE: the root of every cache (default ~/.cache/lsaq-mlx)
    compute: str | None  # LSAQ_MLX_COMPUTE: float32 | quantized; None: by backend (float32 on the CPU)
    float_copy: str  # LSAQ_MLX_FLOAT_COPY: float32 weights a model may hold on the CPU ("2GB", "all")
    stream: str  # LSAQ_MLX_STREAM: read models a layer at a time: auto | always | never
    data: str | None  # LSAQ_MLX_DATA: a folder of evaluation data (wikitext-2-raw/, tasks/)
    blas: str | None  # LSAQ_MLX_BLAS: the BLAS library to preload on Linux, or "reference"
    debug: bool  # LSAQ_MLX_DEBUG: tracebacks instead of one-line errors
    hub_offline: bool  # HF_HUB_OFFLINE: never try the Hugging Face hub
    quantizer: str = "auto"  # LSAQ_MLX_QUANTIZER: what convert uses without --quantizer

    @classmethod
    def from_environment(cls, environ=None) -> "Settings":
        env = os.environ if environ is None else environ
        compute = env.get("LSAQ_MLX_COMPUTE") or None
        if compute is not None and compute not in COMPUTE_MODES:
            raise UserError(f"LSAQ_MLX_COMPUTE is '{compute}': one of {', '.join(COMPUTE_MODES)}")
        stream = env.get("LSAQ_MLX_STREAM") or "auto"
        if stream not in STREAM_MODES:
            raise UserError(f"LSAQ_MLX_STREAM is '{stream}': one of {', '.join(STREAM_MODES)}")
        return cls(cache=Path(env.get("LSAQ_MLX_CACHE") or Path.home() / ".cache" / "lsaq-mlx").expanduser(),
                   compute=compute, float_copy=env.get("LSAQ_MLX_FLOAT_COPY") or DEFAULT_FLOAT_COPY, stream=stream,
                   data=env.get("LSAQ_MLX_DATA") or None, blas=env.get("LSAQ_MLX_BLAS") or None,
                   debug=bool(env.get("LSAQ_MLX_DEBUG")),
                   hub_offline=env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"),
                   quantizer=env.get("LSAQ_MLX_QUANTIZER") or "auto")

    def numeric_key(self) -> str:
        """The settings that change computed numbers, for cache keys."""
        return f"compute={self.compute or 'auto'};stream={self.stream}"


_active: list[Settings] = []


def settings() -> Settings:
    """The settings of the command running (read when it started), else the environment's now."""
    return _active[-1] if _active else Settings.from_environment()


@contextmanager
def use_settings(chosen: Settings):
    """Within the block, ``settings()`` is ``chosen``."""
    _active.append(chosen)
    try:
        yield chosen
    finally:
        _active.pop()
