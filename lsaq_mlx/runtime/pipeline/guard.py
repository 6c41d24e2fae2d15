"""Ending a rank when the pipeline stalls or another rank ends: one line on rank 0, never a hang."""

import os
import signal
import sys
import threading
import time


# Reentrant: a SIGTERM's handler runs in the main thread, possibly while that thread is
# already ending the process; it must not wait for itself.
_ENDING = threading.RLock()
_ENDINGS = [0]  # calls that got the lock: more than one is that handler
_BEFORE_EXIT: list = []  # e.g. a full-screen UI giving the terminal back


def before_exit(callback) -> None:
    """Run ``callback`` before ``end_pipeline`` ends the process; it may return the file
    descriptor that rank 0's last line goes to (a UI that took standard error over)."""
    _BEFORE_EXIT.append(callback)


def end_pipeline(rank: int, why: str) -> None:
    """End this rank with exit status 1: the first caller in the process (a watcher
    thread, or the main thread that saw a peer's connection fail) says why on rank 0 in
    one line; any other caller waits for the exit (or, in the thread that is ending the
    process, a signal's handler, returns to let it finish)."""
    if not _ENDING.acquire(blocking=False):
        while True:
            time.sleep(60)
    _ENDINGS[0] += 1
    if _ENDINGS[0] > 1:
        return
    line_to = sys.__stderr__.fileno()
    for callback in _BEFORE_EXIT:
        try:
            line_to = callback() or line_to
        except Exception:  # the exit and its line matter more
            pass
    if rank == 0:
        sys.__stderr__.flush()
        os.write(line_to, f"error: the pipeline stopped ({why})\n".encode())
    os._exit(1)


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is MLX's distributed backend losing another rank."""
    return isinstance(error, RuntimeError) and any(backend in str(error) for backend in ("[ring]", "[jaccl]", "[mpi]"))


class StallGuard:
    """Ends this rank with one line (rank 0 only; the others quietly) when no progress
    comes for ``seconds`` while it watches, or when mlx.launch stops it because another
    rank ended: a dead or stalled rank never leaves the others waiting."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds = rank, seconds
        self.deadline: float | None = None  # progress must come by then; None: not watching
        self._watcher: threading.Thread | None = None
        # A Python handler runs only when the main thread is back in Python, and a rank
        # waiting on a dead peer is inside MLX: the signal's byte on a wakeup pipe reaches
        # a thread at once.
        signal.signal(signal.SIGTERM, lambda *_: self._stopped())
        readable, writable = os.pipe()
        os.set_blocking(writable, False)
        signal.set_wakeup_fd(writable)
        threading.Thread(target=self._wait_for_sigterm, args=(readable,), daemon=True).start()

    def start(self, grace: float = 0.0) -> "StallGuard":
        """Watch from now on, the first wait allowed ``grace`` seconds more (the other
        ranks may still be loading)."""
        self.deadline = time.monotonic() + self.seconds + grace
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()
        return self

    def beat(self) -> None:
        if self.deadline is not None:
            self.deadline = time.monotonic() + self.seconds

    def stop(self) -> None:
        self.deadline = None

    def __enter__(self):  # watch one call
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                self._end(f"no progress for {self.seconds:g} s: another rank stalled or ended")

    def _wait_for_sigterm(self, readable: int) -> None:
        while True:
            signals = os.read(readable, 64)
            if not signals or signal.SIGTERM in signals:
                self._stopped()

    def _stopped(self) -> None:
        self._end("mlx.launch stopped this rank: another rank ended")

    def _end(self, why: str) -> None:
        end_pipeline(self.rank, why)
