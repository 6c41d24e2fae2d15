"""Errors a user can cause: reported as one line and exit status 1, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (missing file, bad budget, unsupported model...).

    The message speaks of the setting (``bits-per-weight budget 40``), not of how it was
    given; ``setting`` names it (``"bits_budget"``) so the CLI can add its flag and a
    sweep its spec key. The CLI prints ``error: <message>`` and exits with status 1.
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwinds like Ctrl-C, so temporaries are removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def os_error_line(e: OSError) -> str:
    """``PATH: cause`` for an OSError (read-only or full disk, permission, name too long)."""
    cause = e.strerror or type(e).__name__
    if e.filename is None:
        return cause
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    return f"{where}: {cause}"
