"""The prompt: multi-line input (Enter sends; Shift+Enter, Ctrl+J or Alt+Enter start a new
line, pasted text keeps its lines) with the session's history on Up and Down at its
first and last line."""

from textual import events
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = ("shift+enter", "ctrl+j", "alt+enter")


class PromptInput(TextArea):
    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.prompts: list[str] = []
        self._position = 0  # index into history; len(history) = the draft being written
        self._draft = ""

    def remember(self, text: str) -> None:
        if text and (not self.prompts or self.prompts[-1] != text):
            self.prompts.append(text)
        self._position = len(self.prompts)

    def put_back(self, text: str) -> None:
        """Show ``text`` again for editing (a stopped reply's prompt)."""
        self.load_text(text)
        self.move_cursor(self.document.end)
        self._position = len(self.prompts)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text.strip()
            if text:
                self.post_message(self.Submitted(text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        row = self.cursor_location[0]
        if event.key == "up" and row == 0 and self.prompts:
            event.stop()
            event.prevent_default()
            self._recall(-1)
            return
        if event.key == "down" and row == self.document.line_count - 1 and self._position < len(self.prompts):
            event.stop()
            event.prevent_default()
            self._recall(+1)
            return
        await super()._on_key(event)

    def _recall(self, step: int) -> None:
        if self._position == len(self.prompts):
            self._draft = self.text
        self._position = min(max(self._position + step, 0), len(self.prompts))
        self.load_text(self.prompts[self._position] if self._position < len(self.prompts) else self._draft)
        self.move_cursor(self.document.end)
