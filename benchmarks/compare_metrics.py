"""How well does each cheap layer-importance metric order layers like the expensive one?

    python benchmarks/compare_metrics.py [--model default] [--tokens 1024] [--plot scores.png]

Scores every layer with jaccard (LSAQ), cosine (Block Influence / LIM), zscore (ZD) and
random, and with sensitivity (the increase of KL(reference || model) on calibration
text when only that layer is quantized to --bits, group 32), all on the same
calibration tokens, then prints the Spearman correlation of each cheap ranking with the
sensitivity ranking, and each metric's wall time. Results are cached like
``lsaq-mlx score``, so a rerun only recomputes what changed.
"""

import argparse
import os
import platform

import mlx.core as mx

from lsaq_mlx.backend.blas import reexec_with_fast_blas
from lsaq_mlx.scoring.scores import spearman
from lsaq_mlx.cli.render.scores import plot_scores
from lsaq_mlx.scoring.run import ScoreOptions, score
from lsaq_mlx.sources import load_model, resolve_model

CHEAP = ("jaccard", "cosine", "zscore", "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--calib", default=None, help="calibration text (default: the packaged one)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--plot", default=None, help="write a PNG of all metrics by layer")
    args = parser.parse_args()
    reexec_with_fast_blas()

    source = resolve_model(args.model)
    loaded = load_model(source)[:2]
    results = {}
    for metric in ("sensitivity", *CHEAP):
        opts = ScoreOptions(metric, args.calib, tokens=args.tokens, bits=args.bits)
        results[metric] = score(source, opts, model=loaded)
    reference = results["sensitivity"].scores

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores; MLX {mx.__version__} "
          f"{mx.default_device()}; model {args.model} ({len(reference)} layers); {args.tokens} calibration tokens; "
          f"sensitivity = KL increase with one layer at {args.bits} bits\n")
    print("| metric | Spearman vs sensitivity | wall time |")
    print("|---|---|---|")
    for metric, result in results.items():
        rho = "1 (reference)" if metric == "sensitivity" else f"{spearman(result.scores, reference):.3f}"
        print(f"| {metric} | {rho} | {result.wall_seconds:.1f} s |")
    if args.plot:
        plot_scores(list(results.values()), args.plot, normalize=True)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
