"""The serial executor: one job at a time, on a thread of the service process.

The service loop alone talks to the ledger; an executor only runs functions and reports
how they ended (:mod:`dpypeline.executors.core`). Running the job on a thread keeps the
loop free to watch, settle, answer signals and prove health. A job past
``job_timeout`` is interrupted by raising ``JobTimeout`` inside its thread; Python can
only deliver that between bytecodes, so a task blocked inside C code (or a lock) cannot
be interrupted: the executor then reports the job as *stuck* and the service, which
cannot get that thread back, records the attempt and restarts itself.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpypeline.errors import JobTimeout
from dpypeline.executors.core import Finished

STUCK_GRACE = 10.0  # at most this long a timed-out job gets to unwind before it is stuck


def _grace(timeout: float) -> float:
    return min(STUCK_GRACE, max(1.0, timeout))


@dataclass
class _Running:
    job_id: int
    thread: threading.Thread
    started: float
    timeout: float | None
    interrupted_at: float | None = None
    result: list[Finished] = field(default_factory=list)


class SerialExecutor:
    """One job at a time, in this process. Besides the core it has deadlines
    (``Timeouts``), a thread that can ignore them (``Sticks``) and ``interrupt``."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake
        self._running: _Running | None = None

    def capacity(self) -> int:
        return 0 if self._running is not None else 1

    def submit(self, job_id: int, fn: Callable[[], Any], timeout: float | None, now: float) -> None:
        if self._running is not None:
            raise RuntimeError("the serial executor runs one job at a time")
        result: list[Finished] = []

        def target() -> None:
            t0 = time.perf_counter()
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the loop, which classifies it
                result.append(Finished.of(job_id, exc, time.perf_counter() - t0))
            else:
                result.append(Finished.of(job_id, None, time.perf_counter() - t0))
            finally:
                self._wake.set()

        thread = threading.Thread(target=target, name=f"dpypeline-job-{job_id}", daemon=True)
        self._running = _Running(job_id, thread, now, timeout, result=result)
        thread.start()

    def completed(self) -> list[Finished]:
        r = self._running
        if r is None or (r.thread.is_alive() and not r.result):
            return []  # a result is in before the wake-up call, while the thread still ends
        self._running = None
        return r.result or [Finished.of(r.job_id, RuntimeError("the job thread vanished"))]

    def next_deadline(self) -> float | None:
        r = self._running
        if r is None or r.timeout is None:
            return None
        if r.interrupted_at is None:
            return r.started + r.timeout
        return r.interrupted_at + _grace(r.timeout)

    def enforce_timeouts(self, now: float) -> None:
        """Interrupt the job once it is past its timeout."""
        r = self._running
        if r is None or r.timeout is None or now < r.started + r.timeout:
            return
        if r.interrupted_at is None:
            r.interrupted_at = now
            _raise_in_thread(r.thread, JobTimeout)

    def stuck(self, now: float) -> list[int]:
        """The job, if it has ignored its interruption for longer than its grace."""
        r = self._running
        if r is None or r.timeout is None or r.interrupted_at is None:
            return []
        return [r.job_id] if now >= r.interrupted_at + _grace(r.timeout) else []

    def is_overdue(self, now: float) -> bool:
        r = self._running
        return bool(
            r and r.timeout is not None and now >= r.started + r.timeout + _grace(r.timeout)
        )

    def interrupt(self) -> None:
        """Stop the running job now (a second stop signal)."""
        if self._running is not None:
            _raise_in_thread(self._running.thread, JobTimeout)

    def close(self) -> None:
        self._running = None


def _raise_in_thread(thread: threading.Thread, exc: type[BaseException]) -> None:
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(exc)
        )
