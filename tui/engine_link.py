"""The bridge from the engine thread to the app: a thread reads the engine's events and
posts each one to the app as a message (Textual's ``post_message`` is thread safe), so
the UI loop never waits on the engine."""

import queue
import threading

from textual.message import Message
from textual.message_pump import MessagePump


class EngineEvent(Message):
    def __init__(self, kind: str, data: dict):
        super().__init__()
        self.kind, self.data = kind, data


class EngineLink:
    """Commands go straight to the engine; events come back as ``EngineEvent``s. The
    engine is started; ``close`` stops the reply being generated and shuts it down."""

    def __init__(self, engine, target: MessagePump):
        self.engine, self.target = engine, target
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._forward, name="lsaq-tui-events", daemon=True)

    def open(self) -> None:
        self._thread.start()

    def send(self, command: str, *args) -> None:
        self.engine.send(command, *args)

    def stop_reply(self) -> None:
        self.engine.stop()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.engine.stop()
        self.engine.shutdown()
        if self._thread.is_alive():
            self._thread.join()

    def _forward(self) -> None:
        while not self._closed.is_set():
            try:
                event = self.engine.events.get(timeout=0.05)
            except queue.Empty:
                continue
            self.target.post_message(EngineEvent(event.kind, event.data))
