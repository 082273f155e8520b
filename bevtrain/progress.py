"""A one-line progress bar on stderr, used by evaluation and by the synthetic-data generator.

Standard library only, so any module may use it (it sits below everything in the import flow).
On a terminal the line redraws in place (at most twice a second) with rate and ETA; when the
stream is not a terminal (a log file, CI) a full line is written once per 10 % instead, so logs
stay readable.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

REDRAW_S = 0.5  # least time between two redraws on a terminal


def _clock(seconds: float) -> str:
    if math.isinf(seconds) or math.isnan(seconds):
        return "--:--"
    return time.strftime("%H:%M:%S" if seconds >= 3600 else "%M:%S", time.gmtime(seconds))


class Progress:
    """``Progress(total, enabled, label, unit)``; ``update(done)`` or ``advance(n)``, then ``close()``."""

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        label: str = "progress",
        unit: str = "items",
        stream: TextIO | None = None,
    ):
        self.total, self.enabled, self.label, self.unit = max(1, int(total)), enabled, label, unit
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self.start = time.perf_counter()
        self.done = 0
        self._last_draw = -math.inf
        self._last_decile = -1
        self._written_done: int | None = None  # `done` shown by the last full line (not a terminal)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if not force and now - self._last_draw < REDRAW_S:
                return
        else:
            decile = int(10 * min(1.0, done / self.total))
            if force and done == self._written_done:
                return
            if not force and decile == self._last_decile:
                return
            self._last_decile, self._written_done = decile, done
        self._last_draw = now
        line = self.line(done, now - self.start)
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def line(self, done: int, elapsed: float) -> str:
        frac = min(1.0, done / self.total)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else math.inf
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        return (
            f"[{self.label}] |{bar}| {done}/{self.total} {100 * frac:5.1f}%  {rate:6.2f} {self.unit}/s"
            f"  elapsed {_clock(elapsed)}  ETA {_clock(max(0.0, eta))}"
        )

    def close(self, done: int | None = None) -> None:
        """Show the final count (once) and end the terminal line."""
        self.update(self.done if done is None else done, force=True)
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
