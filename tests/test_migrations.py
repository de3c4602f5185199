"""The ledger's schema version and upgrades: a CACHE_DIR left by dpypeline 0.2.0 opens, is
upgraded after a backup, and its jobs carry on; a database newer than the code, or an
SQLite too old for the ledger's SQL, is refused with what to do."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from dpypeline.errors import StateError
from dpypeline.state import schema
from dpypeline.state.cachedir import DB_FILE, service_pid
from dpypeline.state.ledger import JobState, Ledger, Recovery

FIXTURE = Path(__file__).parent / "fixtures" / "cache-0.2.0"


def query(db_path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(db_path)
    db.text_factory = bytes
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def version(db_path: Path) -> int:
    return int(query(db_path, "PRAGMA user_version")[0][0])


def tables(db_path: Path) -> set[str]:
    return {row[0].decode() for row in query(db_path, "SELECT name FROM sqlite_master")}


def columns(db_path: Path) -> set[str]:
    return {row[1].decode() for row in query(db_path, "PRAGMA table_info(jobs)")}


@pytest.fixture
def old_cache(tmp_path: Path) -> Path:
    """A copy of the CACHE_DIR a 0.2.0 service left when it was killed (see
    ``fixtures/make_cache_0_2_0.py``): jobs done, skipped, retrying, dead, running, held
    behind the retrying one, queued in its ready queue and queued outside it."""
    cache = tmp_path / "cache"
    shutil.copytree(FIXTURE, cache)
    return cache


def test_a_0_2_0_cache_dir_is_upgraded_after_a_backup_and_its_jobs_carry_on(
    old_cache: Path,
) -> None:
    db_path = old_cache / DB_FILE
    before = query(db_path, "SELECT id, path, state, attempts, error FROM jobs ORDER BY id")
    assert version(db_path) == 0

    ledger = Ledger(old_cache, service=True)
    try:
        assert version(db_path) == schema.SCHEMA_VERSION
        assert "admitted" not in columns(db_path)
        assert "ack_queue_ready" not in tables(db_path)
        backup = schema.backup_path(db_path, 0)
        assert version(backup) == 0
        assert {"admitted"} <= columns(backup)
        assert "ack_queue_ready" in tables(backup)
        assert (
            query(backup, "SELECT id, path, state, attempts, error FROM jobs ORDER BY id") == before
        )

        # the counts were taken from the rows as they were, and are kept from then on
        assert ledger.tally() == grouped(db_path)

        # f06 was running when the 0.2.0 service was killed: it runs again, first
        assert ledger.recover(max_attempts=5, now=3000.0) == Recovery(resumed=1, dead=0)
        ran = []
        while (claim := ledger.claim(3000.0)) is not None:
            ran.append((claim.record.path.rsplit("/", 1)[1], claim.record.attempts))
            ledger.finish(claim, JobState.DONE, 3001.0)
        assert ran == [("f06.nc", 2), ("f07.nc", 1), ("bad\udcff.nc", 1), ("f08.nc", 1)]

        # f03 waits out its backoff (until 2000.0, passed); f05, held behind it, runs after it
        assert ledger.promote_due(3002.0) == 1
        ran = []
        while (claim := ledger.claim(3002.0)) is not None:
            ran.append((claim.record.path.rsplit("/", 1)[1], claim.record.attempts))
            ledger.finish(claim, JobState.DONE, 3003.0)
        assert ran == [("f03.nc", 2), ("f05.nc", 1)]

        # done and skipped ones never ran again; the dead one stays dead
        assert ledger.counts() == {
            "queued": 0,
            "running": 0,
            "retrying": 0,
            "done": 7,
            "dead": 1,
            "skipped": 1,
        }
        dead = ledger.jobs(JobState.DEAD)
        assert [(r.path, r.error) for r in dead] == [
            ("/data/in/f04.nc", "corrupt input: re-send the file")
        ]
        first = ledger.get(1)
        assert first is not None
        assert (first.state, first.finished) == (JobState.DONE, 1002.0)
    finally:
        ledger.close()

    # opened again, nothing more to upgrade
    Ledger(old_cache).close()
    assert version(db_path) == schema.SCHEMA_VERSION


def grouped(db_path: Path) -> dict[tuple[str, str, str], int]:
    """Jobs by (job, state, source), counted row by row."""
    rows = query(db_path, "SELECT job, state, source, count(*) FROM jobs GROUP BY 1, 2, 3")
    return {(job.decode(), state.decode(), src.decode()): n for job, state, src, n in rows}


def test_a_version_2_ledger_is_upgraded_with_its_jobs_counted(tmp_path: Path) -> None:
    """The schema before the counts table: its jobs, in every state and from every source,
    are counted by the upgrade, and every change after it keeps the counts."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    db_path = cache / DB_FILE
    db = sqlite3.connect(db_path, isolation_level=None)
    for migration in schema.MIGRATIONS:
        if migration.version <= 2:
            for statement in migration.statements:
                db.execute(statement)
    db.execute("PRAGMA user_version = 2")
    states = ["queued", "running", "retrying", "done", "dead", "skipped"]
    db.executemany(
        "INSERT INTO jobs (path, size, mtime_ns, job, root, state, attempts, not_before,"
        " source, created, updated, position) VALUES (?, 1, 1, ?, '/data', ?, 1, ?, ?, 1, 1, ?)",
        [
            (
                f"/data/f{i}.nc",
                ("a", "b")[i % 2],
                states[i % 6],
                10.0 if states[i % 6] == "retrying" else None,
                ("watch", "scan", "cli")[i % 3],
                i,
            )
            for i in range(1, 301)
        ],
    )
    db.close()
    before = grouped(db_path)
    assert {state for _, state, _ in before} == set(states)

    ledger = Ledger(cache, service=True)
    try:
        assert version(db_path) == schema.SCHEMA_VERSION
        assert version(schema.backup_path(db_path, 2)) == 2
        assert "job_counts" not in tables(schema.backup_path(db_path, 2))
        assert ledger.tally() == before
        assert ledger.counts() == dict.fromkeys(states, 50)

        assert ledger.recover(max_attempts=5, now=20.0).resumed == 50
        assert ledger.promote_due(20.0) == 50
        assert ledger.retry(None, 20.0) == 50
        while (claim := ledger.claim(21.0)) is not None:
            ledger.finish(claim, JobState.DONE, 22.0)
        assert ledger.tally() == grouped(db_path)
        assert ledger.counts() == {**dict.fromkeys(states, 0), "done": 250, "skipped": 50}
    finally:
        ledger.close()


