"""How singa-launch is told to stop: SIGINT (Ctrl-C), SIGTERM, SIGHUP and SIGQUIT, recorded instead of raised.

torch elastic's handler raises SignalException, and Python's default raises KeyboardInterrupt, wherever the main
thread happens to be. Raised inside the launcher's teardown, that left it half done: a KeyError traceback out of
Thread.start, or a second stop that gave processes killed a moment before no time to be reaped, which torch
reports as "did not exit after SIGKILL ... host may need to be recycled". Raised while torch loads, a library's
broad `except` could swallow it, and the job started anyway. The launcher reads these flags at the points where
it can act on them instead. It imports nothing heavy: the console command installs it before torch loads.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # torch elastic's set


class StopSignals:
    """The stop signals received so far (`received`, in order), while installed."""

    def __init__(self):
        self.received: list[int] = []
        self._saved: dict = {}

    def install(self) -> None:
        """Take the stop signals (again after torch's start_processes, which puts its own handlers in)."""
        if threading.current_thread() is not threading.main_thread():
            return  # (handlers can be set from the main thread only)
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._record)
            self._saved.setdefault(sig, previous)

    def restore(self) -> None:
        """The handlers from before install()."""
        for sig, previous in self._saved.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._saved = {}

    @property
    def first(self) -> int | None:
        return self.received[0] if self.received else None

    def _record(self, signum: int, _frame) -> None:
        self.received.append(signum)


def stopped_line(signum: int) -> str:
    return f"singa-launch: stopped by signal {signal.Signals(signum).name}"
