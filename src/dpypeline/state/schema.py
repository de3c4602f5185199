"""The ledger's schema, its version and its upgrades.

The database records its schema version in ``PRAGMA user_version``. Opening it runs, in
order and inside one transaction, every migration above that version, after copying the
database (SQLite's backup API, so the write-ahead log is included) to
``dpypeline.db.v<N>.bak`` next to it: an upgrade that fails leaves the database as it was,
and one that succeeds can still be undone by hand. Version 0 is a database made before
versions were recorded (dpypeline 0.2.0) or a new, empty one; migration 1 creates the 0.2.0
schema where it is missing, so both take the same path.

A database newer than this code is refused rather than guessed at, and so is an SQLite
older than 3.35 (the ledger's statements use ``RETURNING`` and ``DROP COLUMN``).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import structlog

from dpypeline.errors import StateError

log = structlog.stdlib.get_logger("dpypeline.state")

MIN_SQLITE = (3, 35, 0)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    what: str
    statements: tuple[str, ...]


MIGRATIONS = (
    Migration(
        1,
        "the schema of dpypeline 0.2.0",
        (
            """CREATE TABLE IF NOT EXISTS jobs (
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
            )""",
            # migrations are frozen: literal SQL, never built from today's code
            "CREATE INDEX IF NOT EXISTS jobs_retrying ON jobs (not_before)"
            " WHERE state = 'retrying'",
            "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id)",
            "CREATE TABLE IF NOT EXISTS holds (job_id INTEGER PRIMARY KEY,"
            " behind INTEGER NOT NULL)",
            "CREATE INDEX IF NOT EXISTS holds_behind ON holds (behind)",
        ),
    ),
    Migration(
        2,
        "jobs are taken from the ledger in turn; the separate ready queue goes",
        (
            # a job's place in line: new jobs, promoted retries and revived dead jobs go
            # to the end; ties (one batch) are broken by id
            "ALTER TABLE jobs ADD COLUMN position INTEGER NOT NULL DEFAULT 0",
            "UPDATE jobs SET position = id",
            "CREATE INDEX jobs_position ON jobs (position)",
            "CREATE INDEX jobs_ready ON jobs (state, position)",
            "ALTER TABLE jobs DROP COLUMN admitted",
            "DROP TABLE IF EXISTS ack_queue_ready",  # persist-queue's table, in this file
        ),
    ),
    Migration(
        3,
        "jobs are counted as they change state, not by reading every row",
        (
            # one row per (job name, state, source), kept exact by the triggers inside the
            # transaction of each change: reading the counts costs the same at any size
            """CREATE TABLE job_counts (
                job TEXT NOT NULL,
                state TEXT NOT NULL,
                source TEXT NOT NULL,
                n INTEGER NOT NULL,
                PRIMARY KEY (job, state, source)
            ) WITHOUT ROWID""",
            "INSERT INTO job_counts (job, state, source, n)"
            " SELECT job, state, source, count(*) FROM jobs GROUP BY job, state, source",
            """CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
                INSERT INTO job_counts (job, state, source, n)
                VALUES (NEW.job, NEW.state, NEW.source, 1)
                ON CONFLICT (job, state, source) DO UPDATE SET n = n + 1;
            END""",
            """CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
                UPDATE job_counts SET n = n - 1
                WHERE job = OLD.job AND state = OLD.state AND source = OLD.source;
            END""",
            """CREATE TRIGGER job_counts_update AFTER UPDATE OF job, state, source ON jobs
            WHEN OLD.job IS NOT NEW.job OR OLD.state IS NOT NEW.state
                OR OLD.source IS NOT NEW.source
            BEGIN
                UPDATE job_counts SET n = n - 1
                WHERE job = OLD.job AND state = OLD.state AND source = OLD.source;
                INSERT INTO job_counts (job, state, source, n)
                VALUES (NEW.job, NEW.state, NEW.source, 1)
                ON CONFLICT (job, state, source) DO UPDATE SET n = n + 1;
            END""",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def require_sqlite() -> None:
    found = sqlite3.sqlite_version_info
    if found < MIN_SQLITE:
        need = ".".join(map(str, MIN_SQLITE[:2]))
        raise StateError(
            f"SQLite {'.'.join(map(str, found))} is too old: dpypeline needs {need} or newer"
            " (for RETURNING). Run it with a Python whose sqlite3 module links a newer"
            " SQLite (python.org and conda builds of Python 3.11+ do)."
        )


def backup_path(db_path: Path, version: int) -> Path:
    return db_path.with_name(f"{db_path.name}.v{version}.bak")


def upgrade(db: sqlite3.Connection, db_path: Path) -> int:
    """Bring the database to :data:`SCHEMA_VERSION`. Returns the version it was at."""
    found = _version(db)
    if found == SCHEMA_VERSION:
        return found
    backup = None
    db.execute("BEGIN IMMEDIATE")  # one process upgrades; the others wait, then see it done
    try:
        found = _version(db)
        if found > SCHEMA_VERSION:
            raise _too_new(db_path, found)
        if found < SCHEMA_VERSION:
            backup = _backup(db, db_path, found)
            for migration in MIGRATIONS:
                if migration.version > found:
                    _migrate(db, db_path, migration, found, backup)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    if backup is not None:  # a new database was created, not upgraded: nothing to say
        log.info(
            "state_upgraded",
            database=str(db_path),
            from_version=found,
            to_version=SCHEMA_VERSION,
            backup=str(backup),
        )
    return found


def _migrate(
    db: sqlite3.Connection, db_path: Path, migration: Migration, found: int, backup: Path | None
) -> None:
    try:
        for statement in migration.statements:
            db.execute(statement)
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            raise  # a damaged ledger: refused as such by the caller
        kept = f" A copy made before it is {backup}." if backup is not None else ""
        raise StateError(
            f"upgrading the ledger {db_path} from schema version {found} to"
            f" {SCHEMA_VERSION} failed at step {migration.version} ({migration.what}): {exc}."
            f" Nothing was changed: the upgrade is one transaction.{kept} Fix the cause"
            " (a full disk, a read-only file) and start again, or run the dpypeline that"
            " wrote this ledger."
        ) from exc


def _version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _too_new(db_path: Path, found: int) -> StateError:
    kept = backup_path(db_path, SCHEMA_VERSION)
    undo = (
        f" or, to go back to this version, stop the service and replace it with {kept}"
        " (made before the upgrade; jobs recorded since are forgotten and run again)"
        if kept.exists()
        else ""
    )
    return StateError(
        f"the state database {db_path} has schema version {found}, newer than this"
        f" dpypeline knows (up to {SCHEMA_VERSION}): a newer dpypeline upgraded it. Run"
        f" that newer dpypeline{undo}."
    )


def _backup(db: sqlite3.Connection, db_path: Path, version: int) -> Path | None:
    """Copy the database before migrating it; nothing to keep when it is new and empty."""
    if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
        return None
    target = backup_path(db_path, version)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    # through a connection of its own: SQLite will not copy from the connection holding
    # the write lock, and the lock keeps every other writer out until the upgrade is done
    source, copy = sqlite3.connect(db_path), sqlite3.connect(partial)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
    os.chmod(partial, 0o600)
    os.replace(partial, target)
    return target
