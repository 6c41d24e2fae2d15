"""An engine for fast TUI tests: the command and event interface of
``lsaq_mlx.runtime.Engine`` (``start``, ``send``, ``stop``, ``shutdown``, ``events``) with
deterministic data and no MLX: a canned reply streamed word by word, a PlanSet whose
plans are swapped between instantly, memory samples that the test pushes."""

import math
import queue
import threading
from dataclasses import dataclass

from lsaq_mlx.runtime import Event

CLOCK = 1_700_000_000.0  # the fake engine's time.time() at ready
PARAMS = 135_000_000
RESERVE, HYSTERESIS = 512 << 20, 256 << 20
TOTAL = 16_000_000_000


@dataclass
class FakeSample:
    available: int
    pressure: str = "normal"


class FakeEngine:
    def __init__(self, reply: str = "The capital of France is **Paris**.", token_delay: float = 0.0,
                 budgets=(3.0, 4.5, 6.0), layers: int = 30, auto: bool = True):
        self.reply, self.token_delay, self.layers = reply, token_delay, layers
        self.budgets = sorted(budgets)
        self.current = len(self.budgets) - 1
        self.auto = auto
        self.events: queue.Queue = queue.Queue()
        self.received: list[tuple] = []  # every command, in order
        self.messages: list[dict] = []
        self.started = self.shut_down = False
        self.swaps = 0
        self._commands: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)

    # ---- the engine's interface ----
    def start(self) -> "FakeEngine":
        self._thread.start()
        self.started = True
        self.events.put(Event("ready", {**self._stats(), "at": CLOCK}))
        return self

    def send(self, command: str, *args) -> None:
        self.received.append((command, *args))
        self._commands.put((command, args))

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("shutdown", ()))
        self._thread.join()
        self.shut_down = True

    # ---- what a test makes happen ----
    def memory(self, available: int, pressure: str = "normal", second: int = 0) -> None:
        self.events.put(Event("memory", {
            "available_bytes": available, "total_bytes": TOTAL, "pressure": pressure, "mlx_active_bytes": 84_100_000,
            "mlx_peak_bytes": 120_500_000, "mlx_cache_bytes": 4_200_000, "time": float(second),
            "rss_bytes": 812_300_000, "swap_used_bytes": 0, "swap_total_bytes": 2_000_000_000,
            "psi_some_avg10": 0.0, "policy": self._policy()}))

    def fail(self, message: str, fatal: bool = False) -> None:
        self.events.put(Event("error", {"message": message, "fatal": fatal}))

    # ---- the fake engine thread ----
    def _run(self) -> None:
        while True:
            command, args = self._commands.get()
            if command == "shutdown":
                return
            getattr(self, f"_cmd_{command}")(*args)

    def _cmd_chat(self, text: str, max_tokens: int = 512, temp: float = 0.0) -> None:
        self._stop.clear()
        self.messages.append({"role": "user", "content": text})
        words = self.reply.split(" ")
        sent, stopped = [], False
        for i, word in enumerate(words[:max_tokens]):
            piece = word if i == 0 else " " + word
            sent.append(piece)
            self.events.put(Event("token", {"text": piece}))
            if self._stop.wait(self.token_delay) if self.token_delay else self._stop.is_set():
                stopped = True
                break
        self.messages.append({"role": "assistant", "content": "".join(sent)})
        self.events.put(Event("done", {
            "text": "".join(sent), "prompt_tokens": 12, "prompt_tps": 240.0, "generation_tokens": len(sent),
            "generation_tps": 21.5, "peak_memory_gb": 0.12, "stopped": stopped, "first_token_seconds": 0.08,
            "bits_per_weight": self.budgets[self.current]}))

    def _cmd_apply_plan(self, index: int, reason: str = "requested") -> None:
        before = self.budgets[self.current]
        self.current, self.swaps = index, self.swaps + 1
        self.events.put(Event("swapped", {
            "changed": 210, "failed": {}, "seconds": 0.84, **self._plan_info(), "from_bits_per_weight": before,
            "reason": reason, "at": CLOCK + 7 * self.swaps,
            "memory_before": {"mlx_active_bytes": 84_100_000, "rss_bytes": 812_300_000},
            "memory_after": {"mlx_active_bytes": 50_500_000, "rss_bytes": 790_100_000},
            "layer_bits": self._layer_bits(), "policy": self._policy()}))

    def _cmd_apply_budget(self, budget: float) -> None:
        nearest = min(range(len(self.budgets)), key=lambda i: abs(self.budgets[i] - budget))
        self._cmd_apply_plan(nearest, f"budget {budget:g} bits/weight")

    def _cmd_auto(self, on: bool) -> None:
        self.auto = on
        self.events.put(Event("stats", self._stats()))

    def _cmd_retract(self) -> None:
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
        self.messages = self.messages[:last]
        self.events.put(Event("stats", self._stats()))

    def _cmd_reset(self) -> None:
        self.messages = []
        self.events.put(Event("stats", self._stats()))

    def _cmd_stats(self) -> None:
        self.events.put(Event("stats", self._stats()))

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

    def _stats(self) -> dict:
        return {**self._plan_info(), "auto": self.auto, "messages": len(self.messages), "cached_tokens": 0,
                "layer_bits": self._layer_bits(), "importance": {"metric": "jaccard", "scores": self.importance()},
                "policy": self._policy(), "memory": {}, "layers": {}, "last_reply": {}}