def test_an_upgrade_that_fails_leaves_the_database_as_it_was(
    old_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = schema.Migration(schema.SCHEMA_VERSION + 1, "broken", ("ALTER TABLE nowhere ADD x",))
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, broken))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", broken.version)
    db_path = old_cache / DB_FILE
    with pytest.raises(StateError) as refused:
        Ledger(old_cache, service=True)
    said = str(refused.value)
    assert f"upgrading the ledger {db_path} from schema version 0 to {broken.version}" in said
    assert "no such table: nowhere" in said
    assert "Nothing was changed" in said
    assert f"A copy made before it is {schema.backup_path(db_path, 0)}" in said
    assert "writable" not in said  # the directory was writable: the upgrade failed
    assert service_pid(old_cache) is None
    assert version(db_path) == 0
    assert "admitted" in columns(db_path)
    assert "ack_queue_ready" in tables(db_path)
    assert schema.backup_path(db_path, 0).exists()


def test_a_new_cache_dir_starts_at_the_current_version_without_a_backup(tmp_path: Path) -> None:
    Ledger(tmp_path / "cache").close()
    db_path = tmp_path / "cache" / DB_FILE
    assert version(db_path) == schema.SCHEMA_VERSION
    assert "position" in columns(db_path)
    assert sorted(p.name for p in db_path.parent.glob("*.bak")) == []


def test_a_database_newer_than_the_code_is_refused_with_what_to_do(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    Ledger(cache).close()
    db_path = cache / DB_FILE
    newer = schema.SCHEMA_VERSION + 1
    db = sqlite3.connect(db_path)
    db.execute(f"PRAGMA user_version = {newer}")
    db.close()
    with pytest.raises(StateError) as info:
        Ledger(cache, service=True)
    message = str(info.value)
    assert f"schema version {newer}" in message
    assert f"up to {schema.SCHEMA_VERSION}" in message
    assert "newer dpypeline" in message
    assert str(db_path) in message
    assert service_pid(cache) is None
    assert version(db_path) == newer  # untouched

    # when this version's backup from before that upgrade is there, the message names it
    schema.backup_path(db_path, schema.SCHEMA_VERSION).write_bytes(b"")
    with pytest.raises(StateError, match=rf"replace it with .*\.v{schema.SCHEMA_VERSION}\.bak"):
        Ledger(cache)


def test_an_sqlite_older_than_3_35_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the version the sqlite3 module reports is replaced: no older SQLite is at hand
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    with pytest.raises(StateError, match=r"SQLite 3\.31\.1 is too old: dpypeline needs 3\.35"):
        Ledger(tmp_path / "cache", service=True)
    assert not (tmp_path / "cache").exists()  # refused before anything was made
