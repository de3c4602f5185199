"""How a stop is asked for: SIGTERM/SIGINT become two flags that the loop reads.

A handler only assigns the flags: anything more is unsafe in a handler (a lock the loop
holds at that instant would never be released), and the interpreter itself wakes the loop
by writing to the wake-up descriptor (``signal.set_wakeup_fd``, see ``wakeup``). The first
signal asks for a graceful stop; any later one for a stop now.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from dpypeline.wakeup import Wakeup

Previous = tuple[dict[int, Any], int]  # the handlers and wake-up descriptor replaced


class StopSignals:
    def __init__(self, wake: Wakeup) -> None:
        self.wake = wake
        self.requested = False  # stop taking work; running jobs get stop_grace
        self.now = False  # stop now: running jobs go back to the queue

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Plain assignments, nothing else: no lock, no I/O, no logging. The wake-up byte
        was already written by the interpreter (``set_wakeup_fd``)."""
        self.now = self.requested
        self.requested = True

    def request(self) -> None:
        """A stop asked for from Python code (a thread, a test): as a signal would."""
        self.now = self.requested
        self.requested = True
        self.wake.set()

    def install(self) -> Previous | None:
        """Handle SIGTERM and SIGINT (from the main thread only; elsewhere, None)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        handlers: dict[int, Any] = {
            s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)
        }
        return handlers, signal.set_wakeup_fd(self.wake.signal_fd, warn_on_full_buffer=False)

    @staticmethod
    def restore(previous: Previous | None, *, ignore: bool = False) -> None:
        """Put back what ``install`` replaced; ``ignore``: ignore SIGTERM and SIGINT from
        now on instead (the process is about to exit and has nothing left to stop)."""
        if previous is None:
            return
        handlers, wakeup_fd = previous
        signal.set_wakeup_fd(wakeup_fd)
        for signum, handler in handlers.items():
            signal.signal(signum, signal.SIG_IGN if ignore else handler)
