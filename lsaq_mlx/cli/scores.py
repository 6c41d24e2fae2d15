"""``score`` and ``plot-scores``: layer importance."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from lsaq_mlx.cache import check_output_file
from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import JsonOption, ModelOption
from lsaq_mlx.cli.output import emit_json, err
from lsaq_mlx.scoring.registry import metric_help
from lsaq_mlx.scoring.scores import DEFAULT_SEQ_LEN, DEFAULT_STRIDE, DEFAULT_TOKENS, DEFAULT_TOP_K


@app.command()
def score(
    model: ModelOption = None,
    metric: Annotated[str, typer.Option(metavar="METRIC", help=metric_help())] = "jaccard",
    calib: Annotated[Optional[str], typer.Option(metavar="TEXT", help="Calibration text: a file, a folder of .txt files, a HF dataset name[:config[:split]], or default.")] = None,
    tokens: Annotated[int, typer.Option(metavar="N", help="Calibration tokens.")] = DEFAULT_TOKENS,
    seq_len: Annotated[int, typer.Option(metavar="N", help="Tokens per sequence.")] = DEFAULT_SEQ_LEN,
    top_k: Annotated[int, typer.Option(metavar="N", help="jaccard: size of each top-k token set.")] = DEFAULT_TOP_K,
    stride: Annotated[Optional[int], typer.Option(metavar="N", help=f"Use every stride-th position only (default: {DEFAULT_STRIDE} for jaccard, chosen by benchmarks/stability_study.py; 1 for cosine).")] = None,
    sets: Annotated[str, typer.Option(metavar="KIND", help="jaccard: 'position' (a set per position) or 'sequence' (the union over a sequence).")] = "position",
    seed: Annotated[int, typer.Option(metavar="N", help="random: the seed.")] = 0,
    bits: Annotated[int, typer.Option(metavar="BITS", help="sensitivity: the bit width a layer is quantized to.")] = 3,
    skip_tokens: Annotated[int, typer.Option(metavar="N", help="Start this many tokens into the calibration text.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="PATH", help="Also write the LayerScores JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Write a PNG plot of the scores by layer.")] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace the files --out and --plot name if they exist.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", metavar="", help="Recompute even when cached.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Score every decoder layer's importance (higher = more important); cached by content fingerprint.

    jaccard is LSAQ: 1 - mean Jaccard similarity of the logit-lens top-k token sets of the
    hidden state entering and leaving the layer.

    Examples: lsaq-mlx score -m ./my-model · lsaq-mlx score --metric cosine --plot cosine.png --json
    """
    from lsaq_mlx.cli.render.scores import plot_scores, print_bar_chart
    from lsaq_mlx.scoring.run import ScoreOptions, cached_score, score as compute_scores
    from lsaq_mlx.sources import resolve_model

    opts = ScoreOptions(metric=metric, calib=calib, tokens=tokens, seq_len=seq_len, top_k=top_k, stride=stride,
                        sets=sets, seed=seed, bits=bits, skip_tokens=skip_tokens)
    opts.check()
    for path in (out, plot):
        if path:
            check_output_file(path, force)
    source = resolve_model(model)
    cached = None if no_cache else cached_score(source, opts)
    result = cached or compute_scores(source, opts, use_cache=not no_cache)
    if out:
        result.save(out, force, make_folders=False)
    if plot:
        plot_scores([result], plot, force=force)
    if json_out:
        return emit_json(result.to_dict() | {"cached": cached is not None})
    print_bar_chart(result)


@app.command("plot-scores")
def plot_scores_command(
    files: Annotated[list[Path], typer.Argument(help="LayerScores JSON files (from score --out).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", help="PNG file to write.")] = Path("scores.png"),
    normalize: Annotated[bool, typer.Option(metavar="", help="Rescale each metric to [0, 1].")] = True,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace the file --out names if it exists.")] = False,
) -> None:
    """Plot several score files (e.g. one per metric) as lines by layer in one PNG.

    Examples: lsaq-mlx plot-scores jaccard.json cosine.json -o scores.png"""
    from lsaq_mlx.cli.render.scores import plot_scores
    from lsaq_mlx.scoring.scores import LayerScores

    check_output_file(out, force)
    plot_scores([LayerScores.load(f) for f in files], out, normalize, force)
    err(f"wrote {out}")
