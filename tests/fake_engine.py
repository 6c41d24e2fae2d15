"""An engine for fast TUI and chat tests: ``lsaq_mlx.runtime.events.EngineProtocol`` (the
commands and events of ``lsaq_mlx.runtime.Engine``) with deterministic data and no MLX:
a canned reply streamed word by word, a PlanSet whose plans are swapped between
instantly, memory samples that the test pushes."""

import math
import queue
import threading
from dataclasses import dataclass

from lsaq_mlx.runtime.commands import (
    ApplyBudget,
    ApplyPlan,
    Chat,
    EngineCommands,
    EngineStopped,
    Reset,
    Retract,
    SetAuto,
    SetSystem,
)
from lsaq_mlx.runtime.events import (
    EngineError,
    EngineState,
    MemoryUpdate,
    Ready,
    ReplyDone,
    ReplyStats,
    StateUpdate,
    Swapped,
    Token,
)

CLOCK = 1_700_000_000.0  # the fake engine's time.time() at ready
PARAMS = 135_000_000
RESERVE, HYSTERESIS = 512 << 20, 256 << 20
TOTAL = 16_000_000_000


@dataclass
class FakeSample:
    available: int
    pressure: str = "normal"


def _as_tuple(command) -> tuple:
    """``("chat", "hello", 64)``: a command as the tests compare them."""
    fields = {"chat": ("text", "max_tokens"), "apply_plan": ("plan", "reason"), "apply_budget": ("bits_per_weight",),
              "auto": ("on",), "system": ("text",), "evaluate": ("tokens", "seq_len"), "complete": ("job",)}
    return (command.name, *(getattr(command, f) for f in fields.get(command.name, ())))


