"""How the app writes sizes and durations."""


def size(n: float | None) -> str:
    """Bytes in decimal units (as psutil's totals and the README), about 3 significant
    digits: 16.0 GB, 350 MB, 84.1 MB."""
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f} {unit}" if abs(value) < 10 else f"{value:.1f} {unit}" if abs(value) < 100 \
                else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def short_size(n: float) -> str:
    """Bytes in at most 6 characters: 11.7G, 512M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if abs(value) < 100 else f"{value:.0f}{unit}"
    return f"{n:.0f}"


def clock(seconds: float) -> str:
    """Seconds since the session started, as m:ss."""
    minutes, rest = divmod(max(int(seconds), 0), 60)
    return f"{minutes}:{rest:02d}"
