"""Human-readable plans: the per-layer table of ``plan`` and ``convert --dry-run``."""

from collections import Counter, defaultdict

from rich import box
from rich.console import Console
from rich.table import Table

import re

from lsaq_mlx.modules import layer_label
from lsaq_mlx.planning.plan import QuantPlan
from lsaq_mlx.sizes import format_size

_CONTAINERS = re.compile(r"^(.*\.)?layers\.\d+\.|\b(self_attn|mlp|block_sparse_moe|feed_forward|attention|model)\.")


def _kind(path: str) -> str:
    """A module's column: its path within the layer without the containers' names;
    ``e.`` for a layer's experts (``switch_mlp``), ``router`` for their gate."""
    local = _CONTAINERS.sub("", path).replace("switch_mlp.", "e.").replace("experts.", "e.")
    if local == "gate":
        return "router"
    return local.replace("shared_expert.", "shared.").replace("_proj", "").replace("embed_tokens", "embed")


def print_pipeline_plan(plan, on_paper: bool = False, console: Console | None = None) -> None:
    """A ``PipelinePlan``: each rank's layers, memory and bits per weight."""
    console = console or Console()
    table = Table(title=f"{plan.plan.method} over {len(plan.ranks)} ranks, KV cache for {plan.context} tokens"
                  + (" (priced from the config alone)" if on_paper else ""), title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    for header in ("rank", "memory", "layers", "holds", "weights", "bpw", "KV", "reserve", "free"):
        table.add_column(header, no_wrap=True, justify="left" if header in ("layers", "holds") else "right")
    for s in plan.ranks:
        held = [name for name, r in (("embed", 0), ("head", len(plan.ranks) - 1)) if s.rank == r]
        table.add_row(str(s.rank), format_size(s.memory_bytes), f"{s.first_layer}-{s.end_layer - 1}",
                      ", ".join(held), format_size(s.weight_bytes), f"{s.bits_per_weight:.2f}",
                      format_size(s.kv_bytes), format_size(s.reserve_bytes), format_size(s.free_bytes))
    console.print(table)
    for s, plans in zip(plan.ranks, plan.rank_plans):
        console.print(f"rank {s.rank}'s plans: " + ", ".join(f"{p.predicted_bits_per_weight:.2f}" for p in plans)
                      + " bits per weight")
    p = plan.plan
    console.print(f"model: {format_size(p.predicted_bytes)} · {p.predicted_bits_per_weight:.3f} bits per weight "
                  f"(mlx-lm's definition) · planned in {plan.details.get('seconds', 0):.2f} s")


def print_plan(plan: QuantPlan, headroom: dict | None = None, console: Console | None = None) -> None:
    console = console or Console()
    rows, kinds = defaultdict(dict), []
    for path, choice in plan.modules.items():
        rows[layer_label(path)][_kind(path)] = choice.label
        if _kind(path) not in kinds:
            kinds.append(_kind(path))
    legend = "f16 = kept in float" + ("; sB:K+R = SWSC, B-bit centroids, K clusters, rank R" if plan.swsc_modules() else "")
    if any(k.startswith("e.") for k in kinds):
        legend += "; e. = the layer's experts, one setting for all"
    table = Table(title=f"{plan.method}: bits/group size of every module", title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, show_edge=False)
    for header in ["layer", *kinds, "MB"]:
        table.add_column(header, no_wrap=True, justify="right" if header == "MB" else "left")
    layer_bytes = plan.details.get("module_bytes_by_layer", {})
    for row in sorted(rows, key=lambda r: (r == "rest", int(r) if r != "rest" else 0)):
        table.add_row(row, *(rows[row].get(k, "") for k in kinds), f"{layer_bytes.get(row, 0) / 1e6:.2f}")
    console.print(table)
    console.print(legend)  # below, not in the title: the table would widen to fit it
    mix = Counter(c.label for c in plan.modules.values())
    console.print("modules: " + ", ".join(f"{n} x {label}" for label, n in mix.most_common()))
    console.print(
        f"total {plan.predicted_bytes / 1e6:.1f} MB · {plan.predicted_bits_per_weight:.3f} bits per weight "
        f"(mlx-lm's definition) · {_budget_text(plan.budget)}"
    )
    if headroom:
        console.print(
            f"this machine: {headroom['available_bytes'] / 1e9:.2f} GB available now; "
            f"{headroom['headroom_bytes'] / 1e9:.2f} GB left after loading these weights"
        )


def _budget_text(budget: dict) -> str:
    if "bits_per_weight" in budget:
        return f"budget {budget['bits_per_weight']:g} bits per weight"
    if budget.get("bytes") is not None:
        return f"budget {format_size(budget['bytes'])} of weights"
    return "no budget (recipe)"
