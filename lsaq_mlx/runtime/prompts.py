"""A completion's prompt as tokens, and how long it is, found with work bounded by the context.

Tokenizing an 8 MB prompt whole takes seconds and over a GB of memory before it can be
refused. Instead the text is tokenized in pieces cut before whitespace, counting until
the count reaches the context: a prompt that fits is tokenized about twice, one that does
not stops early. A cut can split at most one token in two, so each piece counts one less:
the sum is a lower bound on the tokens of the whole text.
"""

from lsaq_mlx.errors import UserError

PIECE_CHARS = 16 << 10


class PromptRefused(UserError):
    """A prompt that cannot run: ``param`` (``prompt`` or ``messages``) and ``code`` say why,
    as OpenAI's errors do."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def prompt_tokens(tokenizer, text: str | None, messages, context: int, tools=None, template_kwargs=None) -> list[int]:
    """The tokens of a raw ``text`` prompt or of chat ``messages`` (through the model's chat
    template, with ``tools`` where given); ``PromptRefused`` for one over ``context``
    (found before it is tokenized whole), with tools the template cannot call, or that the
    template rejects."""
    param = "prompt" if text is not None else "messages"
    texts = [text] if text is not None else [m["content"] for m in messages]
    least = 0
    for piece in texts:
        least += tokens_at_least(tokenizer, piece, context - least)
        if least >= context:
            raise PromptRefused(f"the prompt is at least {least} tokens; the model's context holds {context}", param,
                                "context_length_exceeded")
    if text is not None:
        return list(tokenizer.encode(text))
    messages = [dict(m) for m in messages]
    if tools and not getattr(tokenizer, "has_tool_calling", False):
        raise PromptRefused("this model's chat template does not call tools", "tools")
    if not tokenizer.chat_template:
        return list(tokenizer.encode("\n".join(m["content"] for m in messages)))
    try:
        extra = (template_kwargs or {}) | ({"tools": list(tools)} if tools else {})
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra))
    except Exception as e:  # the model's template rejects these messages (jinja raises its own errors)
        raise PromptRefused(f"the model's chat template rejects these messages: {e}", param) from None


def tokens_at_least(tokenizer, text: str, limit: int) -> int:
    """A lower bound on the tokens of ``text``, exact enough to compare with ``limit``;
    counting stops once it reaches ``limit``."""
    if len(text) <= PIECE_CHARS:
        return len(tokenizer.encode(text, add_special_tokens=False))
    total = 0
    for piece in _pieces(text):
        total += max(len(tokenizer.encode(piece, add_special_tokens=False)) - 1, 0)
        if total >= limit:
            break
    return total


def _pieces(text: str):
    start = 0
    while start < len(text):
        end = min(start + PIECE_CHARS, len(text))
        if end < len(text):
            space = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            end = space if space > start else end
        yield text[start:end]
        start = end
