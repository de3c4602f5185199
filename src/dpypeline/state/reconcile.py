"""Reconciling the ledger with the disk: which scanned file versions it lacks, and which
finished jobs it may forget. The functions take the ledger's connection; ``prune`` runs
inside the caller's transaction."""

from __future__ import annotations

import sqlite3
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from dpypeline.paths import to_db
from dpypeline.state import holds
from dpypeline.state.records import FileVersionLike
from dpypeline.state.transitions import TERMINAL, is_state

UNKNOWN_BATCH = 20_000  # files per round through the temporary table of unknown()
FINISHED = is_state(TERMINAL)


def _contains(sorted_items: list[str], item: str) -> bool:
    i = bisect_left(sorted_items, item)
    return i < len(sorted_items) and sorted_items[i] == item


def unknown(
    db: sqlite3.Connection, files: Sequence[FileVersionLike], jobs: Sequence[str]
) -> list[int]:
    """Indexes (in ``files``) of the versions that miss a job for any of ``jobs``, in one
    read transaction of its own."""
    if not files or not jobs:
        return []
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


def prune(
    db: sqlite3.Connection, cutoff: float, present: Iterable[str] | None, root: str | None
) -> int:
    """Forget the finished jobs, finished before ``cutoff``, that ``Ledger.prune`` says may
    go. Returns how many."""
    removed = db.execute(
        f"DELETE FROM jobs WHERE {FINISHED} AND finished < ? AND EXISTS ("
        " SELECT 1 FROM jobs AS newer WHERE newer.path = jobs.path"
        " AND newer.job = jobs.job AND newer.id > jobs.id)",
        (cutoff,),
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
                f"SELECT id, path FROM jobs WHERE {FINISHED} AND finished < ?" + scope,
                (cutoff, *params),
            )
            if not _contains(paths, row[1])
        ]
        db.executemany("DELETE FROM jobs WHERE id = ?", gone)
        removed += len(gone)
    if removed:
        holds.sweep(db)
    return removed
