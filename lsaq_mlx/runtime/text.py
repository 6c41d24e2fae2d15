"""Text a user typed or piped, made safe to keep in a conversation."""


def valid_text(line: str) -> str:
    """``line`` with what is not text (undecodable input bytes, lone surrogates) as U+FFFD,
    so no message can make the conversation untokenizable or unsavable."""
    try:
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return line.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
