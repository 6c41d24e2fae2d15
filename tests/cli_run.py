"""Running the CLI as a user does: a separate process."""

import subprocess
import sys


def run_cli(*args, env=None, input=None):
    return subprocess.run(
        [sys.executable, "-m", "lsaq_mlx", *args], capture_output=True, text=True, env=env, input=input, timeout=900
    )


def assert_one_line_error(result, match: str):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert match in lines[0], lines[0]
