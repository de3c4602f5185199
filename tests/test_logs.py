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
        assert pipeline.run(once=True) == 0
    summaries = [e for e in captured if e["event"] in ("job_done", "job_dead")]
    assert [(Path(e["file"]).name, e["event"]) for e in summaries] == [
        ("good.txt", "job_done"),
        ("worse.txt", "job_dead"),
    ]
    for e in summaries:
        assert {"job_id", "file", "job", "attempt", "state"} <= e.keys()
    assert summaries[0]["duration"] >= 0
    assert "unreadable header" in summaries[1]["error"]
