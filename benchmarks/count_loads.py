"""How many times each command builds a model and reads its weights.

Runs commands in this process (Typer's test runner) with ``mlx_lm.utils.load_model``
(what every load goes through: folders, packs, SWSC folders) counting its calls, lazy or
not, on the embedded default model, with a warm cache (each command runs once first).
Loads of the source and of other folders (what convert wrote, for its smoke test) are
counted apart.

    python benchmarks/count_loads.py [--json]
"""

import argparse
import json
import tempfile
from pathlib import Path

SWEEP = """
[eval]
ppl = "{text}"
max_tokens = 64
seq_len = 32
[[grid]]
models = ["default"]
methods = ["lsaq", "uniform"]
budgets = [4.0, 5.0]
"""


def count(args: list[str], stdin: str | None = None) -> dict:
    import mlx_lm.utils
    from typer.testing import CliRunner

    from lsaq_mlx.cli import app

    from lsaq_mlx.sources import resolve_model

    source = resolve_model(None).path.resolve()
    calls = {"full": 0, "lazy": 0, "other": 0}
    original = mlx_lm.utils.load_model

    def counting(model_path, lazy=False, *a, **k):
        calls["other" if Path(model_path).resolve() != source else "lazy" if lazy else "full"] += 1
        return original(model_path, lazy, *a, **k)

    mlx_lm.utils.load_model = counting
    try:
        result = CliRunner().invoke(app, args, input=stdin, catch_exceptions=False)
    finally:
        mlx_lm.utils.load_model = original
    if result.exit_code != 0:
        raise SystemExit(f"{' '.join(args)} failed: {result.output[-500:]}")
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lsaq-loads-"))
    text = work / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    spec = work / "sweep.toml"
    spec.write_text(SWEEP.format(text=text))
    commands = {
        "convert -b 4.0": (["convert", "-b", "4.0", "--quantizer", "rtn", "-o", str(work / "q4"), "--force"], None),
        "chat -b 4 with three /plan": (["chat", "-b", "4", "-n", "4"], "/plan 3.5\n/plan 4.5\n/plan 5\n/quit\n"),
        "sweep of 4 cells": (["sweep", str(spec), "-o", str(work / "sweep")], None),
    }
    results = {}
    for name, (args, stdin) in commands.items():
        count(args, stdin)  # warm the caches (import, scores, cost table)
        if name.startswith("sweep"):
            import shutil

            shutil.rmtree(work / "sweep")
        results[name] = count(args, stdin)
    if options.json:
        print(json.dumps(results, indent=2))
        return
    print("| command | loads of the source (all weights read) | loads of the source (lazy) | loads of other folders |")
    print("|---|---|---|---|")
    for name, calls in results.items():
        print(f"| `{name}` | {calls['full']} | {calls['lazy']} | {calls['other']} |")


if __name__ == "__main__":
    main()
