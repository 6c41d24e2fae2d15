"""A modal screen to choose a plan of the PlanSet, or type a budget in bits per weight.
Dismissed with the plan's index (int), the budget (float), or None."""

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from lsaq_tui import units


class PlanPicker(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, plans: list[dict], current: int | None):
        super().__init__()
        self.plans, self.current = plans, current

    def compose(self) -> ComposeResult:
        options = [Option(f"{'●' if i == self.current else ' '} {p['bits_per_weight']:5.2f} bits/weight · "
                          f"{units.size(p['bytes'])}", id=str(i)) for i, p in enumerate(self.plans)]
        with Vertical(id="picker"):
            yield Label("Swap to a plan" if options else "No plan set: start with --auto or --memory-trace")
            yield OptionList(*options, id="plans")
            yield Label("or a budget, in bits per weight (planned now):")
            yield Input(placeholder="e.g. 4.25", id="budget", type="number")

    def on_mount(self) -> None:
        plans = self.query_one("#plans", OptionList)
        if self.plans:
            plans.highlighted = self.current if self.current is not None else 0
            plans.focus()
        else:
            plans.display = False
            self.query_one("#budget", Input).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            budget = float(event.value)
        except ValueError:
            self.notify("a budget is a number of bits per weight, e.g. 4.25", severity="warning")
            return
        self.dismiss(budget)
