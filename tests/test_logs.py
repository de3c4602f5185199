"""Logs: one shape for our events and the libraries' stdlib loggers; one summary per job."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from dpypeline import Job, Pipeline, Task, logs
from dpypeline.errors import PermanentError


def test_stdlib_loggers_of_libraries_come_out_as_json_lines() -> None:
    stream = io.StringIO()
    try:
        logs.configure("json", "info", stream=stream)
        logging.getLogger("watchdog.observers.inotify_c").warning("queue %s", "overflowed")
        logs.get_logger("dpypeline.test").info("file_stable", file="/x.nc")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert lines[0]["event"] == "queue overflowed"
    assert lines[0]["level"] == "warning"
    assert lines[0]["logger"] == "watchdog.observers.inotify_c"
    assert lines[1]["event"] == "file_stable"
    assert lines[1]["file"] == "/x.nc"
    assert "timestamp" in lines[1]


def test_each_job_ends_with_one_summary_line_with_its_context(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "good.txt").write_text("g")
    (inbox / "worse.txt").write_text("w")

    def check(path: str) -> str:
        if "worse" in path:
            raise PermanentError("unreadable header")
        return path

    pipeline = Pipeline(
        watch=[{"path": str(inbox), "settle": "100ms"}],
        jobs=[Job("check", [Task(check)])],
        cache_dir=str(tmp_path / "state"),
    )
    with capture_logs() as captured:
        assert pipeline.run(once=True) == 3  # a job ended dead
    summaries = [e for e in captured if e["event"] in ("job_done", "job_dead")]
    assert [(Path(e["file"]).name, e["event"]) for e in summaries] == [
        ("good.txt", "job_done"),
        ("worse.txt", "job_dead"),
    ]
    for e in summaries:
        assert {"job_id", "file", "job", "attempt", "state"} <= e.keys()
    assert summaries[0]["duration"] >= 0
    assert "unreadable header" in summaries[1]["error"]


def _decode_entry(data: bytes) -> dict[str, str]:
    """Parse one native-protocol journal entry (what journald itself does)."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            size = int.from_bytes(data[nl + 1 : nl + 9], "little")
            fields[line.decode()] = data[nl + 9 : nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return fields


def test_under_systemd_each_event_is_a_journal_entry_with_indexed_fields(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "journal.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    try:
        logs.configure("journald", "info", journal_socket=str(path))
        log = logs.get_logger("dpypeline.worker")
        log.info("job_done", job_id=7, file="/in/x.nc", state="done", duration=0.5)
        try:
            raise ValueError("bad header\nsecond line")
        except ValueError:
            log.exception("job_dead", job_id=8, file="/in/y.nc", state="dead")
        logging.getLogger("s3fs").warning("slow %s", "bucket")
        entries = [_decode_entry(journal.recv(65536)) for _ in range(3)]
    finally:
        journal.close()
        structlog.reset_defaults()
        for handler in logging.getLogger().handlers:
            handler.close()
        logging.getLogger().handlers.clear()
    done, dead, foreign = entries
    assert done["DPYPELINE_EVENT"] == "job_done"
    assert done["DPYPELINE_JOB_ID"] == "7"
    assert done["DPYPELINE_FILE"] == "/in/x.nc"
    assert done["DPYPELINE_STATE"] == "done"
    assert done["PRIORITY"] == "6"
    assert done["MESSAGE"].startswith("job_done job_id=7")
    assert dead["PRIORITY"] == "3"
    assert dead["DPYPELINE_STATE"] == "dead"
    assert "ValueError: bad header\nsecond line" in dead["DPYPELINE_EXCEPTION"]
    assert foreign["MESSAGE"].startswith("slow bucket")
    assert foreign["PRIORITY"] == "4"


def test_journald_format_without_a_journal_falls_back_to_json_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    try:
        logs.configure("journald", "info", stream=stream, journal_socket=str(tmp_path / "none"))
        logs.get_logger().info("service_ready", name="x")
        line = json.loads(stream.getvalue().splitlines()[0])
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert line["event"] == "service_ready"
