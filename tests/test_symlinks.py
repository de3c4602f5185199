"""Symbolic links are never followed unless the watch says so, however they arrive, and the
check is made again when the job opens the file. The service loop runs in a thread of this
process, as `dpypeline run` runs it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from conftest import ServiceThread, cli, jobs, wait_for, write_config

SECRET = b"token=hunter2"


def setup(tmp_path: Path, **watch: Any) -> tuple[Path, Path, Path, Path]:
    inbox, log = tmp_path / "inbox", tmp_path / "read.log"
    inbox.mkdir()
    secret = tmp_path / "credentials.json"
    secret.write_bytes(SECRET)
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms", "rescan_interval": 0, **watch}],
            "jobs": [
                {"name": "read", "tasks": [{"task": "taskbox.read", "with": {"log": str(log)}}]}
            ],
            "logging": {"format": "json"},
        },
    )
    return cfg, inbox, log, secret


def read(log: Path) -> dict[str, bytes]:
    if not log.exists():
        return {}
    return {
        rel: bytes.fromhex(data)
        for rel, data in (line.split("\t") for line in log.read_text().splitlines())
    }


def test_a_symlink_renamed_into_a_watched_directory_is_never_followed(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    cfg, inbox, log, secret = setup(tmp_path)
    svc = ServiceThread(cfg)
    service_threads.append(svc)
    svc.wait_ready()
    link = tmp_path / "staging.nc"
    link.symlink_to(secret)
    link.rename(inbox / "creds.nc")  # a rename: a "complete" file as far as events go
    (inbox / "good.nc").write_bytes(b"good")
    wait_for(lambda: "good.nc" in read(log), message="the good file", detail=svc.log_text)
    wait_for(
        lambda: (
            "creds.nc" in read(log) or [e for e in svc.events() if e.get("event") == "file_ignored"]
        ),
        message="the link to be ignored",
        detail=svc.log_text,
    )
    assert read(log) == {"good.nc": b"good"}
    [ignored] = [e for e in svc.events() if e.get("event") == "file_ignored"]
    assert ignored["file"] == str(inbox / "creds.nc")
    assert "symbolic link" in ignored["reason"]
    assert [j["path"] for j in jobs(cfg)] == [str(inbox / "good.nc")]
    svc.stop()
    assert svc.wait(30) == 0


def test_a_file_replaced_by_a_symlink_before_its_job_runs_is_skipped(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    cfg, inbox, log, secret = setup(tmp_path)
    (inbox / "sub").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for victim in (inbox / "f.nc", inbox / "sub" / "g.nc"):
        victim.write_bytes(b"x" * len(SECRET))  # the same size and mtime as the secret
        os.utime(victim, ns=(secret.stat().st_mtime_ns, secret.stat().st_mtime_ns))
    (elsewhere / "g.nc").write_bytes(SECRET)
    os.utime(elsewhere / "g.nc", ns=(secret.stat().st_mtime_ns, secret.stat().st_mtime_ns))
    enq = cli("enqueue", "-c", str(cfg), str(inbox / "f.nc"), str(inbox / "sub"))
    assert enq.stdout.startswith("2 new job(s)"), enq.stderr
    # between the event and the job: the file becomes a link, a directory becomes a link
    (inbox / "f.nc").unlink()
    (inbox / "f.nc").symlink_to(secret)
    (inbox / "sub").rename(tmp_path / "old-sub")
    (inbox / "sub").symlink_to(elsewhere)
    run = ServiceThread(cfg, once=True)
    service_threads.append(run)
    assert run.wait(60) == 0, run.log_text()
    assert read(log) == {}
    states = {j["path"]: (j["state"], j["error"]) for j in jobs(cfg)}
    assert states[str(inbox / "f.nc")][0] == "skipped"
    assert "a symbolic link" in states[str(inbox / "f.nc")][1]
    assert states[str(inbox / "sub" / "g.nc")][0] == "skipped"
    assert "goes through a symbolic link" in states[str(inbox / "sub" / "g.nc")][1]


def test_a_watch_that_follows_symlinks_processes_links_to_files(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    cfg, inbox, log, secret = setup(tmp_path, follow_symlinks=True)
    (inbox / "linked.nc").symlink_to(secret)
    (inbox / "dangling.nc").symlink_to(tmp_path / "nowhere")
    (inbox / "dir").symlink_to(tmp_path)  # links to directories are never entered
    run = ServiceThread(cfg, once=True)
    service_threads.append(run)
    assert run.wait(60) == 0, run.log_text()
    assert read(log) == {"linked.nc": SECRET}
    assert [j["state"] for j in jobs(cfg)] == ["done"]
