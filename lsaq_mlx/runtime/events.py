"""What the engine and its displays say to each other: the surface of an engine
(``EngineProtocol``, which ``Engine`` and the tests' fake engine implement; its commands
are in ``runtime.commands``) and one event class per thing it reports, with typed fields.

Events arrive on ``engine.events`` (a queue) in the order they happen; a display
matches on their class.
"""

from concurrent.futures import Future
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
    ranks: list | None = None  # a pipeline over mlx.launch ranks: each rank's layers, plan and memory

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
    """An engine thread that owns a model: commands return at once with their own reply
    (a ``Future``: the event that answers that request, or its error); displays follow
    every event on ``events``. ``runtime.commands.EngineCommands`` implements the commands
    for both ``Engine`` and the tests' fake engine."""

    events: Queue
    messages: list[dict]

    def start(self) -> "EngineProtocol": ...
    def running(self) -> bool: ...
    def shutdown(self) -> None: ...  # ends what runs at its next token, fails what is queued
    def stop(self) -> None: ...  # stop the reply being generated, and those asked for before
    def chat(self, text: str, max_tokens: int = 512, temp: float | None = None) -> Future: ...  # ReplyDone
    def apply_plan(self, index: int, reason: str = "requested") -> Future: ...  # Swapped
    def apply_budget(self, bits_per_weight: float) -> Future: ...  # Swapped
    def set_auto(self, on: bool) -> Future: ...  # StateUpdate
    def request_state(self) -> Future: ...  # StateUpdate
    def set_system(self, text: str) -> Future: ...  # StateUpdate
    def reset(self) -> Future: ...  # StateUpdate
    def retract(self) -> Future: ...  # StateUpdate; forgets the last message (a stopped reply's prompt)
    def measure_perplexity(self, tokens: list[int], seq_len: int = 512) -> Future: ...  # PerplexityMeasured
    def complete(self, job) -> Future: ...  # a server's stateless completion; its events go to the job
