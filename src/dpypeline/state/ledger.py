"""The ledger: every job dpypeline knows of, in SQLite under CACHE_DIR.

One row per (file version, job name); a file version is (path, size, mtime). The unique
key makes "the same version never makes two jobs" a database constraint, so the
watcher, the rescan and ``dpypeline enqueue`` may all offer the same file at once.

The ledger is the source of truth. The service process also owns a ``ReadyQueue``
(persist-queue) holding the ids of the next jobs to run; ``admit`` fills it from the
ledger in order and ``recover`` rebuilds it after a crash. Other processes (the CLI) only
ever write the ledger: they set rows to ``queued`` and the service admits them.

Every state change that matters for the guarantees is one committed transaction with
``synchronous=FULL`` before the caller goes on: in particular the attempt counter is
incremented and committed *before* a job runs, so a job that crashes the process still
reaches ``dead`` after ``max_attempts``.

Paths are stored as the bytes of the file name in a TEXT column (see ``paths``): a name that
is not valid UTF-8 is a file like any other, and every path bound to a query goes through
``to_db`` and ``CAST(? AS TEXT)``.
"""

from __future__ import annotations

import os
import sqlite3
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from dpypeline.errors import StateError
from dpypeline.executors.ordering import Hold, Pending
from dpypeline.paths import from_db, shown, to_db
from dpypeline.state import holds
from dpypeline.state.cachedir import lock_service, prepare_cache_dir
from dpypeline.state.queue import DB_FILE, QueueItem, ReadyQueue

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    job TEXT NOT NULL,
    root TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    admitted INTEGER NOT NULL DEFAULT 0,
    not_before REAL,
    error TEXT,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    UNIQUE (path, size, mtime_ns, job)
);
CREATE INDEX IF NOT EXISTS jobs_retrying ON jobs (not_before) WHERE state = 'retrying';
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
"""

ADMIT_WINDOW = 256
UNKNOWN_BATCH = 20_000  # files per round through the temporary table of unknown()


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    DEAD = "dead"
    SKIPPED = "skipped"


TERMINAL = (JobState.DONE, JobState.DEAD, JobState.SKIPPED)
WAITING = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)


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


_COLUMNS = (
    "id, path, size, mtime_ns, job, root, state, attempts, not_before, error, source,"
    " created, updated, started, finished"
)


def _contains(sorted_items: list[str], item: str) -> bool:
    i = bisect_left(sorted_items, item)
    return i < len(sorted_items) and sorted_items[i] == item


def _record(row: tuple) -> JobRecord:
    values = list(row)
    values[6] = JobState(values[6])
    return JobRecord(*values)


@dataclass(frozen=True, slots=True)
class Claim:
    """A job taken to run: its record (attempts already counted) and its queue entry."""

    record: JobRecord
    item: QueueItem


@dataclass(frozen=True, slots=True)
class Recovery:
    resumed: int
    dead: int
    dead_jobs: tuple[JobRecord, ...] = field(default=(), compare=False)  # as they are now


class Ledger:
    """Job states in SQLite. ``service=True`` also locks CACHE_DIR for this process and
    opens the ready queue (persist-queue supports one process only)."""

    def __init__(self, cache_dir: Path, *, service: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        self._lock: int | None = None
        try:
            prepare_cache_dir(self.cache_dir)
            if service:
                self._lock = lock_service(self.cache_dir)
            self._db = sqlite3.connect(
                self.cache_dir / DB_FILE,
                timeout=30.0,
                isolation_level=None,
                check_same_thread=False,
            )
            self._db.text_factory = from_db  # paths come back as they are on disk
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA temp_store=MEMORY")
            self._db.executescript(SCHEMA)
            self._db.executescript(holds.SCHEMA)
            self.ready: ReadyQueue | None = ReadyQueue(self.cache_dir) if service else None
        except BaseException as exc:
            self._abandon()
            if not isinstance(exc, (OSError, sqlite3.Error)):
                raise
            raise StateError(
                f"cannot open the state database in {self.cache_dir}: {exc}. Check that the "
                "directory is writable by this user and on a local disk; to start over, stop the "
                "service and delete it (every file will be processed again)."
            ) from exc

    def _abandon(self) -> None:
        """Undo a failed open, above all the service lock: left held, it would refuse every
        later start in this process as "another dpypeline service"."""
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def close(self) -> None:
        if self.ready is not None:
            self.ready.close()
        self._db.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _queue(self) -> ReadyQueue:
        if self.ready is None:
            raise RuntimeError("the ready queue is only open in the service process")
        return self.ready

    # -- writes ---------------------------------------------------------------------------

    def enqueue(
        self,
        files: Iterable[FileVersionLike],
        root: str,
        jobs: Sequence[str],
        source: str,
        now: float,
    ) -> int:
        """Add a job per (file version, job name) unless that version is known. Returns how
        many jobs are new. Files keep the order given (ids grow in that order)."""
        root_b = to_db(root)
        rows = (
            (to_db(f.path), f.size, f.mtime_ns, job, root_b, source, now, now)
            for f in files
            for job in jobs
        )
        with self._tx() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO jobs (path, size, mtime_ns, job, root, state, source,"
                " created, updated) VALUES (CAST(? AS TEXT), ?, ?, ?, CAST(? AS TEXT), 'queued',"
                " ?, ?, ?)",
                rows,
            )
            return db.total_changes - before

    def recover(self, max_attempts: int, now: float) -> Recovery:
        """Start-up after any stop: jobs that were running run again (or go ``dead`` when
        they have used all their attempts, since they keep taking the process down), and
        the ready queue is made to match the ledger."""
        queue = self._queue()
        with self._tx() as db:
            doomed = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE state = 'running' AND attempts >= ?",
                    (max_attempts,),
                )
            ]
            db.executemany(
                "UPDATE jobs SET state = 'dead', finished = ?, updated = ?, admitted = 0,"
                " error = 'the service stopped during each of its ' || attempts || ' attempts"
                " (the task may crash or hang the process; see the log). Fix the cause, then"
                " run: dpypeline retry ' || id WHERE id = ?",
                [(now, now, job_id) for job_id in doomed],
            )
            dead_jobs = tuple(
                _record(row)
                for job_id in doomed
                for row in db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            )
            resumed = db.execute(
                "UPDATE jobs SET state = 'queued', updated = ? WHERE state = 'running'", (now,)
            ).rowcount
            pending = queue.pending_job_ids()
            admitted = [
                r[0]
                for r in db.execute("SELECT id FROM jobs WHERE state = 'queued' AND admitted = 1")
            ]
            lost = [(i,) for i in admitted if i not in pending]
            db.executemany("UPDATE jobs SET admitted = 0 WHERE id = ?", lost)
            holds.sweep(db)
        queue.prune()
        return Recovery(resumed=resumed, dead=len(dead_jobs), dead_jobs=dead_jobs)

    def promote_due(self, now: float) -> int:
        """Jobs whose backoff has passed go back to ``queued`` (to the end of the line)."""
        with self._tx() as db:
            return db.execute(
                "UPDATE jobs SET state = 'queued', admitted = 0, updated = ?"
                " WHERE state = 'retrying' AND not_before <= ?",
                (now, now),
            ).rowcount

    def admit(self, window: int = ADMIT_WINDOW) -> int:
        """Move the oldest unadmitted ``queued`` jobs into the ready queue, keeping at most
        ``window`` entries there, so ids reach the queue in ledger order. Nothing happens
        while the queue is still more than half full: admitting in batches keeps the cost
        of the ``admitted`` flag off the per-job path."""
        queue = self._queue()
        if len(queue) > window // 2:
            return 0
        room = window - len(queue)
        ids = [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' AND admitted = 0 AND NOT EXISTS"
                " (SELECT 1 FROM holds WHERE holds.job_id = jobs.id) ORDER BY id LIMIT ?",
                (room,),
            )
        ]
        for job_id in ids:
            queue.put(job_id)
        if ids:
            with self._tx() as db:
                db.executemany("UPDATE jobs SET admitted = 1 WHERE id = ?", [(i,) for i in ids])
        return len(ids)

    def claim(
        self, now: float, hold: Callable[[JobRecord], int | None] | None = None
    ) -> Claim | None:
        """Take the next ready job and count its attempt (committed before it runs).
        ``hold`` is asked first: when it names a job, the job is held behind that one
        instead (it stays queued, without an attempt counted) and the next is taken."""
        queue = self._queue()
        while (item := queue.get()) is not None:
            if hold is not None and (rec := self.get(item.job_id)) is not None:
                behind = hold(rec) if rec.state is JobState.QUEUED else None
                if behind is not None:
                    with self._tx() as db:
                        db.execute(
                            "UPDATE jobs SET admitted = 0, updated = ? WHERE id = ?", (now, rec.id)
                        )
                        holds.hold(db, rec.id, behind)
                    queue.ack(item)
                    continue
            with self._tx() as db:
                row = db.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started = ?,"
                    f" updated = ? WHERE id = ? AND state = 'queued' RETURNING {_COLUMNS}",
                    (now, now, item.job_id),
                ).fetchone()
            if row is not None:
                return Claim(record=_record(row), item=item)
            queue.ack(item)  # a stale entry: the job was finished or retried meanwhile
        return None

    def finish(
        self,
        claim: Claim,
        state: JobState,
        now: float,
        *,
        error: str | None = None,
        not_before: float | None = None,
    ) -> None:
        """Record how an attempt ended: done, retrying (with ``not_before``), dead or skipped."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, not_before = ?, finished = ?, updated = ?,"
                " admitted = 0 WHERE id = ?",
                (state.value, error and shown(error), not_before, now, now, claim.record.id),
            )
            if state in (JobState.DONE, JobState.SKIPPED):
                holds.release(db, claim.record.id)
        self._queue().ack(claim.item)

    def release(self, claim: Claim, now: float) -> None:
        """Put a job interrupted by a stop back at the head of the queue; the interrupted
        attempt is not counted against it."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', attempts = max(attempts - 1, 0), updated = ?"
                " WHERE id = ? AND state = 'running'",
                (now, claim.record.id),
            )
        self._queue().put_back_first(claim.item)

    def park(self, claim: Claim, behind: int, now: float) -> None:
        """Hold a job that was running behind ``behind`` (an earlier job of its store that
        failed): queued again, its attempt not counted, not taken until ``behind`` commits
        or is skipped."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', attempts = max(attempts - 1, 0), admitted = 0,"
                " updated = ? WHERE id = ? AND state = 'running'",
                (now, claim.record.id),
            )
            holds.hold(db, claim.record.id, behind)
        self._queue().ack(claim.item)

    def skip(self, job_id: int, now: float, note: str) -> JobRecord | None:
        """The operator accepts that a dead job will never be written: it ends ``skipped``
        with ``note`` before its last error, and the jobs held behind it may start.
        None when the job is not dead."""
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET state = 'skipped', error = ? || coalesce(error, ''),"
                " finished = ?, updated = ?, admitted = 0 WHERE id = ? AND state = 'dead'"
                f" RETURNING {_COLUMNS}",
                (note, now, now, job_id),
            ).fetchone()
            if row is not None:
                holds.release(db, job_id)
        return _record(row) if row is not None else None

    def retry(self, job_ids: Sequence[int] | None, now: float) -> int:
        """Move ``dead`` jobs (the given ids, or all with None) back to ``queued`` with a
        fresh attempt count."""
        with self._tx() as db:
            sql = (
                "UPDATE jobs SET state = 'queued', attempts = 0, admitted = 0, error = NULL,"
                " not_before = NULL, finished = NULL, updated = ? WHERE state = 'dead'"
            )
            if job_ids is None:
                return db.execute(sql, (now,)).rowcount
            return sum(db.execute(sql + " AND id = ?", (now, i)).rowcount for i in job_ids)

    def prune(
        self,
        now: float,
        retention: float,
        present: Iterable[str] | None = None,
        root: str | None = None,
    ) -> int:
        """Forget finished jobs older than ``retention`` whose version was superseded by a
        newer one or, when ``present`` (the paths on disk) is given, whose file is gone.
        The rows of files still on disk are kept: they are what stops a rescan from
        processing them again. ``root`` limits the "gone" test to the jobs of that watch
        root, for when ``present`` lists one watch only: the files of the other watches
        are not gone, and forgetting them would process them again."""
        if self.ready is not None:
            self.ready.prune()
        cutoff = now - retention
        terminal = tuple(s.value for s in TERMINAL)
        with self._tx() as db:
            removed = db.execute(
                "DELETE FROM jobs WHERE state IN (?, ?, ?) AND finished < ? AND EXISTS ("
                " SELECT 1 FROM jobs AS newer WHERE newer.path = jobs.path"
                " AND newer.job = jobs.job AND newer.id > jobs.id)",
                (*terminal, cutoff),
            ).rowcount
            if present is not None:
                # a sorted list, not a set: a tenth of the memory for a million paths,
                # and as fast here, where reading the rows is most of the time
                paths = sorted(present)
                scope, params = (
                    ("", ()) if root is None else (" AND root = CAST(? AS TEXT)", (to_db(root),))
                )
                gone = [
                    (row[0],)
                    for row in db.execute(
                        "SELECT id, path FROM jobs WHERE state IN (?, ?, ?) AND finished < ?"
                        + scope,
                        (*terminal, cutoff, *params),
                    )
                    if not _contains(paths, row[1])
                ]
                db.executemany("DELETE FROM jobs WHERE id = ?", gone)
                removed += len(gone)
            if removed:
                holds.sweep(db)
        return removed

    # -- reads ----------------------------------------------------------------------------

    def unknown(self, files: Sequence[FileVersionLike], jobs: Sequence[str]) -> list[int]:
        """Indexes (in ``files``) of the versions that miss a job for any of ``jobs``: what a
        reconciliation scan must still enqueue. Done in SQL through a temporary table, a
        batch of files at a time (one read transaction), so memory stays flat however large
        the ledger and the scan are."""
        if not files or not jobs:
            return []
        db = self._db
        db.execute("BEGIN")
        try:
            db.execute(
                "CREATE TEMP TABLE IF NOT EXISTS scanned"
                " (i INTEGER PRIMARY KEY, path TEXT, size INTEGER, mtime_ns INTEGER)"
            )
            marks = ",".join("?" * len(jobs))
            found: list[int] = []
            for start in range(0, len(files), UNKNOWN_BATCH):
                db.execute("DELETE FROM temp.scanned")
                db.executemany(
                    "INSERT INTO temp.scanned VALUES (?, CAST(? AS TEXT), ?, ?)",
                    (
                        (i, to_db(f.path), f.size, f.mtime_ns)
                        for i, f in enumerate(files[start : start + UNKNOWN_BATCH], start)
                    ),
                )
                found += (
                    row[0]
                    for row in db.execute(
                        "SELECT s.i FROM temp.scanned AS s WHERE (SELECT count(*) FROM jobs AS j"
                        " WHERE j.path = s.path AND j.size = s.size AND j.mtime_ns = s.mtime_ns"
                        f" AND j.job IN ({marks})) < ? ORDER BY s.i",
                        (*jobs, len(jobs)),
                    )
                )
            db.execute("DELETE FROM temp.scanned")
        finally:
            db.execute("COMMIT")
        return found

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in JobState}
        for state, n in self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
            counts[state] = n
        return counts

    def has_unfinished(self) -> bool:
        """Whether a job will still run without the operator: jobs held behind a dead job
        wait for ``dpypeline retry`` or ``skip``."""
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE state IN ('queued', 'running', 'retrying')"
            f" AND NOT {holds.HELD_BEHIND_DEAD} LIMIT 1"
        ).fetchone()
        return row is not None

    def ahead(self, job_id: int, jobs: Sequence[str]) -> list[Pending]:
        """Jobs of one store (the jobs named ``jobs``) before ``job_id`` that hold its
        start: the earliest queued, retrying and dead one."""
        return holds.ahead(self._db, job_id, jobs)

    def held(self) -> list[Hold]:
        """Every held job, with the job it waits for and that job's state."""
        return holds.listing(self._db)

    def next_retry_at(self) -> float | None:
        row = self._db.execute("SELECT min(not_before) FROM jobs WHERE state = 'retrying'")
        return row.fetchone()[0]

    def get(self, job_id: int) -> JobRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def jobs(self, state: JobState | None = None, limit: int = 50) -> list[JobRecord]:
        """The most recent jobs first (optionally of one state)."""
        if state is None:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,)
            )
        else:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?",
                (state.value, limit),
            )
        return [_record(row) for row in cur]

    def oldest_waiting(self) -> JobRecord | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('queued', 'retrying') ORDER BY id LIMIT 1"
        ).fetchone()
        return _record(row) if row else None

    def recent_errors(self, limit: int = 5) -> list[JobRecord]:
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE error IS NOT NULL AND state IN"
            " ('dead', 'retrying', 'skipped') ORDER BY updated DESC LIMIT ?",
            (limit,),
        )
        return [_record(row) for row in cur]
