"""Progress reporting: a bar on a terminal, plain timestamped lines in a batch log.

Cluster logs are files; a carriage-return progress bar turns them into one unreadable line,
so off a terminal we print a line at most every `every` seconds instead.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "rows", every: float = 10.0, enabled: bool = True):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.t0, self.last = 0, time.monotonic(), 0.0
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            t = time.monotonic()
            if t - self.last >= self.every or self.n >= self.total:
                self.last = t
                rate = self.n / max(t - self.t0, 1e-9)
                print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def say(msg: str) -> None:
    """A status line for the user (stderr, so stdout stays parseable)."""
    print(msg, file=sys.stderr, flush=True)
