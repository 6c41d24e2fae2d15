"""JSON and TOML from files or bytes we did not write: size and nesting bounded, one line on failure.

Every reader of a config, plan, score file, cache entry, manifest, task line, sweep spec
or HTTP body goes through here, so a deeply nested or oversized document is refused the
same way everywhere (a ``UserError``), never a ``RecursionError`` traceback.
"""

import json
import sys
from pathlib import Path

from lsaq_mlx.errors import UserError

MAX_DEPTH = 64  # real configs, plans and requests nest under 10 deep
MAX_DOCUMENT_BYTES = 64 << 20  # a cost table of a 70B model's modules is a few MB


def parse_json(data: bytes | str, what: str, max_depth: int = MAX_DEPTH):
    """The JSON document in ``data`` (``what`` names it in the error)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise UserError(f"{what} nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{what} is not valid JSON: {e}") from None
    _check_depth(value, what, max_depth)
    return value


def read_json(path: Path | str, what: str | None = None, max_bytes: int = MAX_DOCUMENT_BYTES):
    """The JSON document in the file at ``path`` (UTF-8, at most ``max_bytes``)."""
    return parse_json(read_text(path, what, max_bytes), what or str(path))


def read_json_object(path: Path | str) -> dict:
    """The JSON object in the file at ``path``, or ``{}`` when it is missing, unreadable or
    not an object (optional metadata: tokenizer configs, memo files)."""
    try:
        data = read_json(path)
    except UserError:
        return {}
    return data if isinstance(data, dict) else {}


def read_toml(path: Path | str, what: str | None = None, max_bytes: int = MAX_DOCUMENT_BYTES) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    what = what or str(path)
    try:
        value = tomllib.loads(read_text(path, what, max_bytes))
    except RecursionError:
        raise UserError(f"{what} nests deeper than {MAX_DEPTH} levels") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} is not valid TOML: {e}") from None
    _check_depth(value, what, MAX_DEPTH)
    return value


def read_text(path: Path | str, what: str | None = None, max_bytes: int = MAX_DOCUMENT_BYTES,
              errors: str = "strict") -> str:
    """The UTF-8 text of the file at ``path``, refused past ``max_bytes`` before it is read
    whole; ``errors="replace"`` reads undecodable bytes as U+FFFD."""
    what = what or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise UserError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{what} is a folder, not a file") from None
    except OSError as e:
        raise UserError(f"{what}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise UserError(f"{what} is over {_size(max_bytes)}, too large for what it should hold")
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text (byte {e.start})") from None


def _check_depth(value, what: str, max_depth: int) -> None:
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(max_depth):  # level: the containers one deeper each time
        if not level:
            return
        level = [v for item in level for v in (item.values() if isinstance(item, dict) else item)
                 if isinstance(v, (dict, list))]
    if level:
        raise UserError(f"{what} nests deeper than {max_depth} levels")


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB" if n >= 1 << 10 else f"{n} bytes"
