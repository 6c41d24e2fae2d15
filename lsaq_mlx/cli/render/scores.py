"""Showing LayerScores: a terminal bar chart and a PNG plot."""

from pathlib import Path

from rich.console import Console

from lsaq_mlx.cache import atomic_file
from lsaq_mlx.scoring.scores import LayerScores

BAR_WIDTH = 40


def print_bar_chart(scores: LayerScores, console: Console | None = None) -> None:
    console = console or Console()
    values = scores.scores
    lo, hi = min(0.0, min(values)), max(values)  # bars start at zero (at the lowest score if one is negative)
    span = (hi - lo) or 1.0
    rank = {layer: r + 1 for r, layer in enumerate(scores.ranking())}
    console.print(f"[bold]{scores.metric}[/] importance of {len(values)} layers of {scores.model or scores.model_fingerprint}"
                  f" ({_describe_params(scores.params)}; {scores.wall_seconds:.1f} s); bars from {lo:g} to {hi:.4f}")
    for i, v in enumerate(values):
        filled = round((v - lo) / span * BAR_WIDTH)
        console.print(f"layer {i:>3}  {'█' * filled}{'·' * (BAR_WIDTH - filled)}  {v:.4f}  #{rank[i]}")


def _describe_params(params: dict) -> str:
    shown = {k: v for k, v in params.items() if k != "calibration_fingerprint"}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "no parameters"


def plot_scores(all_scores: list[LayerScores], path: Path, normalize: bool = False, force: bool = True) -> None:
    """One line per score file, importance by layer; ``normalize`` rescales each to [0, 1]
    so metrics of different ranges share one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for s in all_scores:
        values = s.scores
        if normalize:
            lo, hi = min(values), max(values)
            values = [(v - lo) / ((hi - lo) or 1.0) for v in values]
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=s.metric)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("importance" + (" (min-max normalized)" if normalize else ""))
    ax.set_title(f"Layer importance: {all_scores[0].model or all_scores[0].model_fingerprint}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, force, make_folders=False) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
