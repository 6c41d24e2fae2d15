"""A sweep in one process vs the same sweep under ``mlx.launch -n 2``, in one run.

    python benchmarks/bench_sweep.py [--ranks 2] [--tokens 1024] [--budgets 3 3.5 4 4.5 5 5.5]

The default model, lsaq and uniform plans at each budget, perplexity and KL on the first
--tokens tokens of WikiText-2. Each run starts from an empty results folder (the score
and cost-model caches are warmed first, so both runs do the same work). Reports both
wall times and whether the two Markdown tables are identical (target: identical, and
less wall time with 2 ranks).
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.0, 3.5, 4.0, 4.5, 5.0, 5.5])
    args = parser.parse_args()
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        sys.exit("mlx.launch is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.toml"
        spec.write_text(f'[eval]\nmax_tokens = {args.tokens}\nseq_len = 512\n\n[[grid]]\nmodels = ["default"]\n'
                        f'methods = ["lsaq", "uniform"]\nbudgets = {args.budgets}\n')
        sweep = [sys.executable, "-m", "lsaq_mlx", "sweep", str(spec)]
        for budget in args.budgets:  # warm the caches (scores, cost model) outside the timings
            subprocess.run([*sweep[:3], "plan", "-b", str(budget), "--json"], stdout=subprocess.DEVNULL, check=True)
        one = run([*sweep, "--out", f"{tmp}/one"])
        many = run([launcher, "-n", str(args.ranks), *sweep, "--out", f"{tmp}/many"])
        same = (Path(tmp) / "one" / "results.md").read_text() == (Path(tmp) / "many" / "results.md").read_text()
        table = (Path(tmp) / "one" / "results.md").read_text()
    cells = 2 * len(args.budgets)
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; {cells} cells "
          f"(lsaq, uniform x {args.budgets} bpw), {args.tokens} WikiText-2 tokens each\n")
    print("| run | wall | speed-up |")
    print("|---|---|---|")
    print(f"| 1 process | {one:.0f} s | 1.00x |")
    print(f"| mlx.launch -n {args.ranks} | {many:.0f} s | {one / many:.2f}x |")
    print(f"\nresults tables identical: {'yes' if same else 'NO'}\n\n{table}")


if __name__ == "__main__":
    main()
