"""Giving the terminal back when the process must end at once (a pipeline's rank failed
while the UI held the screen)."""

import os
import sys

# mouse reporting off, cursor shown, the main screen back
RESET = "\x1b[?1000l\x1b[?1003l\x1b[?1006l\x1b[?1015l\x1b[?25h\x1b[?1049l"


def terminal_restorer():
    """A callable that puts the terminal back as it is now (its modes, the main screen),
    sends whatever the UI's threads still draw to nowhere (the process is ending), and
    returns a descriptor of the terminal for a last line."""
    try:
        import termios

        fd = sys.__stdin__.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):  # not a terminal, or not POSIX
        saved = None

    def restore() -> int:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        drawn_on = sys.__stderr__.fileno()  # where Textual draws
        terminal = os.dup(drawn_on)
        os.dup2(os.open(os.devnull, os.O_WRONLY), drawn_on)  # first, so nothing the UI draws comes after the reset
        os.write(terminal, RESET.encode())
        return terminal

    return restore
