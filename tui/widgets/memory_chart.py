"""The history of available memory as a bar sparkline, with the policy's thresholds
drawn across it as horizontal lines labelled at the right."""

from dataclasses import dataclass

from rich.text import Text

from lsaq_tui import units

EIGHTHS = " ▁▂▃▄▅▆▇█"
LABEL_WIDTH = 8


@dataclass
class Threshold:
    available: float  # bytes available at which the line sits
    label: str
    style: str


def policy_thresholds(policy: dict | None) -> list[Threshold]:
    """The lines that matter to the current plan: below its own line the policy swaps
    down; above a larger plan's line (plus the hysteresis) it swaps up to that plan."""
    if not policy:
        return []
    current, plans = policy["current"], policy["plans"]
    lines = [Threshold(plans[current]["min_available"], f"↓{plans[current]['bits_per_weight']:.2f}", "red")]
    for plan in plans[current + 1:]:
        lines.append(Threshold(plan["min_available"] + policy["hysteresis"], f"↑{plan['bits_per_weight']:.2f}", "green"))
    return lines


def memory_chart(history: list[float], thresholds: list[Threshold], width: int, height: int) -> Text:
    """``history`` (bytes available, oldest first) in ``width`` x ``height`` cells."""
    columns = max(width - LABEL_WIDTH, 1)
    values = history[-columns:]
    if not values or height < 1:
        return Text("waiting for memory samples", style="dim")
    # the range covers the samples and the two lines nearest to the current plan
    near = thresholds[:2]
    lo = min(values + [t.available for t in near])
    hi = max(values + [t.available for t in near])
    pad = max((hi - lo) * 0.08, 1e6)
    lo, hi = (max(lo - pad, 0.0) if lo >= 0 else lo - pad), hi + pad
    step = (hi - lo) / height
    rows: dict[int, Threshold] = {}
    for t in thresholds:  # the first line to claim a row keeps it
        if lo <= t.available <= hi:
            rows.setdefault(min(int((hi - t.available) / step), height - 1), t)
    text = Text()
    for row in range(height):
        line = rows.get(row)
        floor = hi - (row + 1) * step  # the value at the bottom of this row
        for value in values:
            eighths = round(min(max((value - floor) / step, 0.0), 1.0) * 8)
            if eighths == 0 and line is not None:
                text.append("╌", style=line.style)
            else:
                text.append(EIGHTHS[eighths], style="cyan")
        text.append(" " * (columns - len(values)))
        if line is not None:
            text.append(f" {line.label:<{LABEL_WIDTH - 1}}", style=line.style)
        elif row == 0:
            text.append(f" {units.short_size(hi):<{LABEL_WIDTH - 1}}", style="dim")
        elif row == height - 1:
            text.append(f" {units.short_size(lo):<{LABEL_WIDTH - 1}}", style="dim")
        else:
            text.append(" " * LABEL_WIDTH)
        if row < height - 1:
            text.append("\n")
    return text
