"""What the loop needs of an executor, and how a job it ran ended.

The core is four methods (``Executor``): take a job, hand back the ones that ended, say
how many more it takes, close. Anything else an executor can do is an ability of its own
(a small protocol beside the core), which the loop looks for once, when it is given the
executor: an executor that has no deadlines, no thread that can get stuck or nothing to
report leaves those methods out instead of carrying no-ops.

Every method is called from the service's loop thread and answers from what the
executor already knows: none waits on a scheduler or a job (a cluster is asked on the
executor's own thread, and a finished job sets the loop's wake event). ``start`` alone
may take long: it runs before the loop does.

A finished job's outcome is a type, decided where the executor hands the job back:
``Done``, ``Failed`` (the error, for the worker to classify), ``Paused`` (a service the
job needs is down: no attempt spent, no job starts for a while) and ``Withdrawn`` (taken
back before its commit because an earlier job of its append store failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from dpypeline.commits import Staged
from dpypeline.errors import Unavailable


@dataclass(frozen=True, slots=True)
class Done:
    """The job ran to its end."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The job raised: the worker decides what that means (retry, dead, skipped)."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class Paused:
    """A service the job needs is down: the job goes back to the head of the queue with its
    attempt refunded, and the loop pauses new jobs."""

    outage: Unavailable


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """Taken back before its commit: job ``behind``, an earlier one of the same append
    store, failed. Back to the queue without spending an attempt, held behind it."""

    behind: int


Outcome = Done | Failed | Paused | Withdrawn


@dataclass(slots=True)
class Finished:
    job_id: int
    outcome: Outcome = Done()
    duration: float = 0.0

    @classmethod
    def of(cls, job_id: int, error: BaseException | None, duration: float = 0.0) -> Finished:
        """How a job that returned (``error`` None) or raised ``error`` ended."""
        if error is None:
            return cls(job_id, Done(), duration)
        if isinstance(error, Unavailable):
            return cls(job_id, Paused(error), duration)
        return cls(job_id, Failed(error), duration)

    @property
    def error(self) -> BaseException | None:
        """What the job raised, if it ended that way (an outage included)."""
        match self.outcome:
            case Failed(error=error):
                return error
            case Paused(outage=outage):
                return outage
        return None


class Executor(Protocol):
    """The core: what every executor does, and all the loop needs to run jobs."""

    def submit(self, job_id: int, call: Staged, timeout: float | None, now: float) -> None: ...
    def completed(self) -> list[Finished]: ...
    def capacity(self) -> int: ...
    def close(self) -> None: ...


@runtime_checkable
class Starts(Protocol):
    """Has something to bring up before the first job (a cluster); closes what it made
    and re-raises when that fails."""

    def start(self) -> None: ...


@runtime_checkable
class Timeouts(Protocol):
    """Interrupts a job past its ``timeout`` once the loop says the time has come; the
    attempt comes back through ``completed`` as a ``JobTimeout``."""

    def next_deadline(self) -> float | None: ...
    def enforce_timeouts(self, now: float) -> None: ...


@runtime_checkable
class Sticks(Protocol):
    """Runs jobs on threads it cannot take back: a job may ignore its interruption, and
    only a restart of the process reclaims its thread."""

    def stuck(self, now: float) -> list[int]: ...
    def is_overdue(self, now: float) -> bool: ...


@runtime_checkable
class Interrupts(Protocol):
    """Can drop every running job at once (a second stop signal; they were put back)."""

    def interrupt(self) -> None: ...


@runtime_checkable
class Reports(Protocol):
    """Has a health and a status of its own (a cluster's workers, its address)."""

    def problems(self) -> list[str]: ...
    def describe(self) -> dict[str, Any]: ...
