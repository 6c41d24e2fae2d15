"""Tool calls, as mlx-lm's server makes them: the request's ``tools`` go through the
model's chat template, and what the model writes between its tool-call markers (mlx-lm's
tokenizer knows them and the parser for its template) becomes OpenAI ``tool_calls``.

``ToolCallText`` splits a reply as it streams: text before a start marker is content and
may be sent at once; from a start marker on it is held, since it is a call (a piece that
could be the start of a marker waits for the next one).
"""

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("lsaq_mlx.serve")  # the server's log: a call that does not parse is its business


@dataclass(frozen=True)
class ToolCalling:
    """A model's tool-call markers and the parser of what stands between them."""

    start: str
    end: str
    parse: Callable  # (text between the markers, tools) -> {"name", "arguments"} or a list of them

    @classmethod
    def of(cls, tokenizer) -> "ToolCalling | None":
        if not getattr(tokenizer, "has_tool_calling", False) or getattr(tokenizer, "tool_parser", None) is None:
            return None
        return cls(tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser)


class ToolCallText:
    def __init__(self, calling: ToolCalling):
        self.calling = calling
        self.text = ""
        self.shown = 0  # characters of ``text`` given out as content

    def feed(self, piece: str) -> str:
        """The content that ``piece`` makes sure of."""
        self.text += piece
        start = self.text.find(self.calling.start)
        upto = start if start >= 0 else len(self.text) - _partial_marker(self.text, self.calling.start)
        return self._show(max(upto, self.shown))

    def finish(self, tools) -> tuple[str, list[dict]]:
        """``(the content not yet given out, the calls)``: each call's text parsed with the
        model's parser; one that does not parse (cut off by max_tokens) is left out, with
        a log line, as mlx-lm does."""
        content, calls, rest = "", [], self.text[self.shown:]
        while True:
            start = rest.find(self.calling.start)
            if start < 0:
                content += rest
                break
            content += rest[:start]
            rest = rest[start + len(self.calling.start):]
            end = rest.find(self.calling.end)
            body, rest = (rest, "") if end < 0 else (rest[:end], rest[end + len(self.calling.end):])
            calls += _parsed(self.calling, body, tools)
        self.shown = len(self.text)
        return content, calls

    def _show(self, upto: int) -> str:
        piece, self.shown = self.text[self.shown:upto], upto
        return piece


def _partial_marker(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could begin ``marker``."""
    return max((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), default=0)


def _parsed(calling: ToolCalling, body: str, tools) -> list[dict]:
    try:
        parsed = calling.parse(body.strip(), tools)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        log.warning("a tool call did not parse (%s: %s); it was likely cut off", type(e).__name__, e)
        return []
    return [_openai_call(c) for c in (parsed if isinstance(parsed, list) else [parsed]) if isinstance(c, dict)]


def _openai_call(call: dict) -> dict:
    arguments = call.get("arguments", {})
    return {"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": str(call.get("name", "")),
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                                             ensure_ascii=False)}}
