"""The ledger: every job dpypeline knows of, in SQLite under CACHE_DIR.

One row per (file version, job name); a file version is (path, size, mtime). The unique
key makes "the same version never makes two jobs" a database constraint, so the
watcher, the rescan and ``dpypeline enqueue`` may all offer the same file at once.

The ledger is the one record of every job's state, and the queue too: the service takes
the ``queued`` job first in line (its ``position``; see :data:`NEXT_READY`). Every state
change is an event of the transition table (``transitions``), guarded in SQL by the states
it may start from, so the service and CLI processes (``retry``, ``skip``, ``enqueue``) can
write the same database without either undoing the other's change.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dpypeline.errors import StateError
from dpypeline.jobstate import JobState
from dpypeline.ordering import Hold, Pending
from dpypeline.paths import from_db, shown, to_db
from dpypeline.state import holds, integrity, reconcile, schema
from dpypeline.state.cachedir import lock_service, prepare_cache_dir
from dpypeline.state.records import COLUMNS, FileVersionLike, JobRecord, record
from dpypeline.state.transitions import (
    OUTCOMES,
    WAITING,
    Event,
    apply,
    is_state,
)
from dpypeline.watching.fsinfo import require_local_filesystem

__all__ = ["Claim", "FileVersionLike", "JobRecord", "JobState", "Ledger", "Recovery"]

# The job the service takes next: the first queued in line that is not held.
NEXT_READY = (
    f"SELECT {COLUMNS} FROM jobs WHERE {is_state([JobState.QUEUED])} AND NOT EXISTS"
    " (SELECT 1 FROM holds WHERE holds.job_id = jobs.id) ORDER BY position, id LIMIT 1"
)
# When the next backoff ends: read off the partial index of retrying jobs (the loop asks
# on every pass; left to itself, SQLite reads every retrying job, thousands in an outage).
NEXT_RETRY = (
    "SELECT min(not_before) FROM jobs INDEXED BY jobs_retrying"
    f" WHERE {is_state([JobState.RETRYING])}"
)
# The end of the line: new jobs, promoted retries and revived dead jobs go there.
TAIL = "SELECT coalesce(max(position), 0) + 1 FROM jobs"


@dataclass(frozen=True, slots=True)
class Claim:
    """A job taken to run: its record, with the attempt already counted."""

    record: JobRecord


@dataclass(frozen=True, slots=True)
class Recovery:
    resumed: int
    dead: int
    dead_jobs: tuple[JobRecord, ...] = field(default=(), compare=False)  # as they are now


class Ledger:
    """Job states in SQLite. ``service=True`` locks CACHE_DIR for this process: only the
    service takes jobs to run, and only it upgrades the schema. ``read_only=True`` (status,
    jobs) writes nothing at all: not even a missing ledger is made."""

    def __init__(self, cache_dir: Path, *, service: bool = False, read_only: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        self.service, self.read_only = service, read_only and not service
        self._lock: int | None = None
        try:
            schema.require_sqlite()
            if not self.read_only:
                prepare_cache_dir(self.cache_dir)
            elif self.cache_dir.is_dir():
                require_local_filesystem(self.cache_dir, "CACHE_DIR")
            if service:
                self._lock = lock_service(self.cache_dir)
            self._db = integrity.open_db(self.cache_dir, service=service, read_only=self.read_only)
            self._db.text_factory = from_db  # paths come back as they are on disk
        except BaseException as exc:
            self._abandon()
            if not isinstance(exc, (OSError, sqlite3.Error)):
                raise
            raise StateError(
                f"cannot open the state database in {self.cache_dir}: {exc}. Check that the "
                "directory is writable by this user and on a local disk."
            ) from exc

    def _abandon(self) -> None:
        """Undo a failed open, above all the service lock: left held, it would refuse every
        later start in this process as "another dpypeline service"."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def close(self) -> None:
        integrity.close_db(self._db, self.cache_dir, service=self.service, read_only=self.read_only)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _service_only(self) -> None:
        if not self.service:
            raise RuntimeError("jobs are only taken and recovered by the service process")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

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
        many jobs are new. Files keep the order given (ids grow in that order) and go to
        the end of the line, except a new version of a file whose job is not written yet:
        it takes that job's place (:func:`dpypeline.ordering.takeover`)."""
        root_b = to_db(root)
        with self._tx() as db:
            tail = db.execute(TAIL).fetchone()[0]
            after = db.execute("SELECT coalesce(max(id), 0) FROM jobs").fetchone()[0]
            rows = (
                (to_db(f.path), f.size, f.mtime_ns, job, root_b, source, now, now, tail)
                for f in files
                for job in jobs
            )
            # the cursor's count, not the connection's: that one counts the triggers' writes
            added = db.executemany(
                "INSERT OR IGNORE INTO jobs (path, size, mtime_ns, job, root, state, source,"
                " created, updated, position) VALUES (CAST(? AS TEXT), ?, ?, ?,"
                f" CAST(? AS TEXT), '{JobState.QUEUED.value}', ?, ?, ?, ?)",
                rows,
            ).rowcount
            superseded = holds.absorb(db, holds.superseding(db, after), now)
        holds.log_superseded(superseded)
        return added

    def recover(self, max_attempts: int, now: float) -> Recovery:
        """Start-up after any stop: jobs that were running run again, or go ``dead`` when
        they have used all their attempts, since they keep taking the process down; new
        versions of files queued behind their file's open job take its place."""
        self._service_only()
        with self._tx() as db:
            exhausted = apply(
                db,
                Event.EXHAUST,
                "attempts >= :max",
                {"now": now, "max": max_attempts},
                assign="finished = :now, error = 'the service stopped during each of its '"
                " || attempts || ' attempts (the task may crash or hang the process; see the"
                " log). Fix the cause, then run: dpypeline retry ' || id",
                returning=COLUMNS,
            ).fetchall()
            dead_jobs = tuple(sorted(map(record, exhausted), key=lambda r: r.id))
            resumed = apply(db, Event.RESUME, "1", {"now": now}).rowcount
            holds.sweep(db)
            superseded = holds.absorb(db, holds.superseding(db), now)
        holds.log_superseded(superseded)
        return Recovery(resumed=resumed, dead=len(dead_jobs), dead_jobs=dead_jobs)

    def promote_due(self, now: float) -> int:
        """Jobs whose backoff has passed go back to ``queued``, at the end of the line."""
        with self._tx() as db:
            tail = db.execute(TAIL).fetchone()[0]
            return apply(
                db,
                Event.PROMOTE,
                "not_before <= :now",
                {"now": now, "tail": tail},
                assign="position = :tail",
            ).rowcount

    def claim(
        self, now: float, hold: Callable[[JobRecord], int | None] | None = None
    ) -> Claim | None:
        """Take the next job in line and count its attempt (committed before it runs).
        ``hold`` (the ordering rule's start decision, :func:`dpypeline.ordering.hold_for`)
        is asked first: when it names a job, the job is held behind that one instead (it
        stays queued, without an attempt counted) and the next is taken."""
        self._service_only()
        while True:
            with self._tx() as db:
                row = db.execute(NEXT_READY).fetchone()
                if row is None:
                    return None
                rec = record(row)
                behind = hold(rec) if hold is not None else None
                params = {"now": now, "id": rec.id}
                if behind is None:
                    taken = apply(
                        db,
                        Event.CLAIM,
                        "id = :id",
                        params,
                        assign="attempts = attempts + 1, started = :now",
                        returning=COLUMNS,
                    ).fetchone()
                    return Claim(record=record(taken))
                apply(db, Event.HOLD, "id = :id", params)
                holds.hold(db, rec.id, behind)

    def finish(
        self,
        claim: Claim,
        state: JobState,
        now: float,
        *,
        error: str | None = None,
        not_before: float | None = None,
    ) -> bool:
        """Record how an attempt ended: done, retrying (with ``not_before``), dead or
        skipped. False (and nothing changed) when the job was no longer running."""
        with self._tx() as db:
            moved = apply(
                db,
                OUTCOMES[state],
                "id = :id",
                {
                    "now": now,
                    "id": claim.record.id,
                    "error": error and shown(error),
                    "not_before": not_before,
                },
                assign="error = :error, not_before = :not_before, finished = :now",
            ).rowcount
            if moved and state in (JobState.DONE, JobState.SKIPPED):
                holds.release(db, claim.record.id)
            superseded = holds.absorb(db, [claim.record.id], now) if moved else []
        holds.log_superseded(superseded)
        return bool(moved)

    def release(self, claim: Claim, now: float) -> None:
        """Put a job interrupted by a stop back in line where it was (first, since it was
        taken first); the interrupted attempt is not counted against it."""
        with self._tx() as db:
            apply(
                db,
                Event.RELEASE,
                "id = :id",
                {"now": now, "id": claim.record.id},
                assign="attempts = max(attempts - 1, 0)",
            )
            superseded = holds.absorb(db, [claim.record.id], now)
        holds.log_superseded(superseded)

    def park(self, claim: Claim, behind: int, now: float) -> None:
        """Hold a job that was running behind ``behind`` (an earlier job of its resource
        that failed): queued again, its attempt not counted, not taken until ``behind`` commits
        or is skipped."""
        with self._tx() as db:
            moved = apply(
                db,
                Event.PARK,
                "id = :id",
                {"now": now, "id": claim.record.id},
                assign="attempts = max(attempts - 1, 0)",
            ).rowcount
            if moved:
                holds.hold(db, claim.record.id, behind)
            superseded = holds.absorb(db, [claim.record.id], now)
        holds.log_superseded(superseded)

    def skip(self, job_id: int, now: float, note: str) -> JobRecord | None:
        """The operator accepts that a dead job will never be written: it ends ``skipped``
        with ``note`` before its last error, and the jobs held behind it may start.
        None when the job is not dead."""
        with self._tx() as db:
            row = apply(
                db,
                Event.SKIP,
                "id = :id",
                {"now": now, "id": job_id, "note": note},
                assign="error = :note || coalesce(error, ''), finished = :now",
                returning=COLUMNS,
            ).fetchone()
            if row is not None:
                holds.release(db, job_id)
        return record(row) if row is not None else None

    def retry(self, job_ids: Sequence[int] | None, now: float) -> int:
        """Move ``dead`` jobs (the given ids, or all with None) back to ``queued`` with a
        fresh attempt count, at the end of the line."""
        with self._tx() as db:
            tail = db.execute(TAIL).fetchone()[0]
            fresh = (
                "attempts = 0, error = NULL, not_before = NULL, finished = NULL, position = :tail"
            )
            params = {"now": now, "tail": tail}
            if job_ids is None:
                return apply(db, Event.RETRY, "1", params, assign=fresh).rowcount
            return sum(
                apply(db, Event.RETRY, "id = :id", {**params, "id": i}, assign=fresh).rowcount
                for i in job_ids
            )

    def retime_retries(self, now: float, longest: float, stepped: float = 0.0) -> int:
        """Keep the stored backoff ends (wall-clock times) true to the wait left: moved by
        ``stepped`` when the service saw the wall clock step, and none beyond ``longest``
        (the largest backoff) from ``now``, so that a clock stepped back while the service
        was down cannot park a job for the size of the step. Returns the jobs changed."""
        with self._tx() as db:
            return db.execute(
                "UPDATE jobs SET not_before = min(not_before + :stepped, :now + :longest)"
                f" WHERE {is_state([JobState.RETRYING])} AND not_before IS NOT NULL"
                " AND (:stepped != 0 OR not_before > :now + :longest)",
                {"now": now, "longest": longest, "stepped": stepped},
            ).rowcount

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
        with self._tx() as db:
            return reconcile.prune(db, now - retention, present, root)

    # -- reads ----------------------------------------------------------------------------

    def unknown(self, files: Sequence[FileVersionLike], jobs: Sequence[str]) -> list[int]:
        """Indexes (in ``files``) of the versions that miss a job for any of ``jobs``: what a
        reconciliation scan must still enqueue. Done in SQL through a temporary table, a
        batch of files at a time (one read transaction), so memory stays flat however large
        the ledger and the scan are."""
        return reconcile.unknown(self._db, files, jobs)

    @property
    def changes(self) -> int:
        """Rows this connection has written so far: a free "has anything changed?"."""
        return self._db.total_changes

    @property
    def data_version(self) -> int:
        """Moves when another connection commits (``dpypeline retry`` or ``skip`` while the
        service runs), which ``changes`` does not see."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in JobState}
        for (_, state, _), n in self.tally().items():
            counts[state] += n
        return counts

    def tally(self) -> dict[tuple[str, str, str], int]:
        """Jobs by (job name, state, source): what ``counts`` sums, for the metrics. Read
        from ``job_counts``, which triggers keep as jobs change (see ``schema``): a few
        rows at any ledger size, where counting the jobs themselves took half a second at a
        million rows, on every refresh of the progress shown."""
        rows = self._db.execute("SELECT job, state, source, n FROM job_counts WHERE n > 0")
        return {(job, state, source): n for job, state, source, n in rows}

    def has_unfinished(self) -> bool:
        """Whether a job will still run without the operator: jobs held behind a dead job
        wait for ``dpypeline retry`` or ``skip``."""
        row = self._db.execute(
            f"SELECT 1 FROM jobs WHERE {is_state(WAITING)} AND NOT {holds.HELD_BEHIND_DEAD} LIMIT 1"
        ).fetchone()
        return row is not None

    def ahead(self, job_id: int, jobs: Sequence[str]) -> list[Pending]:
        """Jobs of one resource (the jobs named ``jobs``) before ``job_id`` that hold its
        start: the earliest queued, retrying and dead one."""
        return holds.ahead(self._db, job_id, jobs)

    def held(self) -> list[Hold]:
        """Every held job, with the job it waits for and that job's state."""
        return holds.listing(self._db)

    def next_retry_at(self) -> float | None:
        row = self._db.execute(NEXT_RETRY)
        return row.fetchone()[0]

    def get(self, job_id: int) -> JobRecord | None:
        row = self._db.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return record(row) if row else None

    def jobs(self, state: JobState | None = None, limit: int = 50) -> list[JobRecord]:
        """The most recent jobs first (optionally of one state)."""
        where = f"WHERE {is_state([state])}" if state is not None else ""
        return self._records(f"{where} ORDER BY id DESC LIMIT ?", limit)

    def oldest_waiting(self) -> JobRecord | None:
        """The first of the oldest queued and the oldest retrying job: one index lookup
        each, where one query over both states sorted every waiting job (a backlog)."""
        first = " UNION ALL ".join(
            f"SELECT min(id) AS id FROM jobs WHERE {is_state([s])}"
            for s in (JobState.QUEUED, JobState.RETRYING)
        )
        return next(iter(self._records(f"WHERE id = (SELECT min(id) FROM ({first}))")), None)

    def recent_errors(self, limit: int = 5) -> list[JobRecord]:
        failed = is_state([JobState.DEAD, JobState.RETRYING, JobState.SKIPPED])
        where = f"WHERE error IS NOT NULL AND {failed}"
        return self._records(f"{where} ORDER BY updated DESC LIMIT ?", limit)

    def _records(self, clauses: str, *params: object) -> list[JobRecord]:
        rows = self._db.execute(f"SELECT {COLUMNS} FROM jobs {clauses}", params)
        return [record(r) for r in rows]
