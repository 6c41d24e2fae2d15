"""The ``lsaq-mlx`` command line: it parses, calls one library function, renders.

Every command that produces data takes ``--json`` (one JSON document on stdout;
progress and logs on stderr). Exit status: 0 success, 1 user error (one line on
stderr), 2 usage error, 128+N after signal N. Set LSAQ_MLX_DEBUG=1 to see full tracebacks.
"""

import os
import signal
import sys

from lsaq_mlx.backend.blas import reexec_with_fast_blas
from lsaq_mlx.cache import sweep_cache
from lsaq_mlx.cli import evaluate, models, plans, runtime, scores, storage  # noqa: F401 - the commands register
from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import FLAGS
from lsaq_mlx.cli.output import err
from lsaq_mlx.errors import Terminated, UserError, os_error_line

__all__ = ["app", "main"]


def _terminate(signum, frame):
    raise Terminated(signum)


def error_line(e: UserError) -> str:
    """The message, and the flag of the setting it is about."""
    flag = FLAGS.get(e.setting)
    return f"error: {e} ({flag})" if flag else f"error: {e}"


def main() -> None:
    reexec_with_fast_blas()
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _terminate)
    debug = bool(os.environ.get("LSAQ_MLX_DEBUG"))
    try:
        sweep_cache()
        app()
    except UserError as e:
        if debug:
            raise
        _exit(1, error_line(e))
    except OSError as e:
        if debug:
            raise
        _exit(1, f"error: {os_error_line(e)}")
    except KeyboardInterrupt:
        _exit(130, "interrupted")
    except Terminated as e:
        _exit(128 + e.signum, f"stopped by {signal.Signals(e.signum).name}")


def _exit(status: int, line: str) -> None:
    err(" ".join(line.split()))  # one line, whatever the message held
    sys.exit(status)
