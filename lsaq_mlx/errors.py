"""Errors a user can cause: reported as one line and exit status 1, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (missing file, bad budget, unsupported model...).

    The CLI prints ``error: <message>`` and exits with status 1.
    """
