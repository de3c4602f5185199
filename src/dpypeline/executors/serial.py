"""Executors: where a job's function runs. The service loop alone talks to the ledger;
an executor only runs functions and reports how they ended.

The serial executor runs one job at a time on a worker thread of the service process,
so the loop stays free to watch, settle, answer signals and prove health. A job past
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
from typing import Any, Protocol

from dpypeline.commits import Staged
from dpypeline.errors import JobTimeout

STUCK_GRACE = 10.0  # at most this long a timed-out job gets to unwind before it is stuck


def _grace(timeout: float) -> float:
    return min(STUCK_GRACE, max(1.0, timeout))


@dataclass
class Finished:
    job_id: int
    value: Any = None
    error: BaseException | None = None
    duration: float = 0.0


class Executor(Protocol):
    """What the worker loop needs from an executor. Every method is called from the
    service's loop thread only; an executor sets ``wake`` when a job finishes."""

    def start(self) -> None: ...
    def capacity(self) -> int: ...
    def in_flight(self) -> list[int]: ...
    def submit(self, job_id: int, call: Staged, timeout: float | None, now: float) -> None: ...
    def completed(self) -> list[Finished]: ...
    def next_deadline(self) -> float | None: ...
    def enforce_timeouts(self, now: float) -> list[int]: ...
    def is_overdue(self, now: float) -> bool: ...
    def problems(self) -> list[str]: ...
    def describe(self) -> dict[str, Any]: ...
    def interrupt(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class _Running:
    job_id: int
    thread: threading.Thread
    started: float
    timeout: float | None
    interrupted_at: float | None = None
    result: list[Finished] = field(default_factory=list)


class SerialExecutor:
    """One job at a time, in this process."""

    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake
        self._running: _Running | None = None

    def start(self) -> None:
        pass

    def problems(self) -> list[str]:
        return []

    def describe(self) -> dict[str, Any]:
        return {"kind": "serial", "slots": 1, "in_flight": len(self.in_flight())}

    def capacity(self) -> int:
        return 0 if self._running is not None else 1

    def in_flight(self) -> list[int]:
        return [self._running.job_id] if self._running is not None else []

    def submit(self, job_id: int, fn: Callable[[], Any], timeout: float | None, now: float) -> None:
        if self._running is not None:
            raise RuntimeError("the serial executor runs one job at a time")
        result: list[Finished] = []

        def target() -> None:
            t0 = time.perf_counter()
            try:
                value = fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the loop, which classifies it
                result.append(Finished(job_id, error=exc, duration=time.perf_counter() - t0))
            else:
                result.append(Finished(job_id, value=value, duration=time.perf_counter() - t0))
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
        return r.result or [Finished(r.job_id, error=RuntimeError("the job thread vanished"))]

    def next_deadline(self) -> float | None:
        r = self._running
        if r is None or r.timeout is None:
            return None
        if r.interrupted_at is None:
            return r.started + r.timeout
        return r.interrupted_at + _grace(r.timeout)

    def enforce_timeouts(self, now: float) -> list[int]:
        """Interrupt jobs past their timeout; return the ids of jobs that ignored it."""
        r = self._running
        if r is None or r.timeout is None or now < r.started + r.timeout:
            return []
        if r.interrupted_at is None:
            r.interrupted_at = now
            _raise_in_thread(r.thread, JobTimeout)
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

    def wait(self, timeout: float) -> bool:
        """Wait for the running job to end; True if none is running any more."""
        r = self._running
        if r is None:
            return True
        r.thread.join(timeout)
        return not r.thread.is_alive()

    def close(self) -> None:
        self._running = None


def _raise_in_thread(thread: threading.Thread, exc: type[BaseException]) -> None:
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(exc)
        )
