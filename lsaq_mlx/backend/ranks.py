"""The processes of an ``mlx.launch`` run (ring or MPI backend), or just this one.

A sweep splits its cells across ranks and gathers their results as JSON on rank 0. The
collectives run on the CPU stream: MLX's ring and MPI backends communicate from there.
"""

import json
import os
import stat
import subprocess
from pathlib import Path

import mlx.core as mx

from lsaq_mlx.backend.blas import share_cores_with_local_ranks

_LAUNCHERS = ("mlx.launch", "mlx._distributed_utils.launch")


class Ranks:
    def __init__(self):
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.rank = self.group.rank() if self.group else 0
        self.size = self.group.size() if self.group else 1
        if self.size > 1:
            quiet_launcher()
            share_cores_with_local_ranks()

    def gather(self, data) -> list:
        """Every rank's ``data`` (anything JSON can hold), in rank order, on every rank."""
        if self.size == 1:
            return [data]
        from mlx_lm.generate import generation_stream

        mx.synchronize(generation_stream)  # a pipeline's collectives still running there go first
        payload = json.dumps(data).encode()
        lengths = mx.distributed.all_gather(mx.array([len(payload)], dtype=mx.int32), group=self.group, stream=mx.cpu)
        longest = max(lengths.tolist())
        padded = mx.array(list(payload) + [0] * (longest - len(payload)), dtype=mx.uint8)
        gathered = mx.distributed.all_gather(padded, group=self.group, stream=mx.cpu).reshape(self.size, longest)
        rows = [bytes(row[:n]) for row, n in zip(gathered.tolist(), lengths.tolist())]
        return [json.loads(r) for r in rows]

    def from_rank0(self, data):
        """Rank 0's ``data`` on every rank."""
        return self.gather(data)[0]


def quiet_launcher() -> None:
    """Stop a local ``mlx.launch`` from taking CPU time away from its ranks.

    Its relay thread per rank loops on ``select`` over the rank's stdin pipe, which is
    always writable, so it never blocks; its main loop spins the same way when its own
    stdin is at end of file. Filling this rank's stdin pipe (ranks never read it) makes
    the relay block, and nice 19 leaves the launcher only the time the ranks leave idle
    (measured by ``benchmarks/bench_launcher.py``).
    """
    parent = os.getppid()
    if not any(name in _command_line(parent) for name in _LAUNCHERS):
        return
    _fill_stdin_pipe()
    try:
        os.setpriority(os.PRIO_PROCESS, parent, 19)
    except OSError:
        pass


def _fill_stdin_pipe() -> None:
    if not stat.S_ISFIFO(os.fstat(0).st_mode) or not Path("/proc/self/fd/0").exists():
        return
    try:  # on Linux a pipe opened through /proc is writable
        fd = os.open("/proc/self/fd/0", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        while os.write(fd, bytes(1 << 16)):
            pass
    except OSError:  # full (BlockingIOError), or closed
        pass
    finally:
        os.close(fd)


def _command_line(pid: int) -> str:
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.exists():
        return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    try:  # macOS
        return subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""
