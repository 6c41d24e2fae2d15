"""Rank 0 in this terminal, the other ranks started the way ``mlx.launch`` starts them.

``mlx.launch`` pipes every rank's standard streams, and a full-screen UI needs the
terminal itself: so ``tui --plan P --hostfile H`` runs rank 0 here and starts ranks 1..N-1
with mlx.launch's own ``RemoteProcess`` (bash on 127.0.0.1, ssh elsewhere), joined by the
ring backend's hostfile written as ``mlx.launch --backend ring`` writes it.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from lsaq_mlx.errors import UserError
from lsaq_mlx.runtime.pipeline.guard import end_pipeline

RING_PORT = 32323  # mlx.launch's --starting-port
KEPT_LINES = 20  # of each rank's output, shown when it fails


@dataclass
class LaunchedRank:
    rank: int
    process: object  # mlx's RemoteProcess
    output: deque = field(default_factory=lambda: deque(maxlen=KEPT_LINES))


@dataclass
class LaunchedRanks:
    """The ranks after 0, running; ``stop`` waits for them (rank 0 released them) and
    ends any left."""

    ranks: list[LaunchedRank]
    ring_file: str
    stopping: bool = False

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        for r in self.ranks:
            try:
                r.process.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                r.process.terminate()
        Path(self.ring_file).unlink(missing_ok=True)

    def failures(self) -> list[str]:
        """A line for each rank that ended with an error, with its last line of output."""
        lines = []
        for r in self.ranks:
            code = r.process.process.poll()
            if code:
                last = next((line for line in reversed(r.output) if line.strip()), "")
                lines.append(f"rank {r.rank} exited with status {code}" + (f": {last.strip()}" if last else ""))
        return lines


def read_hosts(path: Path) -> list:
    """The hosts of an mlx.launch hostfile (a list of hosts, or ``{"hosts": [...]}``),
    each with an IP for the ring."""
    from mlx._distributed_utils.common import Hostfile

    try:
        hosts = Hostfile.from_file(path).hosts
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"--hostfile: {e}", setting="hostfile") from None
    if len(hosts) < 2:
        raise UserError(f"--hostfile {path}: a pipeline needs two or more hosts", setting="hostfile")
    missing = next((h.rank for h in hosts if not h.ips), None)
    if missing is not None:
        raise UserError(f"--hostfile {path}: host {missing} has no \"ips\" (the ring backend connects by IP)",
                        setting="hostfile")
    return hosts


def ring_hostfile(hosts) -> str:
    """The ring backend's hostfile: every host's IPs with consecutive ports."""
    port, ring = RING_PORT, []
    for h in hosts:
        ring.append([f"{ip}:{port + i}" for i, ip in enumerate(h.ips)])
        port += len(h.ips)
    return json.dumps(ring)


def launch_followers(path: Path, argv: list[str]) -> LaunchedRanks:
    """Make this process rank 0 of ``path``'s hosts and start the others running
    ``lsaq-mlx ARGV`` (they see ``MLX_RANK`` and follow rank 0)."""
    from mlx._distributed_utils.launch import RemoteProcess

    hosts = read_hosts(path)
    ring = ring_hostfile(hosts)
    fd, ring_file = tempfile.mkstemp(prefix="lsaq-ring-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(ring)
    os.environ.update(MLX_RANK="0", MLX_HOSTFILE=ring_file)
    command = [sys.executable, "-m", "lsaq_mlx", *argv]
    launched = LaunchedRanks([], ring_file)
    for h in hosts[1:]:
        process = RemoteProcess(h.rank, h.ssh_hostname, None, None, {"MLX_HOSTFILE": ring}, [], command)
        launched.ranks.append(LaunchedRank(h.rank, process))
    for r in launched.ranks:
        for is_stdout in (True, False):
            threading.Thread(target=_keep_output, args=(r, is_stdout), daemon=True).start()
        threading.Thread(target=_watch, args=(r, launched), daemon=True).start()
    return launched


def _keep_output(rank: LaunchedRank, is_stdout: bool) -> None:
    """Keep ``rank``'s last lines (the first of its standard output names the pid file
    that mlx.launch's ``terminate`` needs)."""
    process = rank.process
    stream = process.process.stdout if is_stdout else process.process.stderr
    for raw in iter(stream.readline, b""):
        rank.output.append(process.preprocess_output(raw.decode(errors="replace"), is_stdout))


def _watch(rank: LaunchedRank, launched: LaunchedRanks) -> None:
    """End rank 0 in one line when ``rank`` ends before rank 0 released it."""
    code = rank.process.process.wait()
    if not launched.stopping:
        end_pipeline(0, f"rank {rank.rank} " + (f"was killed by signal {-code}" if code < 0 else f"ended with status {code}"))