class FakeEngine(EngineCommands):
    def __init__(self, reply: str = "The capital of France is **Paris**.", token_delay: float = 0.0,
                 budgets=(3.0, 4.5, 6.0), layers: int = 30, auto: bool = True):
        self.reply, self.token_delay, self.layers = reply, token_delay, layers
        self.budgets = sorted(budgets)
        self.current = len(self.budgets) - 1
        self.auto = auto
        self.events: queue.Queue = queue.Queue()
        self.received: list[tuple] = []  # every command, in order: (name, its fields...)
        self.messages: list[dict] = []
        self.started = self.shut_down = False
        self.swaps = 0
        self._init_commands()
        put = self.inbox.put
        self.inbox.put = lambda command: (self.received.append(_as_tuple(command)), put(command))[1]
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)

    # ---- the engine's interface (the commands are EngineCommands') ----
    def start(self) -> "FakeEngine":
        self._thread.start()
        self.started = True
        self.events.put(Ready(self._state(), CLOCK))
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self.inbox.close()
        self.stop()
        self._thread.join()
        self.shut_down = True

    # ---- what a test makes happen ----
    def memory(self, available: int, pressure: str = "normal", second: int = 0) -> None:
        self.events.put(MemoryUpdate({
            "available_bytes": available, "total_bytes": TOTAL, "pressure": pressure, "mlx_active_bytes": 84_100_000,
            "mlx_peak_bytes": 120_500_000, "mlx_cache_bytes": 4_200_000, "time": float(second),
            "rss_bytes": 812_300_000, "swap_used_bytes": 0, "swap_total_bytes": 2_000_000_000,
            "psi_some_avg10": 0.0}, self._policy()))

    def fail(self, message: str, fatal: bool = False) -> None:
        self.events.put(EngineError(message, fatal=fatal))

    # ---- the fake engine thread ----
    def _run(self) -> None:
        try:
            while not self.inbox.closing.is_set():
                command = self.inbox.next(timeout=0.05)
                if command is not None:
                    self._answer(command)
        finally:
            self.inbox.fail_all(EngineStopped("the engine has stopped"))

    def _answer(self, command) -> None:
        match command:
            case Chat(text=text, max_tokens=max_tokens, cancel=cancel):
                event = self._cmd_chat(text, max_tokens, cancel)
            case ApplyPlan(plan=index, reason=reason):
                event = self._cmd_apply_plan(index, reason)
            case ApplyBudget(bits_per_weight=budget):
                event = self._cmd_apply_budget(budget)
            case SetAuto(on=on):
                self.auto = on
                event = self._state_update()
            case Retract():
                last = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
                self.messages = self.messages[:last]
                event = self._state_update()
            case Reset():
                self.messages = []
                event = self._state_update()
            case SetSystem(text=text):
                self.messages = [{"role": "system", "content": text}] + [m for m in self.messages if m["role"] != "system"]
                event = self._state_update()
            case _:
                event = self._state_update()
        command.reply.set_result(event)

    def _state_update(self) -> StateUpdate:
        event = StateUpdate(self._state())
        self.events.put(event)
        return event

    def _cmd_chat(self, text: str, max_tokens: int, cancel: threading.Event) -> ReplyDone:
        self.messages.append({"role": "user", "content": text})
        words = self.reply.split(" ")
        sent, stopped = [], cancel.is_set()
        for i, word in enumerate(words[:max_tokens] if not stopped else []):
            piece = word if i == 0 else " " + word
            sent.append(piece)
            self.events.put(Token(piece))
            if cancel.wait(self.token_delay) if self.token_delay else cancel.is_set():
                stopped = True
                break
        self.messages.append({"role": "assistant", "content": "".join(sent)})
        done = ReplyDone("".join(sent), ReplyStats(12, 240.0, len(sent), 21.5, 120_000_000, stopped, 0.08,
                                                   self.budgets[self.current]))
        self.events.put(done)
        return done

    def _cmd_apply_plan(self, index: int, reason: str = "requested") -> None:
        before = self.budgets[self.current]
        self.current, self.swaps = index, self.swaps + 1
        event = Swapped(210, {}, 0.84, 0, 0, before, reason, CLOCK + 7 * self.swaps,
                        {"mlx_active_bytes": 84_100_000, "rss_bytes": 812_300_000},
                        {"mlx_active_bytes": 50_500_000, "rss_bytes": 790_100_000}, self._state())
        self.events.put(event)
        return event

    def _cmd_apply_budget(self, budget: float) -> None:
        nearest = min(range(len(self.budgets)), key=lambda i: abs(self.budgets[i] - budget))
        return self._cmd_apply_plan(nearest, f"budget {budget:g} bits/weight")

    # ---- canned data ----
    def importance(self) -> list[float]:
        return [round(0.2 + 0.8 * abs(math.cos(i / 4.0)) * (1.0 if i in (0, self.layers - 1) else 0.6), 4)
                for i in range(self.layers)]

    def _layer_bits(self) -> dict:
        """More bits for the more important layers, around the plan's budget."""
        budget, scores = self.budgets[self.current], self.importance()
        mean = sum(scores) / len(scores)
        return {"layers": [round(budget + 2 * (s - mean)) + 0.5 for s in scores], "other": budget + 1.0}

    def _plan_info(self) -> dict:
        b = self.budgets[self.current]
        return {"method": "lsaq", "bits_per_weight": b, "weight_bytes": int(b * PARAMS / 8), "plan_index": self.current}

    def _policy(self) -> dict:
        held = int(self.budgets[self.current] * PARAMS / 8)
        return {"current": self.current, "reserve": RESERVE, "hysteresis": HYSTERESIS,
                "plans": [{"bits_per_weight": b, "bytes": int(b * PARAMS / 8),
                           "min_available": int(b * PARAMS / 8) + RESERVE - held} for b in self.budgets]}

    def _state(self) -> EngineState:
        return EngineState(**self._plan_info(), auto=self.auto, messages=len(self.messages), cached_tokens=0,
                           layer_bits=self._layer_bits(), importance={"metric": "jaccard", "scores": self.importance()},
                           policy=self._policy())
