"""Convert the model at several budgets and check each folder with stock mlx-lm only.

    python benchmarks/check_budgets.py [--model default] [--budgets 2.5 3 3.5 4 4.5 5]

For each budget: ``lsaq-mlx convert -b B`` into a temporary folder, then a separate
Python process that imports nothing but mlx_lm loads it, computes its bits per weight
(``mlx_lm.utils.compute_bits_per_weight``) and generates 8 tokens.
"""

import argparse
import os
import subprocess
import sys
import tempfile

CHECK = """
import sys
from mlx_lm import load, generate
from mlx_lm.utils import compute_bits_per_weight
model, tokenizer = load(sys.argv[1])
print(compute_bits_per_weight(model))
print(repr(generate(model, tokenizer, "The capital of France is", max_tokens=8)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 4.5, 5.0])
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSAQ")}
    print("| budget | mlx-lm bits per weight | within budget, by <= 0.05 | mlx_lm.generate, 8 tokens |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            out = os.path.join(tmp, f"m{budget}")
            subprocess.run([sys.executable, "-m", "lsaq_mlx", "convert", "-m", args.model, "-b", str(budget), "-o", out],
                           check=True, capture_output=True)
            done = subprocess.run([sys.executable, "-c", CHECK, out], capture_output=True, text=True, env=env, check=True)
            bpw, text = done.stdout.strip().splitlines()[:2]
            ok = budget - 0.05 <= float(bpw) <= budget
            print(f"| {budget} | {float(bpw):.4f} | {'yes' if ok else 'NO'} | {text} |", flush=True)


if __name__ == "__main__":
    main()
