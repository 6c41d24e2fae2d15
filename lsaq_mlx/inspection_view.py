"""Human-readable ``lsaq-mlx inspect`` output."""

from collections import defaultdict

from rich.console import Console
from rich.table import Table

from lsaq_mlx.inspection import precision_label


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def print_description(info: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{info['model']}[/]  ({info['source']['kind']}: {info['source']['origin']})")
    console.print(
        f"{info['model_type']} · {info['layers']} layers · hidden {info['hidden_size']} · vocab {info['vocab_size']}"
        f" · {'tied' if info['tied_embeddings'] else 'separate'} embeddings"
    )
    console.print(
        f"{info['parameters'] / 1e6:.1f} M parameters · weights {_size(info['weight_bytes'])} · "
        f"{info['bits_per_weight']:.3f} bits per weight · {_size(info['size_on_disk'])} on disk "
        f"in {len(info['files'])} file(s)"
    )
    console.print(
        f"tokenizer: {'yes' if info['tokenizer'] else 'MISSING'} · chat template: {'yes' if info['chat_template'] else 'no'}"
    )
    kinds = Table("module kind", "count", "parameters", "bytes", title="By module kind", title_justify="left")
    for kind, k in info["by_kind"].items():
        kinds.add_row(kind, str(k["count"]), f"{k['parameters']:,}", _size(k["bytes"]))
    console.print(kinds)
    console.print(_layer_table(info["modules"]))


def _layer_table(modules: list[dict]) -> Table:
    """One row per decoder layer (plus one for modules outside the layers), one column
    per module kind, each cell the module's dtype or bits/group size."""
    rows, kinds = defaultdict(dict), []
    for m in modules:
        row = "other" if m["layer"] is None else m["layer"]
        rows[row][m["kind"]] = precision_label(m)
        if m["kind"] not in kinds:
            kinds.append(m["kind"])
    table = Table("layer", *kinds, title="Precision of every module", title_justify="left")
    for row, cells in sorted(rows.items(), key=lambda kv: (kv[0] == "other", kv[0] if kv[0] != "other" else 0)):
        table.add_row(str(row), *(cells.get(k, "") for k in kinds))
    return table
