"""A one-line progress bar with rate and ETA (evaluation, data verification)."""

from __future__ import annotations

import math
import sys
import time


class Progress:
    """A one-line progress bar with rate and ETA on stderr (a line every 10 s when not a terminal)."""

    def __init__(self, total: int, enabled: bool, label: str = "eval", unit: str = "samples"):
        self.total, self.enabled, self.label, self.unit = max(1, total), enabled, label, unit
        self.start = time.perf_counter()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        frac = min(1.0, done / self.total)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta_s = (
            "--:--"
            if math.isinf(eta)
            else time.strftime("%H:%M:%S" if eta >= 3600 else "%M:%S", time.gmtime(eta))
        )
        line = f"[{self.label}] |{bar}| {done}/{self.total} {100 * frac:5.1f}%  {rate:6.2f} {self.unit}/s"
        line += f"  ETA {eta_s}"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self, done: int) -> None:
        self.update(done, force=True)
        if self.enabled and self.tty:
            sys.stderr.write("\n")
