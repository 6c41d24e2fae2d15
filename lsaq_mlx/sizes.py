"""Byte sizes: reading ``1.2GB``-style text and writing sizes for people (decimal units)."""

import re

from lsaq_mlx.errors import UserError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``1.2GB``, ``800MB``, ``1.5GiB``, ``123456`` -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise UserError(f"cannot read the size '{text}' (examples: 1.2GB, 800MB, 1.5GiB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index((m.group(2) or "B").upper()))


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}" if unit != "GB" else f"{n:.2f} GB"
        n /= 1000
