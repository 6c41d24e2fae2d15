"""The layers panel: every decoder layer's importance (a bar) and its current bits per
weight (the bar's colour), the whole model's bits per weight and weight bytes, and which
plan of the PlanSet is active; in a pipeline, a line per rank (its layers, plan, swaps and
memory). A row per layer when the panel is tall enough, otherwise a column per layer."""

import math

from rich.text import Text
from textual.widget import Widget

from lsaq_mlx.runtime.events import EngineState

from lsaq_tui import units
from lsaq_tui.widgets.facts import fact_lines

# bits per weight (scales included) -> colour; float layers are white
BIT_STYLES = ((2.75, "red"), (3.75, "dark_orange"), (4.75, "yellow"), (5.75, "green_yellow"),
              (7.0, "green"), (12.0, "cyan"), (math.inf, "bright_white"))
VERTICAL = " ▁▂▃▄▅▆▇█"
HORIZONTAL = " ▏▎▍▌▋▊▉█"
MAX_BAR_ROWS = 8
MIN_ROW_WIDTH = 16  # index, a bar of 7 cells, bits


def bits_style(bits: float) -> str:
    return next(style for limit, style in BIT_STYLES if bits < limit)


class LayersPanel(Widget):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bits: list[float] = []
        self.other_bits: float | None = None
        self.importance: dict | None = None
        self.plan: dict = {}
        self.plan_count = 0
        self.changed: set[int] = set()  # layers whose bits the last swap changed
        self.ranks: list[dict] = []  # a pipeline's ranks (EngineState.ranks)
        self.border_title = "Layers"

    def update_plan(self, state: EngineState) -> None:
        """From the engine's state (at ready, after a swap, on request)."""
        layer_bits = state.layer_bits or {}
        new = layer_bits.get("layers", self.bits)
        self.changed = {i for i, (a, b) in enumerate(zip(self.bits, new)) if abs(a - b) > 1e-9}
        self.bits, self.other_bits = list(new), layer_bits.get("other", self.other_bits)
        if state.importance is not None:
            self.importance = state.importance
        self.plan = {"bits_per_weight": state.bits_per_weight, "weight_bytes": state.weight_bytes,
                     "plan_index": state.plan_index, "method": state.method}
        if state.policy:
            self.plan_count = len(state.policy["plans"])
        self.ranks = state.ranks or []
        self.refresh()

    def render(self) -> Text:
        width, height = self.content_size.width, self.content_size.height
        if not self.bits:
            return Text("loading…", style="dim")
        text = self._summary(width)
        ranks = self._rank_lines(width, 2 if height >= 12 + 2 * len(self.ranks) else 1)
        if ranks:
            text.append_text(Text("\n").join(ranks) + Text("\n"))
        body_height = height - 2 - len(ranks)
        rows = self._rows(width, body_height)
        text.append_text(rows if rows is not None else self._columns(width, max(body_height, 3)))
        return text

    def _summary(self, width: int) -> Text:
        """Two lines: the model's bits per weight, bytes and plan; what bars and colours mean."""
        p = self.plan
        facts = [Text.assemble((f"{p.get('bits_per_weight', 0):.2f}", "bold"), " bpw"),
                 Text(units.size(p.get("weight_bytes")), style="bold")]
        if p.get("plan_index") is not None:
            facts.append(Text(f"plan {p['plan_index'] + 1}/{self.plan_count}", style="bold magenta"))
        facts.append(Text(p.get("method", "")))
        if self.other_bits is not None:
            facts.append(Text(f"embed/head {self.other_bits:.2f}"))
        metric = f"{self.importance['metric']} importance" if self.importance else "importance not computed"
        legend = [Text(f"bar = {metric}", style="dim"), Text("colour = bits", style="dim")]
        lines = fact_lines(facts, width, 1) + fact_lines(legend, width, 1)
        return Text("\n").join(lines) + Text("\n")

    def _rank_lines(self, width: int, per_rank: int) -> list[Text]:
        """``per_rank`` lines per rank: its layers, bits per weight, plan and swaps, then
        its memory, as the width allows."""
        lines = []
        for r in self.ranks:
            first, end = r["layers"]
            facts = [Text.assemble((f"rank {r['rank']}", "bold cyan"), f" {first}-{end - 1}"),
                     Text(f"{r['bits_per_weight']:.2f} bpw" if r.get("bits_per_weight") else "n/a bpw",
                          style=bits_style(r.get("bits_per_weight") or 16.0)),
                     Text(units.size(r["weight_bytes"]))]
            if r.get("plan_index") is not None:
                facts.append(Text(f"plan {r['plan_index'] + 1}/{r['plans']} · {r['swaps']} swaps", style="magenta"))
            facts += [Text(f"RSS {units.size(r['rss_bytes'])}", style="dim"),
                      Text(f"{units.size(r['available_bytes'])} free", style="dim")]
            lines += fact_lines(facts, width, per_rank)
        return lines

    def _levels(self) -> list[float]:
        """Importance of each layer scaled to 0..1 by the largest; all 1 when unknown."""
        scores = (self.importance or {}).get("scores") or []
        if len(scores) != len(self.bits) or max(scores) <= 0:
            return [1.0] * len(self.bits)
        top = max(scores)
        return [max(s, 0.0) / top for s in scores]

    def _rows(self, width: int, height: int) -> Text | None:
        """A row per layer (index, importance bar, bits per weight), in as many side by side
        groups as the height needs; None when they would be too narrow."""
        n = len(self.bits)
        groups = math.ceil(n / max(height, 1))
        group_width = (width - 2 * (groups - 1)) // groups
        if group_width < MIN_ROW_WIDTH:
            return None
        per_group = math.ceil(n / groups)
        bar_width = group_width - 3 - 6
        levels = self._levels()
        text = Text()
        for row in range(per_group):
            for g in range(groups):
                i = g * per_group + row
                if i >= n:
                    break
                eighths = round(levels[i] * bar_width * 8)
                bar = "█" * (eighths // 8) + (HORIZONTAL[eighths % 8] if eighths % 8 else "")
                style = bits_style(self.bits[i])
                changed = i in self.changed
                text.append("  " if g else "")
                text.append(f"{i:>2} ", style="bold" if changed else "dim")
                text.append(f"{bar:<{bar_width}}", style=style)
                text.append(f" {self.bits[i]:5.2f}", style=f"{style} bold reverse" if changed else style)
            if row < per_group - 1:
                text.append("\n")
        return text

    def _columns(self, width: int, height: int) -> Text:
        """Blocks of one column per layer (up to 3 cells wide): importance bars of at most
        ``MAX_BAR_ROWS`` rows, then the bits (whole bits per weight) and every fifth
        layer's index."""
        n = len(self.bits)
        cell = max(1, min(3, width // n))
        bar = cell - 1 if cell > 1 else 1  # a gap between columns when there is room
        per_block = max(width // cell, 1)
        blocks = [range(s, min(s + per_block, n)) for s in range(0, n, per_block)]
        bar_rows = min(max(height // len(blocks) - 2, 1), MAX_BAR_ROWS)
        levels = self._levels()
        gap = " " * (cell - bar)
        text = Text()
        for b, block in enumerate(blocks):
            for row in range(bar_rows):
                floor = (bar_rows - 1 - row) / bar_rows
                for i in block:
                    eighths = round(min(max((levels[i] - floor) * bar_rows, 0.0), 1.0) * 8)
                    text.append(VERTICAL[eighths] * bar, style=bits_style(self.bits[i]))
                    text.append(gap)
                text.append("\n")
            for i in block:
                digit = "F" if self.bits[i] >= 12 else str(min(int(self.bits[i] + 1e-9), 9))
                style = bits_style(self.bits[i]) + (" bold reverse" if i in self.changed else "")
                text.append(digit.ljust(bar), style=style)
                text.append(gap)
            text.append("\n")
            axis = [" "] * (len(block) * cell)
            for i in block:
                if i % 5 == 0:
                    at = (i - block.start) * cell
                    label = str(i)[: len(axis) - at]
                    axis[at: at + len(label)] = label
            text.append("".join(axis), style="dim")
            if b < len(blocks) - 1:
                text.append("\n")
        return text
