"""The chat panel: the conversation (replies stream in as Markdown, each followed by its
speed and time to first token) above the prompt."""

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static

from lsaq_mlx.runtime.events import ReplyStats
from lsaq_tui.widgets.prompt_input import PromptInput


class Reply(Vertical):
    """One reply: Markdown that grows as tokens arrive, then a line of statistics."""

    def __init__(self, **kwargs):
        super().__init__(classes="reply", **kwargs)
        self.text = ""
        self.markdown = Markdown(classes="reply-text")
        self.stats = Static("…", classes="reply-stats")
        self._stream = None

    def compose(self) -> ComposeResult:
        yield self.markdown
        yield self.stats

    async def append(self, fragment: str) -> None:
        if self._stream is None:
            self._stream = Markdown.get_stream(self.markdown)
        self.text += fragment
        await self._stream.write(fragment)

    async def close_stream(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    async def finish(self, stats: ReplyStats) -> None:
        await self.close_stream()
        line = (f"{stats.generation_tokens} tokens · {stats.generation_tps:.1f} tok/s · first token "
                f"{stats.first_token_seconds:.2f} s · {stats.bits_per_weight or 0:.2f} bpw")
        self.stats.update(Text(line + (" · stopped" if stats.stopped else ""), style="dim"))


class ChatPanel(Vertical):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.border_title = "Chat"
        self.reply: Reply | None = None  # the reply streaming now
        self.prompt = PromptInput(id="prompt", placeholder="Enter sends · Ctrl+J new line")

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="messages")
        yield self.prompt

    @property
    def messages(self) -> VerticalScroll:
        return self.query_one("#messages", VerticalScroll)

    async def ask(self, text: str) -> Reply:
        """Show the user's message and an empty reply that tokens will fill."""
        self.reply = Reply()
        await self.messages.mount_all([Static(Text(text), classes="user-message"), self.reply])
        self.messages.scroll_end(animate=False)
        return self.reply

    async def append(self, fragment: str) -> None:
        if self.reply is not None:
            await self.reply.append(fragment)
            self.messages.scroll_end(animate=False)

    async def finish(self, stats: ReplyStats) -> None:
        if self.reply is not None:
            await self.reply.finish(stats)
            self.reply = None
            self.messages.scroll_end(animate=False)

    async def finish_failed(self) -> None:
        if self.reply is not None:
            await self.reply.close_stream()
            self.reply.stats.update(Text("no reply: the engine failed", style="red"))
            self.reply = None

    async def take_back(self, prompt: str) -> None:
        """Remove the last exchange (a stopped reply) and put its prompt back to edit."""
        if self.reply is not None:
            await self.reply.close_stream()
            self.reply = None
        children = list(self.messages.children)
        await self.messages.remove_children(children[-2:])
        self.prompt.put_back(prompt)

    async def clear(self) -> None:
        await self.messages.remove_children()

    def note(self, text: str, style: str = "dim") -> None:
        """A line in the conversation that is not a message (e.g. an error)."""
        self.messages.mount(Static(Text(text, style=style), classes="note"))
        self.messages.scroll_end(animate=False)
