"""The engine's events as Textual messages, one class per event, so the app handles
each with ``@on``. ``message_for`` wraps an event of ``lsaq_mlx.runtime.events``."""

from textual.message import Message

from lsaq_mlx.runtime import events


class EngineMessage(Message):
    def __init__(self, event):
        super().__init__()
        self.event = event


class EngineReady(EngineMessage):
    pass


class TokenArrived(EngineMessage):
    pass


class ReplyFinished(EngineMessage):
    pass


class PlanSwapped(EngineMessage):
    pass


class StateChanged(EngineMessage):
    pass


class MemorySampled(EngineMessage):
    pass


class EngineNoted(EngineMessage):
    pass


class EngineFailed(EngineMessage):
    pass


_MESSAGES = {
    events.Ready: EngineReady, events.Token: TokenArrived, events.ReplyDone: ReplyFinished,
    events.Swapped: PlanSwapped, events.StateUpdate: StateChanged, events.MemoryUpdate: MemorySampled,
    events.Note: EngineNoted, events.EngineError: EngineFailed,
}


def message_for(event) -> EngineMessage | None:
    kind = _MESSAGES.get(type(event))
    return kind(event) if kind else None
