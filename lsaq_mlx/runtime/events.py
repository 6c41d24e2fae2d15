"""What the engine and its displays say to each other: the commands an engine takes
(``EngineProtocol``, which ``Engine`` and the tests' fake engine implement) and one
event class per thing it reports, with typed fields.

Events arrive on ``engine.events`` (a queue) in the order they happen; a display
matches on their class.
"""

from dataclasses import asdict, dataclass, field
from queue import Queue
from typing import Protocol


@dataclass(frozen=True)
class EngineState:
    """What a display shows of the engine: the plan, memory, layers, the last reply."""

    method: str  # the plan's method, or "as loaded"
    bits_per_weight: float | None
    weight_bytes: int
    plan_index: int | None  # in the plan set (smallest first), when automatic mode has one
    auto: bool
    messages: int = 0
    cached_tokens: int = 0
    mlx_active_bytes: int = 0
    mlx_peak_bytes: int = 0
    memory: dict = field(default_factory=dict)  # the last MemorySample, as a dict
    layers: dict = field(default_factory=dict)  # "3" / "rest" -> {module ("mlp.down_proj"): its choice label}
    layer_bits: dict = field(default_factory=dict)  # {"layers": [bits of layer i], "other": bits}
    last_reply: dict = field(default_factory=dict)
    importance: dict | None = None  # {"metric", "scores"}
    policy: dict | None = None  # Policy.describe()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReplyStats:
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_bytes: int
    stopped: bool
    first_token_seconds: float
    bits_per_weight: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Ready:
    state: EngineState
    at: float  # time.time() when the engine was ready


@dataclass(frozen=True)
class Token:
    text: str


@dataclass(frozen=True)
class ReplyDone:
    text: str
    stats: ReplyStats


@dataclass(frozen=True)
class Swapped:
    """A plan change finished (every layer swapped, or some failed and kept their weights)."""

    changed: int  # modules swapped
    failed: dict  # path -> why
    seconds: float
    source_bytes_read: int
    store_bytes_read: int
    from_bits_per_weight: float | None
    reason: str
    at: float
    memory_before: dict
    memory_after: dict
    state: EngineState


@dataclass(frozen=True)
class StateUpdate:
    state: EngineState


@dataclass(frozen=True)
class MemoryUpdate:
    sample: dict  # a MemorySample, as a dict
    policy: dict | None


@dataclass(frozen=True)
class Note:
    message: str


@dataclass(frozen=True)
class EngineError:
    message: str
    command: str | None = None
    fatal: bool = False  # the engine stopped


@dataclass(frozen=True)
class PerplexityMeasured:
    result: dict


Event = Ready | Token | ReplyDone | Swapped | StateUpdate | MemoryUpdate | Note | EngineError | PerplexityMeasured


class EngineProtocol(Protocol):
    """An engine thread that owns a model: commands return at once, results come as events."""

    events: Queue
    messages: list[dict]

    def start(self) -> "EngineProtocol": ...
    def shutdown(self) -> None: ...
    def stop(self) -> None: ...  # stop the reply being generated
    def chat(self, text: str, max_tokens: int = 512) -> None: ...
    def apply_plan(self, index: int, reason: str = "requested") -> None: ...
    def apply_budget(self, bits_per_weight: float) -> None: ...
    def set_auto(self, on: bool) -> None: ...
    def request_state(self) -> None: ...
    def set_system(self, text: str) -> None: ...
    def reset(self) -> None: ...
    def retract(self) -> None: ...  # forget the last message (a stopped reply's prompt)
