"""Convert time and peak memory: lsaq-mlx convert vs mlx_lm.convert -q, in one run.

    python benchmarks/bench_convert.py [--model default]

Each conversion runs as its own process, one after the other, on the same source
folder (the imported model, float32); wall time and peak resident memory (the child's
own ``ru_maxrss`` from ``wait4``) are measured from outside. Rows:

- mlx_lm.convert -q (4 bits, group 64): the baseline;
- lsaq-mlx convert --method uniform --bits 4 (the same output, our writer);
- lsaq-mlx convert -b 4.0 (lsaq plan: scores and cost-model errors from the cache,
  computed first, outside the timing, by a --dry-run).
Both write the same kind of folder; ours also opens it with mlx-lm and generates 8
tokens as a smoke test, included in its time.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile

from common import measured, start
from lsaq_mlx.sources import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    start()
    source = resolve_model(args.model)
    lsaq = [sys.executable, "-m", "lsaq_mlx", "convert", "-m", args.model, "--quantizer", "rtn"]  # as mlx_lm.convert
    subprocess.run(lsaq + ["-b", "4.0", "--dry-run"], check=True, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "mlx_lm.convert -q --q-bits 4 --q-group-size 64": measured(
                [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source.path), "-q", "--q-bits", "4",
                 "--q-group-size", "64", "--mlx-path", f"{tmp}/mlx"]),
            "lsaq-mlx convert --method uniform --bits 4": measured(lsaq + ["--method", "uniform", "--bits", "4", "-o", f"{tmp}/u"]),
            "lsaq-mlx convert -b 4.0 (lsaq)": measured(lsaq + ["-b", "4.0", "-o", f"{tmp}/l"]),
        }
    base_wall, base_rss = next(iter(rows.values()))
    size = sum(f.stat().st_size for f in source.path.glob("*.safetensors"))
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; model {args.model} "
          f"(source {size / 1e6:.0f} MB of float32 safetensors)\n")
    print("| conversion | wall s | vs mlx_lm | peak RSS MB | vs mlx_lm |")
    print("|---|---|---|---|---|")
    for name, (wall, rss) in rows.items():
        print(f"| {name} | {wall:.1f} | {wall / base_wall:.2f}x | {rss / 1e6:.0f} | {rss / base_rss:.2f}x |")


if __name__ == "__main__":
    main()
