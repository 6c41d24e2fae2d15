"""What a caller asks of an engine: one frozen command per request, each with its own reply.

Any thread calls ``EngineCommands``' methods; each puts a command in the engine's
``CommandInbox`` and returns the command's ``reply`` (a ``Future``): the event that
answers that request (``ReplyDone``, ``Swapped``, ``StateUpdate``, ...) or the error it
raised. Displays still follow ``events``; a caller that needs the answer to its own
request waits on its reply, so an automatic swap can never pass for the one a ``/plan``
asked for (mlx-lm's server pairs each request with its own reply queue the same way).

The engine thread alone reads the inbox: it moves what arrived into a deque that only it
touches, so commands it defers (while a reply streams) keep their order.
"""

import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import ClassVar

from lsaq_mlx.errors import UserError
from lsaq_mlx.runtime.text import valid_text


class EngineStopped(UserError):
    """The engine has stopped: the request was not run."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Command:
    name: ClassVar[str] = "command"  # as EngineError events name it
    reply: Future = field(default_factory=Future, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True, eq=False)
class Chat(Command):
    """Reply to ``text`` in the conversation; ``cancel`` ends the reply (or skips it)."""

    name: ClassVar[str] = "chat"
    text: str
    max_tokens: int = 512
    temp: float | None = None  # overrides the sampling temperature for this reply
    cancel: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True, eq=False)
class ApplyPlan(Command):
    name: ClassVar[str] = "apply_plan"
    plan: object  # an index into the PlanSet (smallest first), or a QuantPlan
    reason: str = "requested"


@dataclass(frozen=True, kw_only=True, eq=False)
class ApplyBudget(Command):
    name: ClassVar[str] = "apply_budget"
    bits_per_weight: float


@dataclass(frozen=True, kw_only=True, eq=False)
class SetAuto(Command):
    name: ClassVar[str] = "auto"
    on: bool


@dataclass(frozen=True, kw_only=True, eq=False)
class RequestState(Command):
    name: ClassVar[str] = "state"


@dataclass(frozen=True, kw_only=True, eq=False)
class SetSystem(Command):
    name: ClassVar[str] = "system"
    text: str


@dataclass(frozen=True, kw_only=True, eq=False)
class Reset(Command):
    name: ClassVar[str] = "reset"


@dataclass(frozen=True, kw_only=True, eq=False)
class Retract(Command):
    """Forget the last user message and what followed it (a reply stopped to edit the prompt)."""

    name: ClassVar[str] = "retract"


@dataclass(frozen=True, kw_only=True, eq=False)
class Evaluate(Command):
    name: ClassVar[str] = "evaluate"
    tokens: list
    seq_len: int = 512


@dataclass(frozen=True, kw_only=True, eq=False)
class Complete(Command):
    """A stateless completion (a server request); its events go to the completion itself."""

    name: ClassVar[str] = "complete"
    job: object  # runtime.completion.Completion


IMMEDIATE = (ApplyPlan, ApplyBudget, SetAuto, RequestState)  # answered between the tokens of a reply


class CommandInbox:
    """Commands from any thread, in order, for the one thread that runs them."""

    def __init__(self):
        self._arrived: queue.Queue = queue.Queue()
        self._backlog: deque = deque()  # the engine thread's alone
        self.closing = threading.Event()

    # ---- any thread ----
    def put(self, command: Command) -> Future:
        if self.closing.is_set():
            command.reply.set_exception(EngineStopped("the engine is shutting down"))
        else:
            self._arrived.put(command)
        return command.reply

    def close(self) -> None:
        self.closing.set()
        self._arrived.put(None)  # wakes the engine if it waits for a command

    # ---- the engine thread ----
    def next(self, timeout: float) -> Command | None:
        """The oldest command, waiting up to ``timeout`` seconds; None if none came."""
        if self._backlog:
            return self._backlog.popleft()
        try:
            command = self._arrived.get(timeout=timeout)
        except queue.Empty:
            return None
        return command

    def take(self, wanted) -> list[Command]:
        """The commands for which ``wanted(command)``, in order; the others keep their places."""
        self._drain()
        taken = [c for c in self._backlog if wanted(c)]
        if taken:
            self._backlog = deque(c for c in self._backlog if not wanted(c))
        return taken

    def fail_all(self, error: Exception) -> None:
        """Answer every command not run with ``error`` (the engine is gone)."""
        self._drain()
        while self._backlog:
            command = self._backlog.popleft()
            if isinstance(command, Complete):
                command.job.fail(str(error))
            if not command.reply.done():
                command.reply.set_exception(error)

    def _drain(self) -> None:
        while True:
            try:
                command = self._arrived.get_nowait()
            except queue.Empty:
                return
            if command is not None:
                self._backlog.append(command)


class EngineCommands:
    """The commands of an engine, for any thread: each returns its reply. A class that
    mixes this in has an ``inbox`` (``CommandInbox``) that its engine thread serves."""

    inbox: CommandInbox

    def _init_commands(self) -> None:
        self.inbox = CommandInbox()
        self._chats: set[Chat] = set()  # replies not finished, for stop()
        self._chats_lock = threading.Lock()

    def chat(self, text: str, max_tokens: int = 512, temp: float | None = None) -> Future:
        """Reply to ``text``; ``temp`` overrides the sampling temperature for this reply."""
        command = Chat(text=valid_text(text), max_tokens=max_tokens, temp=temp)
        with self._chats_lock:
            self._chats.add(command)
        command.reply.add_done_callback(lambda _: self._forget(command))
        return self.inbox.put(command)

    def stop(self) -> None:
        """Stop the reply being generated and any reply asked for before this call (the
        conversation keeps what was said)."""
        with self._chats_lock:
            for command in self._chats:
                command.cancel.set()

    def apply_plan(self, index: int, reason: str = "requested") -> Future:
        """Swap to plan ``index`` of the plan set (smallest first); the reply is its ``Swapped``."""
        return self.inbox.put(ApplyPlan(plan=index, reason=reason))

    def apply_budget(self, bits_per_weight: float) -> Future:
        """Plan ``bits_per_weight`` and swap to it; the reply is its ``Swapped``."""
        return self.inbox.put(ApplyBudget(bits_per_weight=bits_per_weight))

    def set_auto(self, on: bool) -> Future:
        return self.inbox.put(SetAuto(on=on))

    def request_state(self) -> Future:
        return self.inbox.put(RequestState())

    def set_system(self, text: str) -> Future:
        return self.inbox.put(SetSystem(text=valid_text(text)))

    def reset(self) -> Future:
        return self.inbox.put(Reset())

    def retract(self) -> Future:
        return self.inbox.put(Retract())

    def measure_perplexity(self, tokens: list[int], seq_len: int = 512) -> Future:
        return self.inbox.put(Evaluate(tokens=tokens, seq_len=seq_len))

    def complete(self, job) -> Future:
        """Run ``job`` (a stateless completion) after the commands before it; the
        conversation is left as it is."""
        return self.inbox.put(Complete(job=job))

    def _forget(self, command: Chat) -> None:
        with self._chats_lock:
            self._chats.discard(command)
