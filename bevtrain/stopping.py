"""Stopping a run on request: SIGINT/SIGTERM handling, the exit they end with, and test signals.

A signal is only recorded; the training loop acts on it at safe points (README "Never lose a run"),
so nothing is cut midway: not a checkpoint being written, not an optimiser update.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Dict


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
    stop. The handler only records the first signal and never raises, so a second signal changes
    nothing. Loader workers ignore both (data.dataset._worker_init)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns it
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

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


class TestSignal:
    """``BEVTRAIN_TEST_SIGNAL=point:step:index:SIGNAME`` sends SIGNAME once, at an exact point of the
    loop, to this process's group (this process alone unless it leads its group), so tests can
    interrupt where they mean to. Points: ``micro`` (before micro-batch ``index`` of step ``step``,
    steps counted from 1 as logged), ``update`` (before the optimiser update of ``step``), ``val``
    (before val batch ``index`` of the validation at ``step``), ``save`` (as the checkpoint of
    ``step`` starts being written)."""

    __test__ = False  # not a pytest test class

    def __init__(self, spec: str | None = None):
        spec = os.environ.get("BEVTRAIN_TEST_SIGNAL", "") if spec is None else spec
        self.when = self.sig = None
        if spec:
            try:
                point, step, index, name = spec.split(":")
                self.when, self.sig = (point, int(step), int(index)), signal.Signals[name]
            except (ValueError, KeyError):
                raise ValueError(
                    f"BEVTRAIN_TEST_SIGNAL={spec!r}: expected point:step:index:SIGNAME, "
                    f"e.g. micro:3:1:SIGTERM"
                ) from None

    def __call__(self, point: str, step: int, index: int = 0) -> None:
        if self.when == (point, step, index):
            self.when = None
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), self.sig)
            else:
                os.kill(os.getpid(), self.sig)
