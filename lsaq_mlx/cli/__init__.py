"""The ``lsaq-mlx`` command line: it parses, calls one library function, renders.

Every command that produces data takes ``--json`` (one JSON document on stdout;
progress and logs on stderr). Exit status: 0 success, 1 user error (one line on
stderr), 2 usage error, 128+N after signal N. Set LSAQ_MLX_DEBUG=1 to see full tracebacks;
``kill -USR1 PID`` prints the stack of every thread of a running command to stderr.
"""

import faulthandler
import os
import signal
import sys

from lsaq_mlx.backend.blas import reexec_with_fast_blas
from lsaq_mlx.cache import sweep_cache
from lsaq_mlx.cli import cache, evaluate, models, plans, runtime, scores, serve, storage  # noqa: F401 - the commands register
from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import FLAGS
from lsaq_mlx.cli.output import err
from lsaq_mlx.errors import Terminated, UserError, os_error_line
from lsaq_mlx.settings import Settings, use_settings

__all__ = ["app", "main", "run"]


def _terminate(signum, frame):
    raise Terminated(signum)


def error_line(e: UserError) -> str:
    """The message, and the flag of the setting it is about."""
    flag = FLAGS.get(e.setting)
    return f"error: {e} ({flag})" if flag else f"error: {e}"


def main() -> None:
    """The ``lsaq-mlx`` program: restarted once with a fast BLAS, then ``run``."""
    reexec_with_fast_blas()
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _terminate)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID`: every thread's stack on stderr (a process that hangs)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    sys.exit(run())


def run(args: list[str] | None = None) -> int:
    """Run one command (``args``, default ``sys.argv[1:]``) in this process and return its
    exit status; a failure is one line on stderr."""
    debug = False
    try:
        chosen = Settings.from_environment()  # read once: every stage asks settings()
        debug = chosen.debug
        with use_settings(chosen):
            sweep_cache()
            app(args=args, prog_name="lsaq-mlx")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except UserError as e:
        if debug:
            raise
        return _failed(1, error_line(e))
    except OSError as e:
        if debug:
            raise
        return _failed(1, f"error: {os_error_line(e)}")
    except KeyboardInterrupt:
        return _failed(130, "interrupted")
    except Exception as e:  # a bug: still one line, and the way to the traceback
        if debug:
            raise
        if os.environ.get("MLX_RANK", "").isdigit():
            from lsaq_mlx.runtime.pipeline.guard import end_pipeline, peer_lost

            if peer_lost(e):  # one line for the whole run, on rank 0 (a SIGTERM may be saying it too)
                end_pipeline(int(os.environ["MLX_RANK"]), "another rank ended: its connection was lost")
        return _failed(1, f"error: internal error: {type(e).__name__}: {e} (LSAQ_MLX_DEBUG=1 shows the traceback)")
    except Terminated as e:
        launched = " (mlx.launch stops every rank when another rank ends)" if os.environ.get("MLX_RANK") else ""
        return _failed(128 + e.signum, f"stopped by {signal.Signals(e.signum).name}{launched}")
    return 0


def _failed(status: int, line: str) -> int:
    err(" ".join(line.split()))  # one line, whatever the message held
    return status
