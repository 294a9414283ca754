"""The one exception type users see.

Every expected failure (bad input, a mismatched cache, a missing file) raises `KDError` with a
single line that names what is wrong and what to do; the CLI prints it and exits non-zero.
Anything else is a bug and is reported as such.
"""


class KDError(Exception):
    """A user-facing error: the message is one line, printed as-is by the CLI."""
