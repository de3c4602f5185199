"""Held jobs in the ledger: the ``holds`` table, one row per ``queued`` job that waits for
an earlier job of its ordered resource to commit. The rule is :mod:`dpypeline.ordering`;
this module keeps the SQL that supplies its facts and records its decisions.

A held job is passed over when the service takes the next job in line, so it is neither
taken nor counted again while it waits. Its row goes when the job it waits for commits or
is skipped (by the service, or by ``dpypeline skip``). The functions take the ledger's
connection and run inside the caller's transaction.

When a new version of a file takes the place of the file's job that is not written yet
(:func:`absorb`, as :func:`dpypeline.ordering.takeover` decides), the jobs held behind it
stay held behind it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

from dpypeline.jobstate import JobState
from dpypeline.ordering import AHEAD, HOLDING, OPEN, Hold, Pending, takeover
from dpypeline.state.transitions import Event, apply, is_state

log = structlog.stdlib.get_logger("dpypeline.state")

# what a job taken over by a new version of its file starts again with
FRESH = (
    "size = :size, mtime_ns = :mtime_ns, source = :source, attempts = 0, error = NULL,"
    " not_before = NULL, started = NULL, finished = NULL"
)

# a job that is unfinished only because it is held behind a dead one
HELD_BEHIND_DEAD = (
    "EXISTS (SELECT 1 FROM holds AS h JOIN jobs AS b ON b.id = h.behind"
    f" WHERE h.job_id = jobs.id AND {is_state([JobState.DEAD], 'b.state')})"
)


def ahead(db: sqlite3.Connection, job_id: int, jobs: Sequence[str]) -> list[Pending]:
    """The earliest job before ``job_id`` among the jobs named ``jobs`` (the jobs writing
    one resource), in each state that holds a start. One index walk per state, stopped at
    the first match, so it costs the same however long the resource's history is."""
    marks = ",".join("?" * len(jobs))
    found = []
    for state in AHEAD:
        row = db.execute(
            f"SELECT id FROM jobs WHERE {is_state([state])} AND id < ? AND job IN ({marks})"
            " ORDER BY id LIMIT 1",
            (job_id, *jobs),
        ).fetchone()
        if row is not None:
            found.append(Pending(row[0], state))
    return found


def hold(db: sqlite3.Connection, job_id: int, behind: int) -> None:
    """Hold ``job_id`` behind ``behind``; jobs that were held behind ``job_id`` now wait
    for ``behind`` too, so a hold always names a job that is not held itself."""
    db.execute("UPDATE holds SET behind = ? WHERE behind = ?", (behind, job_id))
    db.execute("INSERT OR REPLACE INTO holds (job_id, behind) VALUES (?, ?)", (job_id, behind))


def release(db: sqlite3.Connection, behind: int) -> int:
    """``behind`` committed or was skipped: the jobs held behind it may start."""
    return db.execute("DELETE FROM holds WHERE behind = ?", (behind,)).rowcount


def sweep(db: sqlite3.Connection) -> int:
    """Forget holds that no longer hold anything: behind a job that is gone or finished
    (other than dead), or of a job that is no longer queued."""
    return db.execute(
        "DELETE FROM holds WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = holds.behind"
        f" AND {is_state(HOLDING, 'jobs.state')}) OR NOT EXISTS (SELECT 1 FROM jobs"
        f" WHERE jobs.id = holds.job_id AND {is_state([JobState.QUEUED], 'jobs.state')})"
    ).rowcount


def listing(db: sqlite3.Connection) -> list[Hold]:
    return [
        Hold(job_id, behind, JobState(state))
        for job_id, behind, state in db.execute(
            "SELECT h.job_id, h.behind, b.state FROM holds AS h JOIN jobs AS b"
            " ON b.id = h.behind ORDER BY h.job_id"
        )
    ]


@dataclass(frozen=True, slots=True)
class Superseded:
    """Job ``job_id`` now processes a newer version of its file (``size`` bytes), in its
    place; it was ``state`` (with ``error``), and the later jobs ``dropped`` that had
    been made for newer versions are gone."""

    job_id: int
    path: str
    state: JobState
    error: str | None
    size: int
    dropped: tuple[int, ...]


def superseding(db: sqlite3.Connection, after: int = 0) -> list[int]:
    """The queued jobs after id ``after`` (those one enqueue made, or all) of a file whose
    job of the same name before them is still open: new versions that take its place."""
    return [
        row[0]
        for row in db.execute(
            f"SELECT n.id FROM jobs AS n WHERE {is_state([JobState.QUEUED], 'n.state')}"
            " AND n.id > ? AND EXISTS (SELECT 1 FROM jobs AS o"
            " WHERE o.path = n.path AND o.job = n.job AND o.id < n.id"
            f" AND {is_state(OPEN, 'o.state')})",
            (after,),
        )
    ]


def absorb(db: sqlite3.Connection, job_ids: Iterable[int], now: float) -> list[Superseded]:
    """For the file (and job name) of each of ``job_ids``: when its earliest open job has
    later jobs still queued, made for newer versions of the file, the open job takes the
    newest version (queued, fresh attempts, its id and so its place kept) and the later
    jobs go. Nothing happens while a job of that file runs: its end calls this again."""
    done: list[Superseded] = []
    for job_id in job_ids:
        rows = {
            row[0]: row
            for row in db.execute(
                "SELECT id, state, path, error FROM jobs WHERE (path, job) ="
                " (SELECT path, job FROM jobs WHERE id = ?)",
                (job_id,),
            )
        }
        took = takeover((i, JobState(state)) for i, state, _, _ in rows.values())
        if took is None:
            continue
        place, later = rows[took.place], took.later
        size, mtime_ns, source = db.execute(
            "SELECT size, mtime_ns, source FROM jobs WHERE id = ?", (later[-1],)
        ).fetchone()
        marks = ",".join("?" * len(later))
        db.execute(f"DELETE FROM holds WHERE job_id IN ({marks})", later)
        behind = db.execute("SELECT behind FROM holds WHERE job_id = ?", (place[0],)).fetchone()
        db.execute(
            f"UPDATE holds SET behind = ? WHERE behind IN ({marks})",
            (behind[0] if behind else place[0], *later),
        )
        db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", later)
        params = {"now": now, "id": place[0], "size": size, "mtime_ns": mtime_ns}
        apply(db, Event.SUPERSEDE, "id = :id", params | {"source": source}, assign=FRESH)
        done.append(Superseded(place[0], place[2], JobState(place[1]), place[3], size, later))
    return done


def log_superseded(superseded: list[Superseded]) -> None:
    """After the transaction that made them: one line per job taken over."""
    for s in superseded:
        log.info(
            "job_superseded",
            job_id=s.job_id,
            file=s.path,
            was=s.state,
            error=s.error,
            size=s.size,
            dropped=list(s.dropped),
            state=JobState.QUEUED.value,
            reason="a new version of the file takes this job's place: it is processed in the"
            " job's place in its store's order, with fresh attempts",
        )
