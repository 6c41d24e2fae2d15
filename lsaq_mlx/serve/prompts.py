"""How long a prompt is, found with work bounded by the model's context.

Tokenizing an 8 MB prompt whole takes seconds and over a GB of memory before it can be
refused. Instead the text is tokenized in pieces cut before whitespace, counting until
the count reaches the context: a prompt that fits is tokenized about twice, one that does
not stops early. A cut can split at most one token in two, so each piece counts one less:
the sum is a lower bound on the tokens of the whole text.
"""

PIECE_CHARS = 16 << 10


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
