"""Progress on stderr, so stdout stays clean for --json: a bar on a terminal, and plain
lines when stderr is a pipe or a log, so a piped command is never silent for minutes: a
stage that runs past ``PLAIN_FIRST`` seconds says its count and ETA then and every
``PLAIN_EVERY`` seconds, and when it is done (a quick stage, or one that fails at once,
says nothing: an error stays one line)."""

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr = Console(stderr=True)
_active: Progress | None = None  # rich draws one live display at a time: nested bars join it
PLAIN_FIRST = 1.0  # seconds a stage runs before it says anything when stderr is not a terminal
PLAIN_EVERY = 10.0  # seconds between two of its lines


@contextmanager
def progress_bar(description: str, total: int | None):
    """Yield ``advance(n=1)``; the bar is drawn only when stderr is a terminal. A bar opened
    while another is shown becomes one more line of the same display."""
    global _active
    if not stderr.is_terminal:
        with _plain_progress(description, total) as advance:
            yield advance
        return
    if _active is not None:
        outer = _active
        task = outer.add_task(description, total=total)
        try:
            yield lambda n=1: outer.advance(task, n)
        finally:
            outer.remove_task(task)
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )
    with bar:
        _active = bar
        try:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
        finally:
            _active = None


@contextmanager
def _plain_progress(description: str, total: int | None):
    start = time.monotonic()
    last, done = start - PLAIN_EVERY + PLAIN_FIRST, 0  # the first line after PLAIN_FIRST seconds

    def advance(n: int = 1) -> None:
        nonlocal last, done
        done += n
        now = time.monotonic()
        if now - last >= PLAIN_EVERY:
            last = now
            eta = (now - start) / done * (total - done) if total and done else None
            _line(f"{description}: {done:g}/{'?' if total is None else f'{total:g}'}, {now - start:.0f} s"
                  + (f", about {eta:.0f} s left" if eta is not None else ""))

    yield advance
    if time.monotonic() - start >= PLAIN_FIRST:
        _line(f"{description}: done in {time.monotonic() - start:.1f} s")


def announce(text: str) -> None:
    """A line for the person at the terminal (what is about to happen and what it costs);
    nothing when stderr is a pipe or a log, where it would only be noise before a result."""
    if stderr.is_terminal:
        _line(text)


def _line(text: str) -> None:
    stderr.print(text, markup=False, highlight=False, soft_wrap=True)
