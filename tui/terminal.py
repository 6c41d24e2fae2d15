"""Giving the terminal back when the process must end at once (a pipeline's rank failed
while the UI held the screen)."""

import sys

# mouse reporting off, cursor shown, the main screen back
RESET = "\x1b[?1000l\x1b[?1003l\x1b[?1006l\x1b[?1015l\x1b[?25h\x1b[?1049l"


def terminal_restorer():
    """A callable that puts the terminal back as it is now (its modes, the main screen)."""
    try:
        import termios

        fd = sys.__stdin__.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):  # not a terminal, or not POSIX
        saved = None

    def restore() -> None:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        sys.__stdout__.write(RESET)
        sys.__stdout__.flush()

    return restore
