"""The one exception type a user is meant to see.

Raise `LooperError` with a short message saying what is wrong and what to do; the CLI
prints it as one line on stderr and exits 1 (a traceback only with --debug).
"""


class LooperError(Exception):
    """A problem with the user's input or environment, explained in one line."""
