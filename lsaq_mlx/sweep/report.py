"""A sweep's results as a Markdown table and plots: quality vs bits per weight, one line
per method, and the per-layer bits of every plan."""

from pathlib import Path

from lsaq_mlx.cache import atomic_file


def task_names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(t["task"] for r in rows if r["status"] == "ok" for t in r["eval"]["tasks"]))


def _model(row: dict) -> str:
    return Path(row["model"]).name


def _setting(row: dict) -> str:
    if row.get("budget") is not None:
        return f"{row['budget']:g} bpw"
    if row.get("low_fraction") is not None:
        return f"{row['low_fraction']:.0%} at {row['low_bits']} bits, rest {row['high_bits']}"
    return "-"


def markdown_table(rows: list[dict]) -> str:
    tasks = task_names(rows)
    head = ["model", "method", "setting", "bits/weight", "perplexity", "KL (nats/token)", "top-1 agree", *tasks, "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            cells = [_model(r), r["method"], _setting(r), "", "", "", "", *[""] * len(tasks), f"failed: {r['error']}"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            continue
        e = r["eval"]
        p, d = e.get("perplexity"), e.get("divergence")
        accs = {t["task"]: t for t in e["tasks"]}
        cells = [_model(r), r["method"], _setting(r), f"{r['bits_per_weight']:.3f}",
                 f"{p['perplexity']:.3f}" if p else "", f"{d['kl']:.4f} ± {d['kl_stderr']:.4f}" if d else "",
                 f"{d['top1_agreement']:.3f}" if d else "",
                 *[_accuracy(accs.get(t)) for t in tasks], "ok"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _accuracy(task: dict | None) -> str:
    if task is None:
        return ""
    norm = f" / {task['acc_norm']:.3f}" if task.get("acc_norm") is not None else ""
    return f"{task['acc']:.3f}{norm}"


def write_report(rows: list[dict], out: Path) -> list[Path]:
    """``results.md`` and the plots; returns the files written."""
    out = Path(out)
    with atomic_file(out / "results.md") as tmp:
        tmp.write_text(markdown_table(rows), encoding="utf-8")
    written = [out / "results.md"]
    ok = [r for r in rows if r["status"] == "ok"]
    if any(r["eval"].get("perplexity") for r in ok):
        written.append(plot_quality(ok, out / "quality.png"))
    if any(r.get("layer_bits") for r in ok):
        written.append(plot_layer_bits(ok, out / "layer_bits.png"))
    return written


def plot_quality(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = any(r["eval"].get("divergence") for r in rows)
    fig, axes = plt.subplots(1, 2 if kl else 1, figsize=(11 if kl else 6, 4.2), squeeze=False,
                             layout="constrained")
    series = {}
    for r in rows:
        if r["method"] != "source" and r["eval"].get("perplexity"):
            series.setdefault((r["model"], r["method"]), []).append(r)
    models = {m for m, _ in series}
    for (model, method), points in sorted(series.items()):
        points.sort(key=lambda r: r["bits_per_weight"])
        bpw = [r["bits_per_weight"] for r in points]
        name = method if len(models) == 1 else f"{Path(model).name} {method}"
        style = dict(marker="o", ms=4, label=name)
        axes[0][0].plot(bpw, [r["eval"]["perplexity"]["perplexity"] for r in points], **style)
        if kl:
            axes[0][1].plot(bpw, [r["eval"]["divergence"]["kl"] for r in points], **style)
    for r in rows:
        if r["method"] == "source" and r["eval"].get("perplexity"):
            axes[0][0].axhline(r["eval"]["perplexity"]["perplexity"], color="grey", ls="--", lw=1,
                               label="source" if len(models) == 1 else f"{_model(r)} source")
    axes[0][0].set(xlabel="bits per weight", ylabel="perplexity", title="Perplexity")
    if kl:
        axes[0][1].set(xlabel="bits per weight", ylabel="KL to the source (nats/token)", title="KL divergence",
                       yscale="log")
    axes[0][0].legend(fontsize=7)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def plot_layer_bits(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planned = [r for r in rows if r.get("layer_bits")]
    width = max(len(r["layer_bits"]) for r in planned)
    grid = [r["layer_bits"] + [float("nan")] * (width - len(r["layer_bits"])) for r in planned]
    fig, ax = plt.subplots(figsize=(min(16, 5 + width * 0.3), 1.5 + 0.28 * len(planned)), layout="constrained")
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(planned)), [f"{_model(r)} {r['method']} {_setting(r)}" for r in planned], fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_title("Bits per weight of each layer, by plan")
    fig.colorbar(image, ax=ax, label="bits per weight")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
