"""The memory panel: what the machine has and this process holds, and the history of
available memory against the policy's thresholds."""

from collections import deque

from rich.text import Text
from textual.widget import Widget

from lsaq_tui import units
from lsaq_tui.widgets.facts import fact_lines
from lsaq_tui.widgets.memory_chart import memory_chart, policy_thresholds

PRESSURE_STYLES = {"normal": "green", "warn": "yellow", "critical": "bold red"}
HISTORY = 240  # samples kept: wider than any terminal
CHART_ROWS = 3  # at least, when the panel is small: facts that do not fit are left out


class MemoryPanel(Widget):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sample: dict | None = None
        self.policy: dict | None = None
        self.history: deque[float] = deque(maxlen=HISTORY)
        self.border_title = "Memory"
        self.border_subtitle = "lines: swap ↓/↑ to bpw"  # what the chart's labelled lines mean

    def add_sample(self, sample: dict) -> None:
        self.sample = sample
        self.history.append(sample["available_bytes"])
        self.refresh()

    def set_policy(self, policy: dict | None) -> None:
        self.policy = policy
        self.refresh()

    def render(self) -> Text:
        width, height = self.content_size.width, self.content_size.height
        if self.sample is None:
            return Text("waiting for memory samples", style="dim")
        lines = fact_lines(self._facts(), width, max(height - CHART_ROWS, 1))
        text = Text("\n").join(lines)
        chart_height = height - len(lines)
        if chart_height >= 2:
            text.append("\n")
            text.append(memory_chart(list(self.history), policy_thresholds(self.policy), width, chart_height))
        return text

    def _facts(self) -> list[Text]:
        """Most important first."""
        s = self.sample
        total, available = s["total_bytes"], s["available_bytes"]
        pressure = Text.assemble((s["pressure"], PRESSURE_STYLES.get(s["pressure"], "dim")), " pressure")
        if s.get("psi_some_avg10") is not None:
            pressure.append(f" (PSI {s['psi_some_avg10']:.1f}%)")
        swap = (f"swap {units.size(s.get('swap_used_bytes'))}/{units.size(s['swap_total_bytes'])}"
                if s.get("swap_total_bytes") else "no swap")
        return [
            Text.assemble("free ", (units.size(available), "bold cyan"), f" of {units.size(total)}"),
            pressure,
            Text.assemble("MLX ", (units.size(s["mlx_active_bytes"]), "bold"), f" (peak {units.size(s['mlx_peak_bytes'])})"),
            Text(f"RSS {units.size(s.get('rss_bytes'))}"),
            Text(swap),
            Text(f"used {units.size(total - available)}"),
            Text(f"MLX cache {units.size(s['mlx_cache_bytes'])}"),
        ]
