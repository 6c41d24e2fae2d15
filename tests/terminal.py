"""A command run on a pseudo-terminal, as a user's terminal runs it: what it drew is read
as it comes (a writer blocks when nobody reads)."""

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time


class Terminal:
    def __init__(self, args: list[str], rows: int = 24, columns: int = 80):
        self.leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "lsaq_mlx", *args], stdin=follower, stdout=follower,
                                     stderr=follower, env={**os.environ, "TERM": "xterm-256color"},
                                     start_new_session=True)
        os.close(follower)
        self.seen = b""

    def read_until(self, done, timeout: float = 120) -> None:
        """Read what the command draws until ``done()`` or ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while not done() and time.monotonic() < end:
            if select.select([self.leader], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.leader, 65536)
                except OSError:  # the other side closed
                    time.sleep(0.2)

    def wait_exit(self, timeout: float = 60) -> int | None:
        """The exit status once it ended (and its last words are read), None if it did not."""
        self.read_until(lambda: self.proc.poll() is not None, timeout)
        self.read_until(lambda: False, 0.5)
        return self.proc.poll()

    def type(self, data: bytes) -> None:
        os.write(self.leader, data)

    def close(self) -> None:
        self.proc.kill()
        os.close(self.leader)
