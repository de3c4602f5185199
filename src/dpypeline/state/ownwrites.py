"""A file a job rewrote in place is the job's own output, not new input.

The rule: when a job ends ``done``, its file is looked at again. If it is no longer the
version the job started with, and was written after the job started, that version is the
job's own: a task that rewrites its own input, or an output written over the file it came
from when outputs land in the watched tree. Taken as new input it would run the job
again, which rewrites the file again, for ever. That exact version (path, size,
modification time) is recorded ``skipped`` with the reason, in the transaction that
records the job done, and a warning is logged: a watcher that sees it later finds it
known, one that saw it already has its queued job set aside. It is neither run nor
silently dropped; ``touch`` the file (a version written outside any job) to have it taken.
A version written after the job ended is a new version like any other, however soon.

Outputs written to other paths inside the watched tree cannot be told from new files;
``dpypeline validate`` and the service's start warn about the outputs a config names
(:mod:`dpypeline.watching.outputs`).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

import structlog

from dpypeline.paths import shown, to_db
from dpypeline.state.records import JobRecord
from dpypeline.state.transitions import JobState, is_state

log = structlog.stdlib.get_logger("dpypeline.state")

NOTE = (
    "not taken as new input: this version was written while job {by} ran on the same file"
    " (a task rewrote its own input); touch the file to have it processed"
)


@dataclass(frozen=True)
class OwnWrite:
    job_id: int
    path: str
    by: int


def set_aside(db: sqlite3.Connection, done: JobRecord, now: float) -> list[OwnWrite]:
    """The version of *done*'s file that its job wrote, if any, recorded ``skipped`` (its
    queued job set aside, or a row of its own so that it is known when it is seen)."""
    try:
        st = os.stat(done.path)
    except OSError:
        return []  # gone or unreadable: nothing of it to take
    started_ns = int((done.started or done.created) * 1e9)
    if (st.st_size, st.st_mtime_ns) == (done.size, done.mtime_ns):
        return []
    if not started_ns <= st.st_mtime_ns <= int(now * 1e9):
        return []  # written before the job started, or after it ended: not the job's
    note = NOTE.format(by=done.id)
    identity = (to_db(done.path), st.st_size, st.st_mtime_ns, done.job)
    row = db.execute(
        "SELECT id, state FROM jobs WHERE path = CAST(? AS TEXT) AND size = ? AND mtime_ns = ?"
        " AND job = ?",
        identity,
    ).fetchone()
    if row is None:
        tail = db.execute("SELECT coalesce(max(position), 0) + 1 FROM jobs").fetchone()[0]
        job_id = db.execute(
            "INSERT INTO jobs (path, size, mtime_ns, job, root, state, error, source, created,"
            f" updated, position, finished) VALUES (CAST(? AS TEXT), ?, ?, ?, CAST(? AS TEXT),"
            f" '{JobState.SKIPPED.value}', ?, ?, ?, ?, ?, ?)",
            (*identity, to_db(done.root), note, done.source, now, now, tail, now),
        ).lastrowid
    elif row[1] == JobState.QUEUED.value:
        job_id = row[0]
        db.execute(
            f"UPDATE jobs SET state = '{JobState.SKIPPED.value}', error = ?, finished = ?,"
            f" updated = ? WHERE id = ? AND {is_state([JobState.QUEUED])}",
            (note, now, now, job_id),
        )
    else:
        return []  # that version is running or was decided already: left as it is
    return [OwnWrite(int(job_id or 0), done.path, done.id)]


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
