"""Open the ledger only when it is whole: never start empty where a ledger was, never let
SQLite silently drop the end of its write-ahead log.

SQLite makes a new database where one is missing or empty (and deletes a write-ahead log
found next to an empty one), and reads a log (``-wal``) only up to its first missing, cut
or damaged frame, dropping every later transaction without a word. For the ledger either
means files processed again, so before SQLite reads anything:

- a CACHE_DIR that has held a ledger (its marker, written and fsync'd when the ledger is
  made; a backup; a log) must still have one: :func:`kept`;
- the database header says whether the service closed the ledger (``PRAGMA
  application_id``, written through SQLite: :data:`OPEN` while the service runs,
  :data:`CLOSED` after). OPEN with no log means the log, holding the latest jobs, is gone;
- a log cut mid-frame, or whose frames go on past what SQLite accepted with a committed
  transaction (the log's current salts, a valid checksum, a commit mark) is damaged: a
  crash mid-write leaves at most an uncommitted last transaction, never a valid commit frame
  after a bad one (:mod:`dpypeline.state.wal`);
- the service runs ``PRAGMA quick_check`` (0.1 to 0.3 s on a 43 MB ledger of 200,000 jobs).

Each refusal is a :class:`LedgerRefused` (exit 4) with the way out: restore a backup
(``dpypeline ledger restore``) or start over (``dpypeline ledger reset``).

Only the service upgrades the schema: the other commands would change the ledger under an
older service still running. ``status`` and ``jobs`` open it read-only.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dpypeline.errors import LedgerRefused, StateError
from dpypeline.state import schema, wal
from dpypeline.state.cachedir import DB_FILE, service_pid

MARKER = "ledger.marker"  # "this CACHE_DIR holds a ledger", written when the ledger is made
OPENING = "ledger.opening"  # openers take turns on it (not a sign that a ledger was here)
BACKUP = f"{DB_FILE}.backup"  # where `dpypeline ledger backup` copies it by default
OPEN, CLOSED = 0x44505931, 0x44505930  # "DPY1" / "DPY0": the service has it open / closed it
CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
WAYS_OUT = (
    "Stop the service, then restore a copy of the ledger: `dpypeline ledger restore FILE`"
    " (run it with the same -c as the service){backup}; or, to process every file again,"
    ' start over: `dpypeline ledger reset`. See OPERATING.md, "When the ledger is refused".'
)


def backups(cache_dir: Path) -> list[Path]:
    """Copies of the ledger kept in CACHE_DIR, newest first: ``dpypeline ledger backup``'s
    and those made before a schema upgrade."""
    found = [cache_dir / BACKUP, *cache_dir.glob(f"{DB_FILE}.v*.bak")]
    return sorted((p for p in found if p.is_file()), key=lambda p: -p.stat().st_mtime)


def kept(cache_dir: Path) -> list[str]:
    """What shows that CACHE_DIR has held a ledger (its lock does not: a service that
    failed to start leaves one)."""
    found = [p.name for p in (cache_dir / MARKER,) if p.exists()]
    found += [p.name for p in backups(cache_dir)]
    log = wal.log_path(cache_dir / DB_FILE)
    return found + ([log.name] if (_size(log) or 0) > 0 else [])


def ways_out(cache_dir: Path) -> str:
    newest = next(iter(backups(cache_dir)), None)
    return WAYS_OUT.format(backup=f" (the newest in CACHE_DIR: {newest})" if newest else "")


def damaged(db_path: Path, what: str) -> LedgerRefused:
    return LedgerRefused(
        f"the ledger {db_path} is damaged: {what}. Carrying on would process files again,"
        f" so nothing was changed. {ways_out(db_path.parent)}"
    )


def open_db(
    cache_dir: Path, *, service: bool, read_only: bool, fresh: bool = False
) -> sqlite3.Connection:
    """The ledger's connection, checked as the module says; ``read_only``: nothing is
    written, not even a new ledger (an empty one in memory stands in for a missing one);
    ``fresh``: the operator starts over, a new ledger where one was is wanted."""
    with _one_opener_at_a_time(cache_dir):
        return _open_db(cache_dir, service=service, read_only=read_only, fresh=fresh)


@contextmanager
def _one_opener_at_a_time(cache_dir: Path) -> Iterator[None]:
    """Openers take turns (an advisory lock on :data:`OPENING`, held while opening only): a
    ledger that one of them is making (its file there, its log begun, its tables not yet
    written) must not look lost to another, such as ``dpypeline status`` or the metrics
    endpoint started with the service. A user who may not create the lock file (a
    read-only look at another user's CACHE_DIR) opens without it."""
    fd = -1
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            fd = os.open(cache_dir / OPENING, flags | os.O_CLOEXEC, 0o600)
            break
        except OSError:
            continue
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def _open_db(cache_dir: Path, *, service: bool, read_only: bool, fresh: bool) -> sqlite3.Connection:
    db_path = cache_dir / DB_FILE
    size = _size(db_path)
    evidence = kept(cache_dir) if cache_dir.is_dir() and not fresh else []
    if not size and evidence:
        what = "it is empty (0 bytes)" if size == 0 else "it is missing"
        raise LedgerRefused(
            f"the ledger {db_path} is lost: {what}, yet this CACHE_DIR has held one (it"
            f" has {', '.join(evidence)}). Starting with an empty ledger would process every"
            f" file again, so nothing was opened. {ways_out(cache_dir)}"
        )
    if not size and read_only:
        return _empty()
    tables = False
    if size:
        wal.check_log(db_path, _flag_on_disk(db_path) == OPEN, damaged)
        # checked through a read-only connection: a read-write one closed on a refusal
        # would fold what SQLite accepted of the log into the database and delete the log
        check, tables = _checked(db_path, service=service, read_only=read_only, kept=evidence)
        if read_only:
            return check
        check.close()
    else:
        os.close(os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    db = _connect(db_path, read_only=False)
    with _closed_on_failure(db, db_path):
        _private(db_path)
        db.execute("PRAGMA journal_mode=WAL")
        if service or not tables:  # the service upgrades; anyone makes a new ledger
            schema.upgrade(db, db_path)
        mark(cache_dir)
        if service:  # written through to the file: a later open without the log knows
            db.execute(f"PRAGMA application_id = {OPEN}")
            db.execute("PRAGMA wal_checkpoint(FULL)")
    return db


def _checked(
    db_path: Path, *, service: bool, read_only: bool, kept: list[str]
) -> tuple[sqlite3.Connection, bool]:
    """A read-only connection to a ledger that passed the checks, and whether it has its
    tables yet."""
    db = _connect(db_path, read_only=True)
    with _closed_on_failure(db, db_path):
        wal.check_frames(db, db_path, damaged)
        if service:
            _quick_check(db, db_path)
        tables = _schema(db, db_path, service=service, read_only=read_only, evidence=kept)
    return db, tables


@contextmanager
def _closed_on_failure(db: sqlite3.Connection, db_path: Path) -> Iterator[None]:
    """Close ``db`` when opening fails; SQLite's "malformed" and "not a database" say the
    ledger is damaged."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        db.close()
        if exc.sqlite_errorcode & 0xFF in CORRUPT:
            raise damaged(db_path, str(exc)) from exc
        raise
    except BaseException:
        db.close()
        raise


def close_db(db: sqlite3.Connection, cache_dir: Path, *, service: bool, read_only: bool) -> None:
    """Close, saying the ledger was closed cleanly when no service has it open: SQLite
    folds the log into the database when its last connection closes, and the next start
    must not take the missing log for a lost one."""
    try:
        if service or (not read_only and service_pid(cache_dir) is None and _flag(db) == OPEN):
            db.execute(f"PRAGMA application_id = {CLOSED}")
    except sqlite3.Error:
        pass  # the ledger cannot be written now; the next open checks it as after a crash
    finally:
        db.close()


def _schema(
    db: sqlite3.Connection, db_path: Path, *, service: bool, read_only: bool, evidence: list[str]
) -> bool:
    """Whether the ledger has its tables; refused when they are gone, or when a command
    other than the service finds another schema version."""
    tables = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'jobs'").fetchone()[0]
    if not tables and evidence:
        raise LedgerRefused(
            f"the ledger {db_path} is lost: it holds no jobs table, yet this CACHE_DIR has"
            f" held a ledger (it has {', '.join(evidence)}); its write-ahead log may have been"
            f" deleted. {ways_out(db_path.parent)}"
        )
    if not tables and read_only:
        raise StateError(f"the ledger {db_path} holds no jobs yet: it is being made; try again")
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if service or not tables:
        return bool(tables)
    if found > schema.SCHEMA_VERSION:
        raise schema._too_new(db_path, found)
    elif found < schema.SCHEMA_VERSION:
        raise StateError(
            f"the ledger {db_path} has schema version {found}, older than this dpypeline's"
            f" ({schema.SCHEMA_VERSION}); only the service upgrades it, so that no command"
            " changes it under an older service still running. Use the dpypeline the service"
            " runs, or start the service of this version (`dpypeline run`) first."
        )
    return True


def _quick_check(db: sqlite3.Connection, db_path: Path) -> None:
    rows = [r[0] for r in db.execute("PRAGMA quick_check(5)")]
    if rows != ["ok"]:
        raise damaged(db_path, "PRAGMA quick_check found " + "; ".join(map(str, rows)))


def _connect(db_path: Path, read_only: bool) -> sqlite3.Connection:
    target, uri = (f"{db_path.as_uri()}?mode=ro", True) if read_only else (str(db_path), False)
    db = sqlite3.connect(
        target, timeout=30.0, isolation_level=None, check_same_thread=False, uri=uri
    )
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA temp_store=MEMORY")
    return db


def _empty() -> sqlite3.Connection:
    """No ledger yet: an empty one in memory answers the read-only commands."""
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    schema.upgrade(db, Path(":memory:"))
    return db


def mark(cache_dir: Path) -> None:
    """Write the marker once, durably: from then on a missing ledger is a lost one."""
    marker = cache_dir / MARKER
    if marker.exists():
        return
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    text = json.dumps({"ledger": DB_FILE, "created": time.time()})
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, marker)
    dir_fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _private(db_path: Path) -> None:
    """The ledger and its log are its owner's alone (0600), as the lock and backups are,
    whatever the umask; SQLite gives the log and index the database's mode."""
    for path in (db_path, wal.log_path(db_path), wal.index_path(db_path)):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            path.chmod(0o600)


def _flag(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA application_id").fetchone()[0])


def _flag_on_disk(db_path: Path) -> int | None:
    """``application_id`` as the database file has it (not the log): bytes 68-71."""
    with db_path.open("rb") as f:
        header = f.read(100)
    return int.from_bytes(header[68:72], "big") if len(header) == 100 else None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
