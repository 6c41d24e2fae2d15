"""Running the CLI as a user does: ``run_cli`` in this process (the CLI's own ``run``:
exit status, stdout and stderr captured, the environment and stdin as given), and
``run_cli_process`` in a separate one, for what only a process shows (the BLAS re-exec,
signals, exit at interpreter shutdown)."""

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, env=None, input=None) -> Result:
    from lsaq_mlx.cli import run

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_stdin = dict(os.environ), sys.stdin
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        sys.stdin = io.StringIO(input or "")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run([str(a) for a in args])
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.stdin = saved_stdin
    return Result(code, out.getvalue(), err.getvalue())


def run_cli_process(*args, env=None, input=None):
    return subprocess.run(
        [sys.executable, "-m", "lsaq_mlx", *args], capture_output=True, text=True, env=env, input=input, timeout=900
    )


def assert_one_line_error(result, match: str):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert match in lines[0], lines[0]
