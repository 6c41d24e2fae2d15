"""What the server knows of its engine, for ``GET /v1/status``: kept from the engine's
events by one thread, read by the request threads."""

import threading
import time
from collections import deque

from lsaq_mlx.runtime.events import EngineError, MemoryUpdate, Note, Ready, StateUpdate, Swapped

SWAP_LOG = 100  # the newest swaps kept
NOTES = 20


class ServerStatus:
    def __init__(self, engine, model_id: str):
        self.engine, self.model_id = engine, model_id
        self.started = time.time()
        self.state, self.memory, self.policy = None, None, None
        self.swaps: deque = deque(maxlen=SWAP_LOG)
        self.notes: deque = deque(maxlen=NOTES)
        self.requests = {"served": 0, "failed": 0, "cancelled": 0, "in_flight": 0}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._follow, name="lsaq-serve-status", daemon=True)

    def start(self) -> "ServerStatus":
        self._thread.start()
        return self

    def count(self, key: str, by: int = 1) -> None:
        with self._lock:
            self.requests[key] += by

    def snapshot(self, wait: float = 1.0) -> dict:
        """The engine's state (asked afresh, or the last known after ``wait`` seconds)."""
        try:
            fresh = self.engine.request_state().result(timeout=wait).state
        except Exception:  # busy past ``wait``, or stopped: the last known state
            fresh = None
        with self._lock:
            state = (fresh or self.state).to_dict() if (fresh or self.state) else {}
            return {"model": self.model_id, "uptime_seconds": round(time.time() - self.started, 1),
                    "plan": {k: state.get(k) for k in ("method", "bits_per_weight", "weight_bytes", "plan_index")},
                    "auto": state.get("auto"), "layers": state.get("layers"), "layer_bits": state.get("layer_bits"),
                    "memory": self.memory or state.get("memory"), "policy": self.policy or state.get("policy"),
                    "mlx_active_bytes": state.get("mlx_active_bytes"), "requests": dict(self.requests),
                    "last_reply": state.get("last_reply"), "swaps": list(self.swaps), "notes": list(self.notes),
                    "ranks": state.get("ranks")}

    def _follow(self) -> None:
        while True:
            event = self.engine.events.get()
            with self._lock:
                if isinstance(event, (Ready, StateUpdate)):
                    self.state = event.state
                elif isinstance(event, Swapped):
                    self.state = event.state
                    self.swaps.append(_swap_entry(event))
                elif isinstance(event, MemoryUpdate):
                    self.memory, self.policy = event.sample, event.policy
                elif isinstance(event, (Note, EngineError)):
                    self.notes.append({"at": time.time(), "message": event.message})


def _swap_entry(event: Swapped) -> dict:
    return {"at": event.at, "reason": event.reason, "from_bits_per_weight": event.from_bits_per_weight,
            "to_bits_per_weight": event.state.bits_per_weight, "modules_changed": event.changed,
            "failed": event.failed, "seconds": round(event.seconds, 3),
            "rss_bytes_before": event.memory_before.get("rss_bytes"),
            "rss_bytes_after": event.memory_after.get("rss_bytes")}
