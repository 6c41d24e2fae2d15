"""What a chat, TUI or server session runs with, as one value (``runtime.engine.build_engine`` builds its engine)."""

from dataclasses import dataclass, field
from pathlib import Path

from lsaq_mlx.errors import UserError
from lsaq_mlx.runtime.sampling import Sampling
from lsaq_mlx.scoring.registry import METRICS

DEFAULT_BUDGETS = (3.0, 3.5, 4.0, 4.5, 5.0, 6.0)


@dataclass(kw_only=True)
class RuntimeOptions:
    bits_budget: float | None = None  # the starting plan; None: the source as it is
    auto: bool = False  # follow this machine's memory through the plans of ``budgets``
    memory_trace: Path | None = None  # follow a replayed trace instead
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    method: str = "lsaq"
    reserve_bytes: int = 512 << 20  # automatic mode: memory to keep free
    layer_store: bool = False
    memory_events: bool = False  # a memory sample every second, for displays
    importance: str | None = None  # the metric displays show per layer (jaccard, cosine, zscore)
    sampling: Sampling = field(default_factory=Sampling)
    chat_template: str | None = None  # a Jinja chat template in place of the model's
    chat_template_args: dict = field(default_factory=dict)  # names the chat template reads (enable_thinking...)
    planned: object = None  # runtime.pipeline.PlannedRun: run this plan (--plan), over mlx.launch ranks if any

    def check(self) -> None:
        self.sampling.check()
        from lsaq_mlx.planning.budgets import check_bits_budget

        for b in ([self.bits_budget] if self.bits_budget is not None else []) + list(self.budgets):
            check_bits_budget(b)
        shown = [m.name for m in METRICS.values() if m.display]
        if self.importance is not None and self.importance not in shown:
            raise UserError(f"layer importance must be {', '.join(shown)} or none, not '{self.importance}'",
                            setting="importance")


def parse_budgets(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in text.split(","))
    except ValueError:
        raise UserError(f"the plans' budgets must be numbers separated by commas, got '{text}'",
                        setting="budgets") from None
