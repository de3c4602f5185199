"""A file a job rewrote in place is the job's own output, not new input.

The rule: a new version of a file whose previous version's job (of the same name) ended
``done``, and whose modification time falls within that job's run (from its start to
``SLACK`` after its end was recorded), was written by that job: a task that rewrites its
own input, or an output written over the file it came from when outputs land in the
watched tree. Taken as new input it would run the job again, which rewrites the file
again, for ever. Such a version is recorded ``skipped`` with the reason and a warning is
logged, so it is neither run nor silently dropped; ``touch`` the file (a version written
outside any job) to have it taken.

Outputs written to other paths inside the watched tree cannot be told from new files;
``dpypeline validate`` and the service's start warn about the outputs a config names
(:mod:`dpypeline.watching.outputs`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import structlog

from dpypeline.paths import shown
from dpypeline.state.transitions import JobState, is_state

log = structlog.stdlib.get_logger("dpypeline.state")

SLACK = 0.25  # seconds: the end of a job is recorded in the loop pass that saw it end

NOTE = (
    "not taken as new input: this version was written while job {by} ran on the same file"
    " (a task rewrote its own input); touch the file to have it processed"
)


@dataclass(frozen=True)
class OwnWrite:
    job_id: int
    path: str
    by: int


def find(db: sqlite3.Connection, after: int) -> list[OwnWrite]:
    """The queued jobs after id *after* whose version their file's done job wrote."""
    rows = db.execute(
        "SELECT n.id, n.path, max(o.id) FROM jobs AS n JOIN jobs AS o"
        " ON o.path = n.path AND o.job = n.job AND o.id < n.id"
        f" WHERE n.id > ? AND {is_state([JobState.QUEUED], 'n.state')}"
        f" AND {is_state([JobState.DONE], 'o.state')} AND o.started IS NOT NULL"
        " AND n.mtime_ns >= CAST(o.started * 1e9 AS INTEGER)"
        " AND n.mtime_ns <= CAST((o.finished + ?) * 1e9 AS INTEGER)"
        " GROUP BY n.id",
        (after, SLACK),
    ).fetchall()
    return [OwnWrite(job_id, path, by) for job_id, path, by in rows]


def set_aside(db: sqlite3.Connection, own: list[OwnWrite], now: float) -> None:
    """Record them ``skipped``, with the reason, in the enqueue's transaction."""
    db.executemany(
        f"UPDATE jobs SET state = '{JobState.SKIPPED.value}', error = ?, finished = ?,"
        " updated = ? WHERE id = ?",
        [(NOTE.format(by=w.by), now, now, w.job_id) for w in own],
    )


def log_set_aside(own: list[OwnWrite]) -> None:
    for w in own:
        log.warning(
            "own_write_not_taken",
            job_id=w.job_id,
            file=shown(w.path),
            written_by=w.by,
            state=JobState.SKIPPED.value,
            reason=NOTE.format(by=w.by),
        )
