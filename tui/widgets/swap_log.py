"""The swap log: every precision change, newest first: when (since the session started),
why, from -> to bits per weight, how long it took, memory before and after."""

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from lsaq_tui import units


def swap_entry(data: dict, since: float) -> Text:
    """One swap from a ``swapped`` event; ``since`` is the session's start (the event's clock)."""
    at = units.clock(data.get("at", since) - since)
    before, after = data.get("memory_before") or {}, data.get("memory_after") or {}
    text = Text.assemble((f"{at} ", "dim"), (f"{data.get('from_bits_per_weight', 0):.2f}", "bold"), "→",
                         (f"{data['bits_per_weight']:.2f}", "bold magenta"), " bpw in ",
                         (f"{data['seconds']:.2f} s", "bold"), f" · {data['changed']} modules")
    text.append(f"\n{data.get('reason', 'requested')}", style="italic")
    if before and after:
        text.append(f"\nMLX {units.size(before['mlx_active_bytes'])}→{units.size(after['mlx_active_bytes'])}"
                    f" · RSS {units.size(before['rss_bytes'])}→{units.size(after['rss_bytes'])}", style="dim")
    if data.get("failed"):
        first = next(iter(data["failed"].values()))
        text.append(f"\n{len(data['failed'])} failed, kept their old weights: {first}", style="red")
    return text


class SwapLog(VerticalScroll):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.border_title = "Swaps"
        self.entries: list[dict] = []

    def add(self, data: dict, since: float) -> None:
        self.entries.append(data)
        entry = Static(swap_entry(data, since), classes="swap-entry")
        if self.children:
            self.mount(entry, before=0)
        else:
            self.mount(entry)
        self.scroll_home(animate=False)
