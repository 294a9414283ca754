"""The one exception type users see.

Every expected failure (bad input, a mismatched cache, a missing file) raises `KDError` with a
single line that names what is wrong and what to do; the CLI prints it and exits non-zero.
Anything else is a bug and is reported as such.

A message names the offending value but never echoes it whole: a value may be a 100k-character
text, a crafted YAML structure or a path with control characters, and a one-line error must
stay one short line (`short`).
"""

SHORT = 60


class KDError(Exception):
    """A user-facing error: the message is one line, printed as-is by the CLI."""


def short(value, limit: int = SHORT) -> str:
    """repr() of `value`, cut to about `limit` characters (newlines and other control
    characters show escaped, so the message stays on one line)."""
    if isinstance(value, (dict, list, tuple, set)):  # never walked: it may be a YAML bomb's shared tree
        text = f"<{type(value).__name__} of {len(value)} item{'s' if len(value) != 1 else ''}>"
    else:
        text = repr(value[:limit * 2] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def one_line(message: str, limit: int = 600) -> str:
    """A message as the CLI prints it: its first line, at most `limit` characters."""
    first = str(message).splitlines()[0] if str(message) else ""
    return first if len(first) <= limit else first[:limit - 1] + "…"
