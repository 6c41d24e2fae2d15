"""The swap log: every precision change, newest first: when (since the session started),
why, from -> to bits per weight, how long it took, memory before and after."""

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from lsaq_mlx.runtime.events import Swapped
from lsaq_tui import units


def swap_entry(swap: Swapped, since: float) -> Text:
    """One swap; ``since`` is the session's start (the event's clock)."""
    at = units.clock(swap.at - since)
    before, after = swap.memory_before or {}, swap.memory_after or {}
    text = Text.assemble((f"{at} ", "dim"), (f"{swap.from_bits_per_weight or 0:.2f}", "bold"), "→",
                         (f"{swap.state.bits_per_weight:.2f}", "bold magenta"), " bpw in ",
                         (f"{swap.seconds:.2f} s", "bold"), f" · {swap.changed} modules")
    text.append(f"\n{swap.reason}", style="italic")
    if before and after:
        text.append(f"\nMLX {units.size(before['mlx_active_bytes'])}→{units.size(after['mlx_active_bytes'])}"
                    f" · RSS {units.size(before['rss_bytes'])}→{units.size(after['rss_bytes'])}", style="dim")
    if swap.failed:
        first = next(iter(swap.failed.values()))
        text.append(f"\n{len(swap.failed)} failed, kept their old weights: {first}", style="red")
    return text


class SwapLog(VerticalScroll):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.border_title = "Swaps"
        self.entries: list[Swapped] = []

    def add(self, swap: Swapped, since: float) -> None:
        self.entries.append(swap)
        entry = Static(swap_entry(swap, since), classes="swap-entry")
        if self.children:
            self.mount(entry, before=0)
        else:
            self.mount(entry)
        self.scroll_home(animate=False)
