"""Human-readable ``lsaq-mlx inspect`` output."""

from collections import defaultdict

from rich import box
from rich.console import Console
from rich.table import Table

from lsaq_mlx.sources.inspection import precision_label
from lsaq_mlx.sizes import format_size


def print_description(info: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{info['model']}[/]  ({info['source']['kind']}: {info['source']['origin']})")
    console.print(
        f"{info['model_type']} · {info['layers']} layers · hidden {info['hidden_size']} · vocab {info['vocab_size']}"
        f" · {'tied' if info['tied_embeddings'] else 'separate'} embeddings"
    )
    console.print(
        f"{info['parameters'] / 1e6:.1f} M parameters · weights {format_size(info['weight_bytes'])} · "
        f"{info['bits_per_weight']:.3f} bits per weight · {format_size(info['size_on_disk'])} on disk "
        f"in {len(info['files'])} file(s)"
    )
    console.print(
        f"tokenizer: {'yes' if info['tokenizer'] else 'MISSING'} · chat template: {'yes' if info['chat_template'] else 'no'}"
    )
    kinds = Table("module kind", "count", "parameters", "bytes", title="By module kind", title_justify="left")
    for kind, k in info["by_kind"].items():
        kinds.add_row(kind, str(k["count"]), f"{k['parameters']:,}", format_size(k["bytes"]))
    console.print(kinds)
    console.print(_layer_table(info["modules"]))
    if info.get("adaptive"):
        _print_plans(console, info["adaptive"])


def _print_plans(console, adaptive: dict) -> None:
    table = Table(title="plans this adaptive folder serves (lsaq-mlx chat/tui/serve/eval -b BITS)")
    for column in ("budget", "bits/weight", "weights", "settings stored", "rounded when swapped to"):
        table.add_column(column, justify="right")
    for p in adaptive["plans"]:
        table.add_row(f"{p['budget']:g}", f"{p['bits_per_weight']:.3f}", format_size(p["bytes"]),
                      str(p["settings_stored"]), str(p["settings_rounded"]))
    console.print(table)
    console.print(f"smaller settings stored: {format_size(adaptive['side_bytes'])} "
                  f"({adaptive['side_bytes'] / adaptive['plans'][-1]['bytes']:.2f}x of the largest plan)")


_SHORT_KINDS = {"embed_tokens": "embed", "_proj": ""}
_SHORT_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _short_kind(kind: str) -> str:
    for long, short in _SHORT_KINDS.items():
        kind = kind.replace(long, short)
    return kind


def _layer_table(modules: list[dict]) -> Table:
    """One column per module kind, each cell the module's dtype or bits/group size; runs
    of decoder layers with identical precision share a row (``0-29``)."""
    rows, kinds = defaultdict(dict), []
    norms = sorted({_SHORT_DTYPES.get(precision_label(m), precision_label(m)) for m in modules if "norm" in m["kind"]})
    for m in modules:
        if "norm" in m["kind"]:
            continue
        row = "other" if m["layer"] is None else m["layer"]
        label = precision_label(m)
        rows[row][m["kind"]] = _SHORT_DTYPES.get(label, label)
        if m["kind"] not in kinds:
            kinds.append(m["kind"])
    caption = f"norms: {', '.join(norms)}" if norms else None
    table = Table(title="Precision of every module", caption=caption, caption_justify="left", title_justify="left",
                  box=box.SIMPLE_HEAD, padding=0, pad_edge=False)
    for header in ["layers", *map(_short_kind, kinds)]:
        table.add_column(header, no_wrap=True)
    layers = sorted(r for r in rows if r != "other")
    start = 0
    for i, layer in enumerate(layers):
        if i + 1 == len(layers) or rows[layers[i + 1]] != rows[layer]:
            span = str(layers[start]) if start == i else f"{layers[start]}-{layer}"
            table.add_row(span, *(rows[layer].get(k, "") for k in kinds))
            start = i + 1
    if "other" in rows:
        table.add_row("rest", *(rows["other"].get(k, "") for k in kinds))
    return table
