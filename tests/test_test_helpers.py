"""The test suite's own helpers keep their promises: the in-process ``status`` and ``jobs``
say what the real commands print, and the thread guard sees every thread left running."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from conftest import dpypeline, jobs, status, threads_left, write_config


def test_in_process_status_and_jobs_print_what_the_commands_print(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a.nc", "b.nc"):
        (inbox / name).write_bytes(b"x")
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox)}],
            "jobs": [{"name": "r", "tasks": [{"task": "taskbox.record", "with": {"log": "x"}}]}],
        },
    )
    dpypeline("enqueue", "-c", str(cfg), str(inbox), check=True)
    real = json.loads(dpypeline("status", "-c", str(cfg), "--json", check=True).stdout)
    assert real["queued"] == 2
    assert status(cfg) == real
    listed = dpypeline("jobs", "-c", str(cfg), "--json", "--state", "queued", check=True).stdout
    assert jobs(cfg, "queued") == json.loads(listed)


def test_the_thread_guard_counts_every_thread_a_test_leaves_running() -> None:
    before = set(threading.enumerate())
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="any-name")
    thread.start()
    try:
        assert threads_left(before) == [thread]
    finally:
        stop.set()
        thread.join()
    assert threads_left(before) == []
