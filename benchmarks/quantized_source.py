"""Plans served from a model the user holds quantized, against the same budgets served
from the float source, on the same WikiText tokens.

    python benchmarks/quantized_source.py [--model default] [--q-bits 8] [--group-size 64]
                                          [--budgets 3,3.5,4,4.5,5,5.5,6] [--tokens 2048] [--out results.json]

First ``mlx_lm.convert -q --q-bits Q`` of the source is written (mlx-lm's
``quantize_model``, through ``peer_quantizers.py convert-Q-G``; its wall time and peak
memory from outside). Then, for each budget, ``lsaq-mlx eval -b B`` of the source and of
that folder, each in its own process: the plan chat and serve would run from that model
(its scores and cost table computed on the model as given, its weights rounded from
what the model stores), KL to the float source and perplexity on the first --tokens
tokens of WikiText-2 in windows of --seq-len. The ratio is what holding only the
quantized folder costs.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from common import WIKITEXT, measured, start

from lsaq_mlx.sources import resolve_model

ROOT = Path(__file__).resolve().parent


def served(model: str, budget: float, reference: str, args) -> dict:
    """``eval -m model -b budget --reference reference``'s KL and perplexity."""
    out = subprocess.run([sys.executable, "-m", "lsaq_mlx", "eval", "-m", model, "-b", str(budget), "--reference",
                          reference, "--ppl", str(WIKITEXT), "--max-tokens", str(args.tokens), "--seq-len",
                          str(args.seq_len), "--json"], capture_output=True, text=True, env=os.environ)
    if out.returncode:
        sys.exit(f"eval -m {model} -b {budget} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout)
    return {"kl": result["divergence"]["kl"], "kl_stderr": result["divergence"]["kl_stderr"],
            "perplexity": result["perplexity"]["perplexity"], "seconds": result["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--q-bits", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--budgets", default="3,3.5,4,4.5,5,5.5,6")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work", default=None, help="Keep the quantized folder here (default: a temporary folder).")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start()
    source = resolve_model(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="quantized-source-"))
    folder = work / f"mlx_lm-q{args.q_bits}-{args.group_size}"
    wall, rss = measured([sys.executable, str(ROOT / "peer_quantizers.py"), f"convert-{args.q_bits}-{args.group_size}",
                          str(source.path), str(folder)])
    print(f"mlx_lm.convert -q --q-bits {args.q_bits} --q-group-size {args.group_size}: {wall:.0f} s, "
          f"{rss / 1e9:.2f} GB peak RSS", flush=True)
    rows = []
    print(f"| budget | from the float source: KL (ppl) | from the {args.q_bits}-bit folder: KL (ppl) | ratio |")
    print("|---|---|---|---|")
    for budget in [float(b) for b in args.budgets.split(",")]:
        float_row = served(args.model, budget, args.model, args)
        folder_row = served(str(folder), budget, args.model, args)
        rows.append({"budget": budget, "from_float": float_row, "from_folder": folder_row,
                     "kl_ratio": folder_row["kl"] / float_row["kl"]})
        print(f"| {budget:g} | {float_row['kl']:.4f} ({float_row['perplexity']:.2f}) | {folder_row['kl']:.4f} "
              f"({folder_row['perplexity']:.2f}) | {rows[-1]['kl_ratio']:.3f}x |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "q_bits": args.q_bits, "group_size": args.group_size,
                                              "convert_seconds": wall, "convert_peak_rss": rss, "tokens": args.tokens,
                                              "rows": rows, "machine": platform.platform()}, indent=2))


if __name__ == "__main__":
    main()
