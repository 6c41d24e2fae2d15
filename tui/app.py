"""The app: chat on the left; memory, layers and the swap log on the right.

The engine (``lsaq_mlx.runtime.Engine``, or anything that implements
``runtime.events.EngineProtocol``) is started by the caller; the app calls its commands,
and a thread worker turns its events into messages (``lsaq_tui.messages``) that the
handlers below take with ``@on``. Every MLX operation runs on the engine's thread, so
the interface keeps answering during a swap; ``stalls`` records, for every swap, the
longest time the UI loop could not run.
"""

import queue
import time
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import Footer, Header
from textual.worker import get_current_worker

from lsaq_mlx.runtime.events import EngineState
from lsaq_tui.commands import RuntimeCommands
from lsaq_tui.messages import (
    EngineFailed,
    EngineNoted,
    EngineReady,
    MemorySampled,
    PlanSwapped,
    ReplyFinished,
    StateChanged,
    TokenArrived,
    message_for,
)
from lsaq_tui.stall import StallMeter
from lsaq_tui.widgets.chat_panel import ChatPanel
from lsaq_tui.widgets.layers_panel import LayersPanel
from lsaq_tui.widgets.memory_panel import MemoryPanel
from lsaq_tui.widgets.plan_picker import PlanPicker
from lsaq_tui.widgets.prompt_input import PromptInput
from lsaq_tui.widgets.swap_log import SwapLog

STALL_SETTLE = 0.3  # seconds after a swap before its longest stall is read


QUIT_WINDOW = 3.0  # seconds in which a second Ctrl+C quits


class LsaqApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "lsaq-mlx"
    COMMANDS = App.COMMANDS | {RuntimeCommands}
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("ctrl+c", "interrupt", "Stop / quit", show=False, priority=True),
        Binding("escape", "stop_reply", "Stop reply"),
        Binding("ctrl+r", "take_back", "Take back", show=False),
        Binding("f2", "choose_plan", "Plan"),
        Binding("f3", "toggle_auto", "Auto"),
        Binding("f4", "smaller", "Smaller"),
        Binding("f5", "larger", "Larger"),
    ]

    auto = reactive(False)
    bits_per_weight: reactive[float | None] = reactive(None)
    plan_index: reactive[int | None] = reactive(None)
    generating = reactive(False)

    def __init__(self, engine, model_name: str = "", max_tokens: int = 512):
        """``engine``, started, implements ``lsaq_mlx.runtime.events.EngineProtocol``."""
        super().__init__()
        self.engine = engine
        self.model_name, self.max_tokens = model_name, max_tokens
        self.plans: list[dict] = []  # the PlanSet, smallest first: bits_per_weight, bytes
        self.since = time.time()  # the engine's clock at ready: swap times count from it
        self.prompt_text = ""  # the prompt of the reply streaming now
        self.taking_back = False  # Ctrl+R: the stopped reply's prompt goes back to the input
        self.interrupted_at = float("-inf")  # the last Ctrl+C that stopped nothing: a second one quits
        self.meter = StallMeter()
        self.stalls: list[tuple] = []  # (Swapped event, longest UI stall in seconds)
        self.error: str | None = None  # why the engine stopped, when it did
        self._engine_closed = False

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
        self.forward_events()

    def on_unmount(self) -> None:
        self.close_engine()

    def close_engine(self) -> None:
        """Stop the reply and shut the engine down."""
        if self._engine_closed:
            return
        self._engine_closed = True
        self.engine.stop()
        self.engine.shutdown()

    @work(thread=True, exclusive=True, group="engine")
    def forward_events(self) -> None:
        """Every engine event, as its message: MLX work stays on the engine's thread."""
        worker = get_current_worker()
        while not worker.is_cancelled:  # Textual cancels the worker when the app ends
            try:
                event = self.engine.events.get(timeout=0.1)
            except queue.Empty:
                continue
            message = message_for(event)
            if message is not None:
                self.post_message(message)

    # ---- state ----
    def _subtitle(self) -> None:
        bpw = f"{self.bits_per_weight:.2f} bits/weight · " if self.bits_per_weight else ""
        # the state first: a narrow terminal clips the model's name, not the state
        self.sub_title = f"{bpw}auto {'on' if self.auto else 'off'} · {self.model_name}"

    watch_auto = watch_bits_per_weight = _subtitle

    def _show_state(self, state: EngineState) -> None:
        """Plan, layers, auto mode and policy from the engine's state."""
        self.query_one(LayersPanel).update_plan(state)
        memory = self.query_one(MemoryPanel)
        if state.policy:
            self.plans = state.policy["plans"]
            memory.set_policy(state.policy)
        if state.memory.get("available_bytes") is not None and not memory.history:
            memory.add_sample(state.memory)
        self.plan_index = state.plan_index
        self.auto, self.bits_per_weight = state.auto, state.bits_per_weight

    # ---- engine events ----
    @on(EngineReady)
    def _engine_ready(self, message: EngineReady) -> None:
        self.since = message.event.at
        self._show_state(message.event.state)

    @on(StateChanged)
    def _engine_state(self, message: StateChanged) -> None:
        self._show_state(message.event.state)

    @on(MemorySampled)
    def _engine_memory(self, message: MemorySampled) -> None:
        memory = self.query_one(MemoryPanel)
        memory.set_policy(message.event.policy)
        memory.add_sample(message.event.sample)

    @on(TokenArrived)
    async def _engine_token(self, message: TokenArrived) -> None:
        await self.query_one(ChatPanel).append(message.event.text)

    @on(ReplyFinished)
    async def _engine_reply_done(self, message: ReplyFinished) -> None:
        chat = self.query_one(ChatPanel)
        if self.taking_back and message.event.stats.stopped:
            self.engine.retract()
            await chat.take_back(self.prompt_text)
        else:
            await chat.finish(message.event.stats)
        self.generating = self.taking_back = False

    @on(PlanSwapped)
    def _engine_swapped(self, message: PlanSwapped) -> None:
        swapped = message.event
        self._show_state(swapped.state)
        self.query_one(SwapLog).add(swapped, self.since)
        received = time.monotonic()
        self.set_timer(STALL_SETTLE, lambda: self.stalls.append(
            (swapped, self.meter.longest(since=received - swapped.seconds - self.meter.interval))))

    @on(EngineNoted)
    def _engine_note(self, message: EngineNoted) -> None:
        self.query_one(ChatPanel).note(message.event.message, style="yellow")
        self.notify(message.event.message, severity="warning", timeout=8)

    @on(EngineFailed)
    async def _engine_failed(self, message: EngineFailed) -> None:
        error = message.event
        if error.fatal:
            self.error = error.message
            self.exit(return_code=1)
            return
        if error.command == "chat" and self.generating:
            await self.query_one(ChatPanel).finish_failed()
            self.generating = False
        self.query_one(ChatPanel).note(f"error: {error.message}", style="red")
        self.notify(error.message, severity="error", timeout=8)

    # ---- input ----
    @on(PromptInput.Submitted)
    async def _prompt_submitted(self, message: PromptInput.Submitted) -> None:
        text = message.text
        if self.generating:
            self.notify("a reply is streaming: Esc stops it", severity="warning")
            return
        prompt = self.query_one(PromptInput)
        prompt.remember(text)
        prompt.clear()
        self.generating, self.prompt_text, self.taking_back = True, text, False
        await self.query_one(ChatPanel).ask(text)
        self.engine.chat(text, self.max_tokens)

    # ---- actions ----
    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """Save an SVG of the screen in the working folder (Textual's default, the
        Downloads folder, is missing on many machines) and say where."""
        name = filename or f"lsaq-mlx-{time.strftime('%Y-%m-%dT%H_%M_%S')}.svg"
        folder = Path(path) if path else Path.cwd()
        try:
            saved = Path(self.save_screenshot(name, str(folder)))
        except OSError as e:
            self.notify(f"cannot save the screenshot in {folder}: {e.strerror or e}", severity="error", timeout=8)
            return
        self.notify(f"screenshot saved: {saved}", timeout=8)

    def action_stop_reply(self) -> None:
        """Esc (and Ctrl+C while a reply streams): stop it; what it said stays."""
        if self.generating:
            self.engine.stop()

    def action_take_back(self) -> None:
        """Ctrl+R: stop the reply, forget the turn and put its prompt back to edit."""
        if self.generating:
            self.taking_back = True
            self.engine.stop()

    def action_interrupt(self) -> None:
        """Ctrl+C as in a terminal chat: stops a reply; with none, a second one within
        ``QUIT_WINDOW`` seconds (or Ctrl+Q) quits."""
        if self.generating:
            return self.action_stop_reply()
        now = time.monotonic()
        if now - self.interrupted_at <= QUIT_WINDOW:
            self.exit()
            return
        self.interrupted_at = now
        self.notify("Ctrl+C again (or Ctrl+Q) quits", timeout=QUIT_WINDOW)

    def action_toggle_auto(self) -> None:
        if not self.plans:
            self.notify("automatic mode needs a plan set: start with --auto or --memory-trace", severity="warning")
            return
        self.engine.set_auto(not self.auto)

    def action_choose_plan(self) -> None:
        self.push_screen(PlanPicker(self.plans, self.plan_index), self._picked)

    def _picked(self, choice: int | float | None) -> None:
        if isinstance(choice, int):
            self.swap_to(choice)
        elif isinstance(choice, float):
            if self.auto:
                self.engine.set_auto(False)
            self.engine.apply_budget(choice)
            self.notify(f"planning {choice:g} bits per weight…")

    def swap_to(self, index: int) -> None:
        """Force plan ``index`` of the PlanSet (automatic mode would move away from it)."""
        if self.auto:
            self.engine.set_auto(False)
        self.engine.apply_plan(index, "chosen by hand")
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
        self.engine.reset()
        await self.query_one(ChatPanel).clear()
