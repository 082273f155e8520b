"""Stopping a run on request: SIGINT/SIGTERM handling, the exit they end with, and test signals.

The first signal is acknowledged at once and recorded; the training loop acts on it at safe points
(README "Stopped early"), so nothing is cut midway: not a checkpoint being written, not an optimiser
update. A second signal stops at once (the training loop's ``on_second``). Both are seen by a watcher
thread the moment they arrive (``signal.set_wakeup_fd``), also while the main thread is inside one
long torch operation, where Python's own handlers would wait for it to return.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable, Dict


class StoppedBySignal(SystemExit):
    """SIGINT (Ctrl-C) or SIGTERM (pre-emption) stopped the run after it saved the last completed
    step (nothing is saved when no step completed). Its exit code, ``--signal_exit_code`` (default
    75, EX_TEMPFAIL), means "stopped early, resumable"; ``summary`` is what main() returns otherwise."""

    def __init__(self, summary: Dict[str, Any]):
        super().__init__(summary["exit_code"])
        self.summary = summary


class StopNow(Exception):
    """A single-process run reached a safe point after a stop signal."""


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (pre-emption; both sent to the whole process group) ask the run to
    stop. The Python handler only records the first signal and never raises. A watcher thread reads
    each signal as it arrives: it calls ``on_first(name)`` for the first (say that the run stops, and
    when) and ``on_second(name)`` for the second (stop now). Loader workers ignore both
    (data.dataset._worker_init).

    ``passed_safe_point()``, called by the loop at each safe point, times them, so that
    ``expected_wait()`` can say how long the current stretch still runs."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_first: Callable[[str], None] | None = None,
                 on_second: Callable[[str], None] | None = None):
        self.signum = None
        self.count = 0
        self.on_first, self.on_second = on_first, on_second
        self._previous: Dict[int, Any] = {}
        self._pipe = None
        self._previous_wakeup = -1
        self._last_safe: float | None = None
        self._stretches: list = []  # seconds between consecutive safe points, the last few

    def install(self) -> None:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns it
                return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._pipe = (read_fd, write_fd)
        watcher = threading.Thread(target=self._watch, args=(read_fd,), name="bevtrain-stop", daemon=True)
        watcher.start()

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def _watch(self, read_fd: int) -> None:
        wanted = {int(s) for s in self.SIGNALS}
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data or 0 in data:  # uninstall's wake-up call
                os.close(read_fd)
                return
            for signum in data:
                if signum not in wanted:
                    continue  # other signals with Python handlers (SIGCHLD) write here too
                self.count += 1
                if self.signum is None:
                    self.signum = signum
                name = signal.Signals(signum).name
                callback = self.on_first if self.count == 1 else self.on_second if self.count == 2 else None
                if callback is not None:
                    callback(name)

    def passed_safe_point(self) -> None:
        now = time.monotonic()
        if self._last_safe is not None:
            self._stretches = (self._stretches + [now - self._last_safe])[-8:]
        self._last_safe = now

    def expected_wait(self) -> tuple | None:
        """(seconds since the last safe point, the longest of the last stretches between two); None
        before the first stretch ended."""
        if not self._stretches or self._last_safe is None:
            return None
        return time.monotonic() - self._last_safe, max(self._stretches)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            read_fd, write_fd = self._pipe
            self._pipe = None
            try:
                os.write(write_fd, b"\0")  # the watcher closes the read end and ends
            except OSError:
                pass
            os.close(write_fd)


class TestSignal:
    """``BEVTRAIN_TEST_SIGNAL=point:step:index:SIGNAME`` sends SIGNAME once, at an exact point of the
    loop, to this process's group (this process alone unless it leads its group), so tests can
    interrupt where they mean to. Points: ``micro`` (before micro-batch ``index`` of step ``step``,
    steps counted from 1 as logged), ``forward`` (micro-batch ``index`` loaded, before its forward),
    ``update`` (before the optimiser update of ``step``), ``val`` (before val batch ``index`` of the
    validation at ``step``), ``save`` (as the checkpoint of ``step`` starts being written).
    ``STALL<seconds>`` instead of a signal name makes the main thread sleep there (a step that takes
    long), after printing ``[test] stalling``."""

    __test__ = False  # not a pytest test class

    def __init__(self, spec: str | None = None):
        spec = os.environ.get("BEVTRAIN_TEST_SIGNAL", "") if spec is None else spec
        self.when = self.sig = None
        if spec:
            try:
                point, step, index, name = spec.split(":")
                self.when = (point, int(step), int(index))
                self.sig = float(name[5:]) if name.startswith("STALL") else signal.Signals[name]
            except (ValueError, KeyError):
                raise ValueError(
                    f"BEVTRAIN_TEST_SIGNAL={spec!r}: expected point:step:index:SIGNAME, "
                    f"e.g. micro:3:1:SIGTERM"
                ) from None

    def __call__(self, point: str, step: int, index: int = 0) -> None:
        if self.when == (point, step, index):
            self.when = None
            if isinstance(self.sig, float):
                print("[test] stalling", flush=True)
                time.sleep(self.sig)  # resumed after signal handlers run (PEP 475), as a torch op would be
                return
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), self.sig)
            else:
                os.kill(os.getpid(), self.sig)
