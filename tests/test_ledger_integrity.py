"""A lost or damaged ledger is refused, never silently started afresh: real `dpypeline run`
processes killed with SIGKILL, their ledger then damaged on disk as a crash, a careless
`rm` or a bad disk would; the refusal (exit 4, before READY) says what to do, and nothing
runs again. Read-only commands never change the ledger; the ledger is private (0600)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ServiceProcess, dpypeline, runs, wait_for, write_config
from dpypeline.state import schema
from dpypeline.state.cachedir import DB_FILE

pytestmark = pytest.mark.slow

FILES = 20
EXIT_LEDGER = 4
FIXTURE_0_2_0 = Path(__file__).parent / "fixtures" / "cache-0.2.0"


def make_pipeline(tmp_path: Path, cache: Path | None = None) -> tuple[Path, Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    log = tmp_path / "runs.log"
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(cache or tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms", "rescan_interval": "30s"}],
            "jobs": [
                {"name": "work", "tasks": [{"task": "taskbox.record", "with": {"log": str(log)}}]}
            ],
            "logging": {"format": "json"},
        },
    )
    return cfg, inbox, log


def processed_then(tmp_path: Path, signum: int) -> tuple[Path, Path, Path]:
    """A service that processed FILES files, then stopped by ``signum``: (config, the
    ledger, the runs log)."""
    cfg, inbox, log = make_pipeline(tmp_path)
    for i in range(FILES):
        (inbox / f"f{i:02d}.nc").write_bytes(b"x")
    service = ServiceProcess(cfg)
    try:
        service.wait_ready()
        wait_for(
            lambda: len(service.events("job_done")) >= FILES,
            message=f"{FILES} job_done lines (each logged after its ledger commit)",
        )
        service.signal(signum)
        service.wait(30)
    finally:
        service.kill()
    assert len(runs(log)) == FILES
    return cfg, tmp_path / "state" / DB_FILE, log


def wal_of(db: Path) -> Path:
    return db.with_name(db.name + "-wal")


def refused_and_nothing_ran(cfg: Path, log: Path, *expected: str) -> str:
    proc = dpypeline("run", "-c", str(cfg), "--once", timeout=120)
    ran_again = len(runs(log)) - FILES
    assert (proc.returncode, ran_again) == (EXIT_LEDGER, 0), proc.stderr
    assert "service_ready" not in proc.stderr  # refused before READY
    for text in expected:
        assert text in proc.stderr
    assert "dpypeline ledger reset" in proc.stderr
    return proc.stderr


# -- item: a lost or damaged ledger is not silently re-created ----------------------------------


def zero_bytes(db: Path) -> None:
    db.write_bytes(b"")


def deleted_with_its_log(db: Path) -> None:
    for path in (db, wal_of(db), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)


def deleted_log(db: Path) -> None:
    wal_of(db).unlink()


def truncated_log(db: Path) -> None:
    log = wal_of(db)
    frame = 24 + 4096
    frames = (log.stat().st_size - 32) // frame
    size = 32 + frames // 2 * frame + 1000  # in the middle of a frame, where no write ends
    assert size % 4096
    os.truncate(log, size)


def scribbled_log_page(db: Path) -> None:
    log = wal_of(db)
    frame = 24 + 4096
    frames = (log.stat().st_size - 32) // frame
    with log.open("r+b") as f:
        f.seek(32 + frames // 2 * frame + 24 + 1000)  # inside the page of a middle frame
        f.write(b"\xa5" * 64)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (zero_bytes, "is empty (0 bytes)"),
        (deleted_with_its_log, "is missing"),
        (deleted_log, "write-ahead log dpypeline.db-wal is missing"),
        (truncated_log, "is cut short"),
        (scribbled_log_page, "is damaged at frame"),
    ],
    ids=["0-byte db", "db deleted", "wal deleted", "wal truncated", "wal page scribbled"],
)
def test_a_ledger_lost_or_damaged_after_sigkill_is_refused_and_nothing_runs_again(
    tmp_path: Path, damage: Callable[[Path], None], expected: str
) -> None:
    cfg, db, log = processed_then(tmp_path, signal.SIGKILL)
    assert wal_of(db).stat().st_size > 0  # the latest jobs are in the log
    damage(db)
    refused_and_nothing_ran(cfg, log, expected, str(db))
    # the CLI refuses it too, with the same message and code
    status = dpypeline("status", "-c", str(cfg))
    assert status.returncode == EXIT_LEDGER, status.stderr
    assert expected in status.stderr


def test_a_log_folded_in_by_a_command_after_sigkill_is_not_taken_for_a_lost_one(
    tmp_path: Path,
) -> None:
    """After a kill, `enqueue` (the last connection to close) folds the log into the
    database and SQLite deletes it: nothing is lost, and the next start goes on."""
    cfg, db, log = processed_then(tmp_path, signal.SIGKILL)
    assert wal_of(db).stat().st_size > 0
    (tmp_path / "inbox" / "late.nc").write_bytes(b"x")
    dpypeline("enqueue", "-c", str(cfg), str(tmp_path / "inbox" / "late.nc"), check=True)
    assert not wal_of(db).exists()
    proc = dpypeline("run", "-c", str(cfg), "--once", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [r[0] for r in runs(log)][FILES:] == ["late.nc"]


def test_a_damaged_btree_page_is_refused_before_ready_and_not_restarted(tmp_path: Path) -> None:
    cfg, db, log = processed_then(tmp_path, signal.SIGTERM)
    assert not wal_of(db).exists()  # a clean stop: everything is in the database file
    conn = sqlite3.connect(db)
    root, page_size = conn.execute(
        "SELECT rootpage, (SELECT page_size FROM pragma_page_size) FROM sqlite_master"
        " WHERE name = 'jobs'"
    ).fetchone()
    conn.close()
    with db.open("r+b") as f:  # the b-tree page header and cell pointers of the jobs table
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * 24)
    err = refused_and_nothing_ran(cfg, log, f"the ledger {db} is damaged")
    assert "permission" not in err
    assert "writable" not in err
    units = sorted(Path(__file__).parent.parent.joinpath("systemd").rglob("*.service"))
    assert len(units) == 3
    for unit in units:
        line = next(x for x in unit.read_text().splitlines() if x.startswith("RestartPrevent"))
        assert str(EXIT_LEDGER) in line.split("=", 1)[1].split(), unit


# -- the ways on: backup, restore, start over ---------------------------------------------------


def test_a_backup_taken_while_the_service_runs_is_restored_and_nothing_runs_again(
    tmp_path: Path,
) -> None:
    cfg, inbox, log = make_pipeline(tmp_path)
    db = tmp_path / "state" / DB_FILE
    for i in range(FILES):
        (inbox / f"f{i:02d}.nc").write_bytes(b"x")
    service = ServiceProcess(cfg)
    try:
        service.wait_ready()
        wait_for(lambda: len(service.events("job_done")) >= FILES, message="job_done lines")
        backup = dpypeline("ledger", "backup", "-c", str(cfg), check=True)
        copy = tmp_path / "state" / "dpypeline.db.backup"
        assert str(copy) in backup.stdout
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert dpypeline("ledger", "restore", "-c", str(cfg), str(copy)).returncode == 2
        service.signal(signal.SIGKILL)
        service.wait(30)
    finally:
        service.kill()
    wal_of(db).unlink()
    err = refused_and_nothing_ran(cfg, log, str(copy))  # the refusal names the backup
    assert "dpypeline ledger restore FILE" in err
    restored = dpypeline("ledger", "restore", "-c", str(cfg), str(copy), check=True)
    assert "replaced-" in restored.stdout
    proc = dpypeline("run", "-c", str(cfg), "--once", timeout=120)
    assert (proc.returncode, len(runs(log))) == (0, FILES), proc.stderr


def test_the_ledger_itself_can_be_kept_as_sqlite_reads_it_or_started_over(tmp_path: Path) -> None:
    cfg, db, log = processed_then(tmp_path, signal.SIGKILL)
    scribbled_log_page(db)
    refused_and_nothing_ran(cfg, log)
    dpypeline("ledger", "restore", "-c", str(cfg), str(db), check=True)
    proc = dpypeline("run", "-c", str(cfg), "--once", timeout=120)
    assert proc.returncode == 0, proc.stderr
    again = len(runs(log)) - FILES
    assert 0 < again < FILES  # only what the damaged log held runs again
    reset = dpypeline("ledger", "reset", "-c", str(cfg), check=True)
    assert "started over" in reset.stdout
    proc = dpypeline("run", "-c", str(cfg), "--once", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(runs(log)) == FILES + again + FILES  # the operator asked for all of them


# -- item: read-only commands change nothing ---------------------------------------------------


def fingerprint(db: Path) -> tuple[int, str]:
    version = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        user_version = int(version.execute("PRAGMA user_version").fetchone()[0])
    finally:
        version.close()
    return user_version, hashlib.sha256(db.read_bytes()).hexdigest()


def test_status_and_jobs_leave_an_older_ledger_as_it_is(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(FIXTURE_0_2_0, cache)
    cfg, _, _ = make_pipeline(tmp_path, cache)
    db = cache / DB_FILE
    before = fingerprint(db)
    assert before[0] < schema.SCHEMA_VERSION
    for command in ("status", "jobs"):
        proc = dpypeline(command, "-c", str(cfg))
        assert proc.returncode == 2, proc.stderr
        assert "older than this dpypeline's" in proc.stderr
        assert "only the service upgrades it" in proc.stderr
        assert fingerprint(db) == before
    assert not list(cache.glob("*.bak"))
    assert not (cache / "ledger.marker").exists()


def test_a_ledger_newer_than_the_code_is_refused_by_status_with_what_to_do(
    tmp_path: Path,
) -> None:
    cfg, _, _ = make_pipeline(tmp_path)
    dpypeline("enqueue", "-c", str(cfg), str(tmp_path / "inbox"), check=True)
    db = tmp_path / "state" / DB_FILE
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    conn.close()
    before = fingerprint(db)
    for command in ("status", "jobs"):
        proc = dpypeline(command, "-c", str(cfg))
        assert proc.returncode == 2, proc.stderr
        assert f"schema version {schema.SCHEMA_VERSION + 1}, newer" in proc.stderr
        assert "no such" not in proc.stderr
        assert fingerprint(db) == before


# -- item: the ledger is private ---------------------------------------------------------------


def test_the_ledger_and_its_log_are_private_whatever_the_umask(tmp_path: Path) -> None:
    cfg, inbox, _ = make_pipeline(tmp_path)
    (inbox / "a.nc").write_bytes(b"x")
    old = os.umask(0o022)  # the service inherits it
    try:
        service = ServiceProcess(cfg)
    finally:
        os.umask(old)
    try:
        service.wait_ready()
        wait_for(lambda: service.events("job_done"), message="job_done")
        state = tmp_path / "state"
        modes = {
            p.name: stat.S_IMODE(p.stat().st_mode)
            for p in state.iterdir()
            if p.name.startswith(DB_FILE)
        }
        assert modes == {name: 0o600 for name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm")}
        service.signal(signal.SIGTERM)
        assert service.wait(30) == 0
    finally:
        service.kill()


def test_the_wal_checksum_matches_sqlites_own(tmp_path: Path) -> None:
    """The frame checksum is SQLite's: every committed frame of a real log verifies."""
    from dpypeline.state.wal import _checksum

    db = tmp_path / "x.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (x)")
    for _ in range(5):
        conn.execute("INSERT INTO t VALUES (?)", (os.urandom(100),))
    data = wal_of(db).read_bytes()
    conn.close()
    magic, _, page_size, _, _, _, c1, c2 = struct.unpack(">8I", data[:32])
    seed = [c1, c2]
    frames = (len(data) - 32) // (24 + page_size)
    assert frames >= 6
    for n in range(frames):
        frame = data[32 + n * (24 + page_size) : 32 + (n + 1) * (24 + page_size)]
        seed = list(_checksum(frame[:8] + frame[24:], seed, magic & 1))
        assert tuple(seed) == struct.unpack(">2I", frame[16:24])


def test_two_replacements_in_the_same_second_each_keep_what_they_replaced(tmp_path: Path) -> None:
    from dpypeline.state import copies
    from dpypeline.state.ledger import Ledger

    cache = tmp_path / "state"
    Ledger(cache).close()
    first = copies.reset(cache)
    second = copies.reset(cache)  # the same second, nearly always
    assert first is not None
    assert second is not None
    assert first != second
    assert (first / "dpypeline.db").is_file()
    assert (second / "dpypeline.db").is_file()


def test_openers_racing_to_make_a_new_ledger_never_take_it_for_a_lost_one(tmp_path: Path) -> None:
    """The service, the metrics endpoint's reader and an operator's `status` may all open a
    CACHE_DIR whose ledger does not exist yet at the same instant: one makes it, the others
    find it whole, none is refused."""
    import threading

    from dpypeline.state.ledger import Ledger

    failures: list[BaseException] = []
    for attempt in range(15):
        cache = tmp_path / f"state{attempt}"
        cache.mkdir()
        start = threading.Barrier(4)

        def open_it(service: bool, cache: Path = cache, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                Ledger(cache, service=service).close()
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                failures.append(exc)

        threads = [threading.Thread(target=open_it, args=(n == 0,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
