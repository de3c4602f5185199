"""Copies of the ledger: a consistent backup while the service runs, a restore, a fresh
start.

Copying ``dpypeline.db`` alone backs up little: the latest jobs live in its write-ahead
log until SQLite folds them in (after 20 jobs of a new ledger, a 4 KiB database and a
560 KB log). :func:`backup` uses SQLite's backup API through a read-only connection, so
the copy holds both and the service is never held up. :func:`restore` and :func:`reset`
need the service stopped (they take its lock) and never delete: the ledger they replace
is moved to ``CACHE_DIR/replaced-<time>/``.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dpypeline.errors import StateError
from dpypeline.state import integrity, schema, wal
from dpypeline.state.cachedir import DB_FILE, lock_service, prepare_cache_dir


def backup(cache_dir: Path, dest: Path | None = None) -> Path:
    """A consistent copy of the ledger at ``dest`` (default CACHE_DIR/dpypeline.db.backup),
    private to its owner, checked, marked closed so that it can be restored as it is."""
    dest = Path(dest) if dest is not None else cache_dir / integrity.BACKUP
    if not (cache_dir / DB_FILE).is_file():
        raise StateError(f"there is no ledger in {cache_dir} to back up")
    source = integrity.open_db(cache_dir, service=False, read_only=True)
    try:
        _copy(source, dest)
    finally:
        source.close()
    return dest


def restore(cache_dir: Path, copy: Path) -> Path | None:
    """Put ``copy`` in place of the ledger (the service stopped). ``copy`` may be the
    ledger itself: it is then kept as SQLite reads it, without what its lost or damaged
    log held. Returns where the replaced ledger went (None: there was none)."""
    copy = Path(copy).resolve()
    if not copy.is_file():
        raise StateError(f"{copy} is not a file: give the path of a copy of the ledger")
    with _stopped(cache_dir):
        db_path = cache_dir / DB_FILE
        itself = copy == db_path.resolve()
        aside = _move_aside(cache_dir)
        if itself and aside is not None:
            copy = aside / DB_FILE
        source = sqlite3.connect(f"{copy.as_uri()}?mode=ro", uri=True)
        try:
            _check_copy(source, copy)
            _copy(source, db_path)
        finally:
            source.close()
        integrity.mark(cache_dir)
    return aside


def reset(cache_dir: Path) -> Path | None:
    """Start over with an empty ledger (the service stopped): every file present is
    processed again. Returns where the replaced ledger went (None: there was none)."""
    with _stopped(cache_dir):
        aside = _move_aside(cache_dir)
        integrity.close_db(
            integrity.open_db(cache_dir, service=False, read_only=False, fresh=True),
            cache_dir,
            service=False,
            read_only=False,
        )
    return aside


@contextmanager
def _stopped(cache_dir: Path) -> Iterator[None]:
    """Hold the service lock: no service may run while the ledger is replaced."""
    prepare_cache_dir(cache_dir)
    fd = lock_service(cache_dir)
    try:
        yield
    finally:
        os.close(fd)


def _move_aside(cache_dir: Path) -> Path | None:
    db_path = cache_dir / DB_FILE
    files = [p for p in (db_path, wal.log_path(db_path), wal.index_path(db_path)) if p.exists()]
    if not files:
        return None
    # a name of its own even when two replacements fall in the same second (mode 0700)
    aside = Path(tempfile.mkdtemp(prefix=time.strftime("replaced-%Y%m%dT%H%M%S-"), dir=cache_dir))
    for path in files:
        os.replace(path, aside / path.name)
    return aside


def _check_copy(source: sqlite3.Connection, copy: Path) -> None:
    try:
        rows = [r[0] for r in source.execute("PRAGMA quick_check(5)")]
        tables = source.execute("SELECT count(*) FROM sqlite_master WHERE name = 'jobs'")
        has_jobs = tables.fetchone()[0]
        version = int(source.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise StateError(f"{copy} cannot be restored: it is not a readable ledger ({exc})") from exc
    if rows != ["ok"] or not has_jobs:
        what = "; ".join(map(str, rows)) if rows != ["ok"] else "it has no jobs table"
        raise StateError(f"{copy} cannot be restored: {what}")
    if version > schema.SCHEMA_VERSION:
        raise schema._too_new(copy, version)


def _copy(source: sqlite3.Connection, dest: Path) -> None:
    """Copy through SQLite's backup API to ``dest``, checked, 0600, marked closed."""
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    target = sqlite3.connect(partial, isolation_level=None)
    try:
        source.backup(target)
        target.execute(f"PRAGMA application_id = {integrity.CLOSED}")
        target.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        target.close()
    for leftover in (wal.log_path(partial), wal.index_path(partial)):
        leftover.unlink(missing_ok=True)
    with partial.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, dest)
