"""The app: chat on the left; memory, layers and the swap log on the right.

The engine (``lsaq_mlx.runtime.Engine``, or anything with its command/event interface)
is started by the caller; the app sends it commands and shows its events. Every MLX
operation runs on the engine's thread, so the interface keeps answering during a swap;
``stalls`` records, for every swap, the longest time the UI loop could not run.
"""

import time

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header

from lsaq_tui.commands import RuntimeCommands
from lsaq_tui.engine_link import EngineEvent, EngineLink
from lsaq_tui.stall import StallMeter
from lsaq_tui.widgets.chat_panel import ChatPanel
from lsaq_tui.widgets.layers_panel import LayersPanel
from lsaq_tui.widgets.memory_panel import MemoryPanel
from lsaq_tui.widgets.plan_picker import PlanPicker
from lsaq_tui.widgets.prompt_input import PromptInput
from lsaq_tui.widgets.swap_log import SwapLog

STALL_SETTLE = 0.3  # seconds after a swap before its longest stall is read


class LsaqApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "lsaq-mlx"
    COMMANDS = App.COMMANDS | {RuntimeCommands}
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("escape", "stop_reply", "Stop reply"),
        Binding("f2", "choose_plan", "Plan"),
        Binding("f3", "toggle_auto", "Auto"),
        Binding("f4", "smaller", "Smaller"),
        Binding("f5", "larger", "Larger"),
    ]

    def __init__(self, engine, model_name: str = "", max_tokens: int = 512):
        super().__init__()
        self.link = EngineLink(engine, self)
        self.model_name, self.max_tokens = model_name, max_tokens
        self.auto = False
        self.plans: list[dict] = []  # the PlanSet, smallest first: bits_per_weight, bytes
        self.plan_index: int | None = None
        self.bits_per_weight: float | None = None
        self.since = time.time()  # the engine's clock at ready: swap times count from it
        self.generating = False
        self.prompt_text = ""  # the prompt of the reply streaming now
        self.taking_back = False  # Esc: the stopped reply's prompt goes back to the input
        self.meter = StallMeter()
        self.stalls: list[tuple[dict, float]] = []  # (swapped event, longest UI stall in seconds)
        self.error: str | None = None  # why the engine stopped, when it did

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            yield ChatPanel(id="chat")
            with Vertical(id="side"):
                yield MemoryPanel(id="memory")
                yield LayersPanel(id="layers")
                yield SwapLog(id="swaps")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.model_name
        self.set_interval(self.meter.interval, self.meter.tick)
        self.query_one(PromptInput).focus()
        self.link.open()

    def on_unmount(self) -> None:
        self.link.close()

    # ---- engine events ----
    async def on_engine_event(self, message: EngineEvent) -> None:
        kind, data = message.kind, message.data
        if kind in ("ready", "stats"):
            if kind == "ready":
                self.since = data.get("at", self.since)
            self._show_state(data)
        elif kind == "memory":
            memory = self.query_one(MemoryPanel)
            memory.set_policy(data.get("policy"))
            memory.add_sample(data)
        elif kind == "token":
            await self.query_one(ChatPanel).append(data["text"])
        elif kind == "done":
            await self._reply_done(data)
        elif kind == "swapped":
            self._show_state(data)
            self.query_one(SwapLog).add(data, self.since)
            received = time.monotonic()
            self.set_timer(STALL_SETTLE, lambda: self.stalls.append(
                (data, self.meter.longest(since=received - data["seconds"] - self.meter.interval))))
        elif kind == "note":
            self.query_one(ChatPanel).note(data["message"], style="yellow")
            self.notify(data["message"], severity="warning", timeout=8)
        elif kind == "error":
            await self._engine_error(data)

    def _show_state(self, data: dict) -> None:
        """Plan, layers, auto mode and policy from a ready, stats or swapped event."""
        if "layer_bits" in data:
            self.query_one(LayersPanel).update_plan(data)
        if data.get("policy"):
            self.plans = data["policy"]["plans"]
            self.query_one(MemoryPanel).set_policy(data["policy"])
        if data.get("memory") and data["memory"].get("available_bytes") is not None and not self.query_one(MemoryPanel).history:
            self.query_one(MemoryPanel).add_sample(data["memory"])
        self.auto = data.get("auto", self.auto)
        self.plan_index = data.get("plan_index", self.plan_index)
        self.bits_per_weight = data.get("bits_per_weight", self.bits_per_weight)
        bpw = f" · {self.bits_per_weight:.2f} bits/weight" if self.bits_per_weight else ""
        self.sub_title = f"{self.model_name}{bpw} · auto {'on' if self.auto else 'off'}"

    async def _reply_done(self, data: dict) -> None:
        chat = self.query_one(ChatPanel)
        if self.taking_back and data.get("stopped"):
            self.link.send("retract")
            await chat.take_back(self.prompt_text)
        else:
            await chat.finish(data)
        self.generating = self.taking_back = False

    async def _engine_error(self, data: dict) -> None:
        if data.get("fatal"):
            self.error = data["message"]
            self.exit(return_code=1)
            return
        if data.get("command") == "chat" and self.generating:
            await self.query_one(ChatPanel).finish_failed()
            self.generating = False
        self.query_one(ChatPanel).note(f"error: {data['message']}", style="red")
        self.notify(data["message"], severity="error", timeout=8)

    # ---- input ----
    async def on_prompt_input_submitted(self, message: PromptInput.Submitted) -> None:
        text = message.text
        if self.generating:
            self.notify("a reply is streaming: Esc stops it", severity="warning")
            return
        prompt = self.query_one(PromptInput)
        prompt.remember(text)
        prompt.clear()
        self.generating, self.prompt_text, self.taking_back = True, text, False
        await self.query_one(ChatPanel).ask(text)
        self.link.send("chat", text, self.max_tokens)

    # ---- actions ----
    def action_stop_reply(self) -> None:
        if self.generating:
            self.taking_back = True
            self.link.stop_reply()

    def action_toggle_auto(self) -> None:
        if not self.plans:
            self.notify("automatic mode needs a plan set: start with --auto or --memory-trace", severity="warning")
            return
        self.link.send("auto", not self.auto)

    def action_choose_plan(self) -> None:
        self.push_screen(PlanPicker(self.plans, self.plan_index), self._picked)

    def _picked(self, choice: int | float | None) -> None:
        if isinstance(choice, int):
            self.swap_to(choice)
        elif isinstance(choice, float):
            if self.auto:
                self.link.send("auto", False)
            self.link.send("apply_budget", choice)
            self.notify(f"planning {choice:g} bits per weight…")

    def swap_to(self, index: int) -> None:
        """Force plan ``index`` of the PlanSet (automatic mode would move away from it)."""
        if self.auto:
            self.link.send("auto", False)
        self.link.send("apply_plan", index, "chosen by hand")
        self.notify(f"swapping to {self.plans[index]['bits_per_weight']:.2f} bits/weight…")

    def _step(self, step: int) -> None:
        if not self.plans or self.plan_index is None:
            self.notify("no plan set to step through: start with --auto or --memory-trace", severity="warning")
            return
        target = self.plan_index + step
        if 0 <= target < len(self.plans):
            self.swap_to(target)
        else:
            self.notify("already at the " + ("smallest" if step < 0 else "largest") + " plan")

    def action_smaller(self) -> None:
        self._step(-1)

    def action_larger(self) -> None:
        self._step(+1)

    async def action_reset(self) -> None:
        if self.generating:
            self.notify("a reply is streaming: Esc stops it", severity="warning")
            return
        self.link.send("reset")
        await self.query_one(ChatPanel).clear()
