"""Held jobs in the ledger: the ``holds`` table, one row per ``queued`` job that waits for
an earlier job of its append-mode store to commit (the rule is in :mod:`ordering`).

A held job is passed over when the service takes the next job in line, so it is neither
taken nor counted again while it waits. Its row goes when the job it waits for commits or
is skipped (by the service, or by ``dpypeline skip``). The functions take the ledger's
connection and run inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from dpypeline.executors.ordering import Hold, Pending
from dpypeline.state.transitions import JobState, is_state

# states in which a job keeps the later jobs of its store from committing
HOLDING = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING, JobState.DEAD)
# the same, without "running": jobs in flight commit first, so they hold no start
AHEAD = (JobState.QUEUED, JobState.RETRYING, JobState.DEAD)

# a job that is unfinished only because it is held behind a dead one
HELD_BEHIND_DEAD = (
    "EXISTS (SELECT 1 FROM holds AS h JOIN jobs AS b ON b.id = h.behind"
    f" WHERE h.job_id = jobs.id AND {is_state([JobState.DEAD], 'b.state')})"
)


def ahead(db: sqlite3.Connection, job_id: int, jobs: Sequence[str]) -> list[Pending]:
    """The earliest job before ``job_id`` among the jobs named ``jobs`` (the jobs writing
    one store), in each state that holds a start. One index walk per state, stopped at
    the first match, so it costs the same however long the store's history is."""
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
        Hold(*row)
        for row in db.execute(
            "SELECT h.job_id, h.behind, b.state FROM holds AS h JOIN jobs AS b"
            " ON b.id = h.behind ORDER BY h.job_id"
        )
    ]
