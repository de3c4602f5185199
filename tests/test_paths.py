"""File names are bytes: a name that is not valid UTF-8 is processed like any other, on the
real file, shown escaped to people, and never stops the service (the service loop in a
thread of this process, its log the JSON lines `dpypeline run` writes)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from conftest import ServiceThread, cli, jobs, status, wait_for, write_config
from dpypeline.loop import intake
from dpypeline.paths import shown
from dpypeline.state.cachedir import DB_FILE
from dpypeline.state.ledger import JobState, Ledger
from dpypeline.watching.scan import FileVersion

BAD = os.fsdecode(b"bad\xff.dat")  # how Python hands the name over: a lone surrogate
BAD_DIR = os.fsdecode(b"d\xfe\xfd")


def read_log(log: Path) -> dict[str, str]:
    """relative path -> hex of the content the task read (taskbox.read)."""
    if not log.exists():
        return {}
    lines = os.fsdecode(log.read_bytes()).split("\n")
    return dict(line.split("\t") for line in lines if line)


def config(tmp_path: Path, **extra: Any) -> tuple[Path, Path, Path]:
    inbox, log = tmp_path / "inbox", tmp_path / "read.log"
    inbox.mkdir(exist_ok=True)
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms", "rescan_interval": 0}],
            "jobs": [
                {"name": "read", "tasks": [{"task": "taskbox.read", "with": {"log": str(log)}}]}
            ],
            "logging": {"format": "json"},
            **extra,
        },
    )
    return cfg, inbox, log


def test_names_that_are_not_utf8_are_processed_on_the_real_file_and_never_stop_the_service(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    cfg, inbox, log = config(tmp_path)
    (inbox / BAD).write_bytes(b"at start")  # found by the start-up scan
    svc = ServiceThread(cfg)
    service_threads.append(svc)
    svc.wait_ready()
    (inbox / BAD_DIR).mkdir()
    (inbox / BAD_DIR / BAD).write_bytes(b"in a bad directory")  # seen by inotify
    (inbox / "good.dat").write_bytes(b"good")
    expected = {
        BAD: b"at start".hex(),
        f"{BAD_DIR}/{BAD}": b"in a bad directory".hex(),
        "good.dat": b"good".hex(),
    }
    wait_for(  # job_done is logged after the task's own write to `log`
        lambda: len(svc.events("job_done")) >= len(expected) or not svc.running(),
        message="every job done",
        detail=svc.log_text,
    )
    assert svc.running(), svc.log_text()
    assert read_log(log) == expected
    # people see the bytes escaped, in the log and on the command line
    assert sorted(e["file"] for e in svc.events("job_done")) == sorted(
        [
            f"{inbox}/bad\\xff.dat",
            f"{inbox}/d\\xfe\\xfd/bad\\xff.dat",
            f"{inbox}/good.dat",
        ]
    )
    listed = cli("jobs", "-c", str(cfg))
    assert listed.returncode == 0, listed.stderr
    listing = listed.stdout
    assert "d\\xfe\\xfd/bad\\xff.dat" in listing
    assert {j["state"] for j in jobs(cfg)} == {"done"}
    # dpypeline enqueue of such a path: deduplicated like any other
    enq = cli("enqueue", "-c", str(cfg), str(inbox / BAD))
    assert enq.returncode == 0, enq.stderr
    assert enq.stdout.startswith("0 new job(s) from 1 file(s)")
    svc.stop()
    assert svc.wait(30) == 0
    # a restart finds the same names known: nothing runs again, nothing fails
    again = ServiceThread(cfg, once=True)
    service_threads.append(again)
    assert again.wait(30) == 0, again.log_text()
    assert status(cfg)["done"] == 3
    assert len(log.read_bytes().splitlines()) == 3


def test_the_ledger_keeps_the_bytes_of_a_name_exactly(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "state", service=True)
    try:
        root = os.fsdecode(b"/data/r\xe9")  # a Latin-1 name: not UTF-8
        f = FileVersion(f"{root}/{BAD}", 1, 2)
        assert ledger.enqueue([f], root, ["j"], "watch", 0.0) == 1
        assert ledger.unknown([f], ["j"]) == []
        claim = ledger.claim(1.0)
        assert claim is not None
        assert (claim.record.path, claim.record.root) == (f.path, root)
        ledger.finish(claim, JobState.DEAD, 2.0, error=f"cannot read {f.path}")
        assert ledger.get(claim.record.id).error == "cannot read /data/r\\xe9/bad\\xff.dat"  # type: ignore[union-attr]
        raw = ledger._db.execute("SELECT CAST(path AS BLOB) FROM jobs").fetchone()[0]
        assert raw == b"/data/r\xe9/bad\xff.dat"
        assert ledger.prune(1e9, 0.0, present=[], root=root) == 1
    finally:
        ledger.close()


def test_a_database_written_before_still_knows_its_files(tmp_path: Path) -> None:
    """Rows written as UTF-8 text (every row so far) match the same files as before."""
    Ledger(tmp_path / "state").close()
    db = sqlite3.connect(tmp_path / "state" / DB_FILE)
    db.execute(
        "INSERT INTO jobs (path, size, mtime_ns, job, root, state, source, created, updated)"
        " VALUES (?, 1, 2, 'j', ?, 'done', 'watch', 0, 0)",
        ("/data/sée.nc", "/data"),
    )
    db.commit()
    db.close()
    ledger = Ledger(tmp_path / "state")
    try:
        f = FileVersion("/data/sée.nc", 1, 2)
        assert ledger.unknown([f], ["j"]) == []
        assert ledger.enqueue([f], "/data", ["j"], "watch", 1.0) == 0
        assert [j.path for j in ledger.jobs()] == ["/data/sée.nc"]
    finally:
        ledger.close()


def test_a_file_the_ledger_cannot_take_is_left_out_and_the_others_keep_their_order(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "state")
    try:
        files = [FileVersion(f"/d/f{i}", 1, 1) for i in range(9)]
        files[5] = FileVersion("/d/poison", 1, 2**70)  # no SQLite integer holds it
        with capture_logs() as logs:
            assert intake.unknown(ledger, files, ["j"]) == [0, 1, 2, 3, 4, 6, 7, 8]
            added = intake.enqueue(ledger, files, "/d", ["j"], source="watch", now=0.0)
        assert added == 8
        assert [j.path for j in reversed(ledger.jobs())] == [
            f.path for f in files if f.path != "/d/poison"
        ]
        refused = [e for e in logs if e["event"] == "file_refused"]
        assert [(e["file"], e["stage"]) for e in refused] == [
            ("/d/poison", "scan"),
            ("/d/poison", "enqueue"),
        ]
        assert "OverflowError" in refused[0]["error"]
    finally:
        ledger.close()


def test_a_failing_database_still_stops_the_intake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(tmp_path / "state")
    try:

        def failing(*args: Any) -> int:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(ledger, "enqueue", failing)
        with pytest.raises(sqlite3.OperationalError):
            intake.enqueue(ledger, [FileVersion("/d/f", 1, 1)], "/d", ["j"], source="w", now=0.0)
    finally:
        ledger.close()


def test_shown_escapes_only_bytes_that_do_not_decode() -> None:
    assert shown("plain/été.nc") == "plain/été.nc"
    assert shown(BAD) == "bad\\xff.dat"
    assert shown(os.fsdecode(b"na\xc3\xafve\xff")) == "naïve\\xff"
