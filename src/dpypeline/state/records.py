"""A job's row as the rest of dpypeline sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dpypeline.jobstate import JobState


class FileVersionLike(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: int
    path: str
    size: int
    mtime_ns: int
    job: str
    root: str
    state: JobState
    attempts: int
    not_before: float | None
    error: str | None
    source: str
    created: float
    updated: float
    started: float | None
    finished: float | None


COLUMNS = (
    "id, path, size, mtime_ns, job, root, state, attempts, not_before, error, source,"
    " created, updated, started, finished"
)


def record(row: tuple) -> JobRecord:
    values = list(row)
    values[6] = JobState(values[6])
    return JobRecord(*values)
