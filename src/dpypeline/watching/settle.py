"""Deciding when a file is complete: the settle tracker.

A pure state machine fed by the service loop (never by the observer thread): notes in,
stable file versions out. A candidate is *eligible* once it was closed after writing,
moved into place, found by a scan, or seen by a poller (where no close event exists);
it is *stable* once its (size, mtime) stayed the same for its watch's ``settle`` time
and no process holds it open for writing (asked of the kernel when the settle time ends:
:func:`~dpypeline.watching.fsinfo.open_for_writing`). A file still open is looked at again
later, however long its writer pauses, and a file found by a scan after a restart is not
taken while the writer that was at work before it still holds it open.
A write after the close makes it ineligible again until the next close.

Deadlines live in a heap so that a loop step costs nothing for the thousands of
candidates that are not due yet (a backfill can note 100k files at once).
"""

from __future__ import annotations

import heapq
import itertools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from dpypeline.watching.fsinfo import open_for_writing

log = structlog.stdlib.get_logger("dpypeline.watch")

#: How often a file found open for writing is looked at again, at the least: a watch's
#: settle time may be zero.
RECHECK = 1.0


@dataclass(slots=True)
class _Candidate:
    root: str
    settle: float
    eligible: bool
    sig: tuple[int, int] | None
    since: float
    due: float = 0.0  # when the current settle time (or the next look at a writer) ends
    held_open: bool = False  # found open for writing (logged once)


@dataclass(frozen=True, slots=True)
class StableFile:
    root: str
    path: str
    size: int
    mtime_ns: int


Stat = Callable[[str], os.stat_result]
Writing = Callable[[str], bool | None]


class Settler:
    def __init__(self, stat_fn: Stat = os.stat, writing_fn: Writing = open_for_writing) -> None:
        self._candidates: dict[str, _Candidate] = {}
        self._due: list[tuple[float, int, str]] = []  # (deadline, order, path); may be stale
        self._order = itertools.count()
        self._stat = stat_fn
        self._writing = writing_fn

    def __len__(self) -> int:
        return len(self._candidates)

    def __contains__(self, path: str) -> bool:
        return path in self._candidates

    def note(
        self,
        path: str,
        root: str,
        settle: float,
        now: float,
        *,
        eligible: bool,
        sig: tuple[int, int] | None = None,
    ) -> None:
        """Record an observation of ``path``. ``eligible=False`` means "being written".
        An eligible note without ``sig`` stats the file now, so that the settle time
        starts at the close or rename rather than at the next poll."""
        if eligible and sig is None:
            try:
                st = self._stat(path)
            except OSError:
                self.forget(path)
                return
            sig = (st.st_size, st.st_mtime_ns)
        c = self._candidates.get(path)
        if c is None:
            c = self._candidates[path] = _Candidate(root, settle, eligible, sig, now)
        elif not eligible:
            c.eligible, c.sig, c.since = False, None, now
            return
        elif c.eligible and sig == c.sig:
            return
        else:
            c.eligible, c.sig, c.since = True, sig, now
        if c.eligible:
            c.due = now + settle
            heapq.heappush(self._due, (c.due, next(self._order), path))

    def settling(self, path: str, sig: tuple[int, int]) -> bool:
        """Whether ``path`` is settling as the version ``sig``, shown complete already."""
        c = self._candidates.get(path)
        return c is not None and c.eligible and c.sig == sig

    def quiet_for(self, path: str, now: float) -> float | None:
        """Seconds since ``path`` was last seen changing, or None if it is not tracked."""
        c = self._candidates.get(path)
        return None if c is None else now - c.since

    def forget(self, path: str) -> None:
        self._candidates.pop(path, None)

    def _is_current(self, deadline: float, path: str) -> bool:
        c = self._candidates.get(path)
        return c is not None and c.eligible and c.due == deadline

    def next_deadline(self) -> float | None:
        while self._due and not self._is_current(self._due[0][0], self._due[0][2]):
            heapq.heappop(self._due)
        return self._due[0][0] if self._due else None

    def poll(self, now: float) -> list[StableFile]:
        """Stat the candidates whose settle time has passed; return the stable ones (and
        forget them), restart the clock of those that changed, look again later at those
        a process holds open for writing, and drop those that vanished or are not regular
        files. Results keep the order they became due in."""
        stable: list[StableFile] = []
        while self._due and self._due[0][0] <= now:
            deadline, _, path = heapq.heappop(self._due)
            if not self._is_current(deadline, path):
                continue
            c = self._candidates[path]
            try:
                st = self._stat(path)
            except OSError:
                del self._candidates[path]
                continue
            if not stat.S_ISREG(st.st_mode):
                del self._candidates[path]
                continue
            sig = (st.st_size, st.st_mtime_ns)
            if sig != c.sig:
                c.sig, c.since, c.due = sig, now, now + c.settle
                heapq.heappush(self._due, (c.due, next(self._order), path))
                continue
            if self._writing(path):
                c.due = now + max(c.settle, RECHECK)
                heapq.heappush(self._due, (c.due, next(self._order), path))
                if not c.held_open:
                    c.held_open = True
                    log.info(
                        "file_open_for_writing",
                        file=path,
                        size=sig[0],
                        action="taken once its writer closes it",
                    )
                continue
            del self._candidates[path]
            stable.append(StableFile(c.root, path, sig[0], sig[1]))
        return stable
