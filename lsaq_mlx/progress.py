"""Progress bars on stderr, so stdout stays clean for --json."""

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr = Console(stderr=True)
_active: Progress | None = None  # rich draws one live display at a time: nested bars join it


@contextmanager
def progress_bar(description: str, total: int | None):
    """Yield ``advance(n=1)``; the bar is drawn only when stderr is a terminal. A bar opened
    while another is shown becomes one more line of the same display."""
    global _active
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
