"""Memory samplers: what the machine has free, how pressed it is, and what MLX holds.

``SystemSampler`` reads the platform's own signals (Linux: /proc/meminfo's MemAvailable
and /proc/pressure/memory; macOS: psutil's available memory and the kernel's memory
pressure level), plus swap, this process's resident memory and MLX's active, peak and
cache memory. ``ScriptedSampler`` replays a trace file, for tests and demos: one sample
per line, ``available`` in bytes or with a unit (``1.5GB``), optionally
``available,pressure``; swap and the process's own memory stay real.
"""

import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import psutil

from lsaq_mlx.documents import read_text
from lsaq_mlx.errors import UserError
from lsaq_mlx.sizes import parse_size


@dataclass
class MemorySample:
    available_bytes: int
    total_bytes: int
    pressure: str  # "normal" | "warn" | "critical" | "unknown"
    mlx_active_bytes: int
    mlx_peak_bytes: int
    mlx_cache_bytes: int
    time: float
    rss_bytes: int = 0  # this process's resident memory
    swap_used_bytes: int = 0
    swap_total_bytes: int = 0
    psi_some_avg10: float | None = None  # Linux: % of the last 10 s some task stalled on memory

    def to_dict(self) -> dict:
        return asdict(self)


def _mlx_memory() -> tuple[int, int, int]:
    return mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory()


def _process_memory() -> dict:
    swap = psutil.swap_memory()
    return {"rss_bytes": psutil.Process().memory_info().rss, "swap_used_bytes": swap.used,
            "swap_total_bytes": swap.total}


class SystemSampler:
    def sample(self) -> MemorySample:
        vm = psutil.virtual_memory()
        avg10 = self.psi_avg10()
        return MemorySample(vm.available, vm.total, self.pressure(avg10), *_mlx_memory(), time.monotonic(),
                            psi_some_avg10=avg10, **_process_memory())

    @staticmethod
    def psi_avg10() -> float | None:
        """Linux pressure stall information: the 'some' share of the last 10 seconds."""
        try:
            some = Path("/proc/pressure/memory").read_text().splitlines()[0].split()
            return float(some[1].split("=")[1])
        except (OSError, IndexError, ValueError):
            return None

    @classmethod
    def pressure(cls, avg10: float | None = None) -> str:
        if sys.platform == "darwin":
            try:
                out = subprocess.run(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"],
                                     capture_output=True, text=True, timeout=2).stdout.strip()
                return {"1": "normal", "2": "warn", "4": "critical"}.get(out, "unknown")
            except (OSError, subprocess.SubprocessError):
                return "unknown"
        avg10 = cls.psi_avg10() if avg10 is None else avg10
        if avg10 is None:
            return "unknown"
        return "critical" if avg10 >= 10 else "warn" if avg10 >= 1 else "normal"


MAX_TRACE_BYTES = 16 << 20
PRESSURES = ("normal", "warn", "critical", "unknown")


class ScriptedSampler:
    """Replays a memory trace; after its last line the last sample repeats."""

    def __init__(self, path: Path, total_bytes: int | None = None, step: float = 1.0):
        self.samples, self.step = [], step  # each sample is ``step`` seconds after the last
        lines = read_text(path, f"the memory trace {path}", MAX_TRACE_BYTES).splitlines()
        for number, line in enumerate(lines, 1):
            line = line.split("#")[0].strip()
            if not line:
                continue
            available, _, pressure = line.partition(",")
            try:
                pressure = pressure.strip() or "normal"
                if pressure not in PRESSURES:
                    raise UserError(f"pressure is one of {', '.join(PRESSURES)}")
                self.samples.append((parse_size(available), pressure))
            except UserError:
                raise UserError(f"{path}:{number}: expected 'available[,pressure]', got '{line}'") from None
        if not self.samples:
            raise UserError(f"the memory trace {path} has no samples")
        self.total = total_bytes or psutil.virtual_memory().total
        self.position = 0

    def sample(self) -> MemorySample:
        available, pressure = self.samples[min(self.position, len(self.samples) - 1)]
        self.position += 1
        return MemorySample(available, self.total, pressure, *_mlx_memory(), self.position * self.step,
                            **_process_memory())
