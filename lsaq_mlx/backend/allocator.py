"""How much freed memory MLX's allocator keeps for reuse, and giving it back.

On the CPU backend MLX keeps at most 32 MB of freed buffers; every larger array comes
fresh from the operating system, whose kernel then maps its pages one by one as they are
first written. The cost table frees and re-takes one layer's worth of gradients for
every calibration sequence: with the default a third of an 8B conversion's CPU time was
the kernel's (686 million page faults). Metal's default cache is the memory limit, so
this only ever raises the limit.
"""

import ctypes
import sys
from contextlib import contextmanager

import mlx.core as mx


@contextmanager
def reused_buffers(nbytes: int):
    """Within the block, let the allocator keep at least ``nbytes`` of freed buffers."""
    previous = mx.set_cache_limit(nbytes)
    if previous > nbytes:
        mx.set_cache_limit(previous)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)


def return_freed_memory() -> None:
    """Give memory freed by MLX back to the operating system: MLX's buffer cache and, on
    Linux, the free pages inside glibc's heap, where blocks below 32 MB are allocated
    and which glibc only shrinks from its top (a model built one module at a time
    leaves its temporaries' pages resident otherwise)."""
    mx.clear_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
