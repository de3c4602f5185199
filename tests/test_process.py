"""Crash, restart and stop behaviour of the service, and what it does with bad, flaky and
vanishing inputs and an outage.

Real `dpypeline run` processes, for what only a process shows:

- a stop by SIGTERM and a start again: the process exits 0, and the next one finds what
  was made while none ran and reruns nothing;
- SIGKILL at random moments: nothing but the ledger on disk survives a kill (the start
  after the last one, which drains the queue, runs here);
- tasks that crash the process (SIGKILL from inside) or hang it past its timeout (only a
  re-executed process gets the thread back): the supervisor's restarts end them dead;
- the CLI against a running process: ``status`` names its pid, ``enqueue`` and ``retry``
  reach it from another process;
- a second process on the same cache dir: refused, with exit 2.

The others drive the same service loop in a thread of this process (``ServiceThread``):
their point is what the loop does, not the process around it. What a first or second stop
signal and ``stop_grace`` do to a running job is proved step by step in test_service.py,
and that a real SIGTERM stops a real process cleanly in test_signals.py.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    ServiceProcess,
    ServiceThread,
    cli,
    dpypeline,
    jobs,
    runs,
    status,
    wait_for,
    write_config,
)


def make_pipeline(
    tmp_path: Path,
    task: str = "taskbox.record",
    *,
    monitor: bool = True,
    retry: dict[str, Any] | None = None,
    stop_grace: str = "30s",
    **task_args: Any,
) -> tuple[Path, Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    log = tmp_path / "runs.log"
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "monitor": monitor,
            "stop_grace": stop_grace,
            "watch": [{"path": str(inbox), "settle": "200ms", "rescan_interval": "30s"}],
            "retry": retry
            or {
                "max_attempts": 3,
                "backoff": {"initial": "200ms", "max": "1s"},
                "job_timeout": "1s",
            },
            "jobs": [
                {"name": "work", "tasks": [{"task": task, "with": {"log": str(log), **task_args}}]}
            ],
            "logging": {"format": "json"},
        },
    )
    return cfg, inbox, log


def run_until_drained(cfg: Path, restarts: int = 10) -> list[int]:
    """Act as the supervisor: run `--once` again after each crash until it drains (exit 0,
    or 3 when some job of that run ended dead)."""
    codes = []
    for _ in range(restarts):
        proc = dpypeline("run", "-c", str(cfg), "--once", timeout=120)
        codes.append(proc.returncode)
        if proc.returncode in (0, 3):
            return codes
    pytest.fail(f"the service did not drain after {restarts} runs: exit codes {codes}")


def drain(cfg: Path, started: list[ServiceThread]) -> int:
    """``dpypeline run --once`` in this process, until it drains: exit 0, or 3 when some job
    of the run ended dead."""
    svc = ServiceThread(cfg, once=True)
    started.append(svc)
    code = svc.wait(120)
    assert code in (0, 3), f"the service did not drain: exit code {code}\n{svc.log_text()}"
    return code


@pytest.mark.slow
def test_stop_start_reruns_nothing_and_takes_files_made_while_stopped_in_path_order(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    cfg, inbox, log = make_pipeline(tmp_path)
    for i in (1, 2):
        (inbox / f"before{i}.nc").write_bytes(b"x")
    first = ServiceProcess(cfg)
    service_processes.append(first)
    first.wait_ready()
    wait_for(lambda: len(runs(log)) == 2, message="the first two files")
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    assert any(e["event"] == "service_stopped" for e in first.events())

    for name in ["y2/m10.nc", "y2/m9.nc", "y10/m1.nc", "y1/m11.nc", "y1/m2.nc"]:
        (inbox / name).parent.mkdir(exist_ok=True)
        (inbox / name).write_bytes(name.encode())
    second = ServiceProcess(cfg)
    service_processes.append(second)
    second.wait_ready()
    wait_for(lambda: len(runs(log)) == 7, message="files made while stopped")
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0  # stopped: whatever it would have run more, it ran by now
    assert [r[0] for r in runs(log)] == [
        "before1.nc",
        "before2.nc",
        "y1/m2.nc",
        "y1/m11.nc",
        "y2/m9.nc",
        "y2/m10.nc",
        "y10/m1.nc",
    ]


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_file_and_runs_each_done_once(
    tmp_path: Path,
    service_processes: list[ServiceProcess],
    service_threads: list[ServiceThread],
) -> None:
    cfg, inbox, log = make_pipeline(tmp_path, delay=0.01)
    n_files = 240
    rng = random.Random(20261125)
    writer_done = threading.Event()

    def writer() -> None:
        for i in range(n_files):
            d = inbox / f"batch{i // 40}"
            d.mkdir(exist_ok=True)
            tmp = d / f".f{i}.nc.part"
            tmp.write_bytes(os.urandom(64))
            os.rename(tmp, d / f"f{i}.nc")
            time.sleep(rng.uniform(0, 0.02))
        writer_done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    kills = 0
    while kills < 6:
        svc = ServiceProcess(cfg)
        service_processes.append(svc)
        svc.wait_ready()
        time.sleep(rng.uniform(0.3, 1.2))
        svc.kill()
        kills += 1
    thread.join()
    assert writer_done.is_set()
    drain(cfg, service_threads)  # the start after the last kill: the ledger as it left it

    counts = status(cfg)
    assert counts["done"] == n_files, counts
    assert counts["queued"] == counts["running"] == counts["retrying"] == counts["dead"] == 0
    done = jobs(cfg, "done")
    assert len({j["path"] for j in done}) == n_files  # one done job per file, none lost
    ran = {r[0] for r in runs(log)}
    assert len(ran) == n_files
    # a job may run again only if it was running at a kill: at most one repeat per kill
    assert len(runs(log)) - n_files <= kills


@pytest.mark.slow
def test_tasks_that_crash_or_hang_the_process_end_dead_and_others_finish(tmp_path: Path) -> None:
    cfg, inbox, log = make_pipeline(
        tmp_path,
        task="taskbox.behave",
        retry={"max_attempts": 2, "backoff": {"initial": "100ms"}, "job_timeout": "1s"},
    )
    for name in ["a.nc", "crash.nc", "b.nc", "hang.nc", "spin.nc", "c.nc"]:
        (inbox / name).write_bytes(name.encode())
    run_until_drained(cfg, restarts=12)
    by_name = {Path(j["path"]).name: j for j in jobs(cfg)}
    assert {n: by_name[n]["state"] for n in by_name} == {
        "a.nc": "done",
        "b.nc": "done",
        "c.nc": "done",
        "crash.nc": "dead",
        "hang.nc": "dead",
        "spin.nc": "dead",
    }
    assert "stopped during each of its 2 attempts" in by_name["crash.nc"]["error"]
    assert "timed out" in by_name["hang.nc"]["error"]
    assert "timed out" in by_name["spin.nc"]["error"]
    assert all(by_name[n]["attempts"] == 2 for n in ("crash.nc", "hang.nc", "spin.nc"))
    assert sorted(r[0] for r in runs(log)) == ["a.nc", "b.nc", "c.nc"]


def test_flaky_task_is_done_after_three_attempts_without_delaying_other_jobs(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    cfg, inbox, log = make_pipeline(
        tmp_path, task="taskbox.behave", retry={"max_attempts": 5, "backoff": {"initial": "1s"}}
    )
    (inbox / "a-flaky.nc").write_bytes(b"f")
    for i in range(5):
        (inbox / f"b{i}.nc").write_bytes(b"x")
    drain(cfg, service_threads)
    by_name = {Path(j["path"]).name: j for j in jobs(cfg)}
    flaky = by_name["a-flaky.nc"]
    assert (flaky["state"], flaky["attempts"]) == ("done", 3)
    order = [r[0] for r in runs(log)]
    # the flaky file came first in path order, but the others did not wait for its backoff
    assert order == ["b0.nc", "b1.nc", "b2.nc", "b3.nc", "b4.nc", "a-flaky.nc"]


def test_bad_input_ends_dead_or_skipped_with_a_reason_and_the_rest_go_on(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    cfg, inbox, _log = make_pipeline(
        tmp_path, task="taskbox.behave", retry={"max_attempts": 2, "backoff": {"initial": "100ms"}}
    )
    for name in ["bad.nc", "corrupt.nc", "good.nc"]:
        (inbox / name).write_bytes(name.encode())
    drain(cfg, service_threads)
    by_name = {Path(j["path"]).name: j for j in jobs(cfg)}
    assert by_name["good.nc"]["state"] == "done"
    assert by_name["bad.nc"]["state"] == "dead"
    assert "ValueError: cannot make sense of bad.nc" in by_name["bad.nc"]["error"]
    assert "dpypeline retry" in by_name["bad.nc"]["error"]
    assert (by_name["corrupt.nc"]["state"], by_name["corrupt.nc"]["attempts"]) == ("dead", 1)
    assert "permanent" in by_name["corrupt.nc"]["error"]
    listed = cli("jobs", "-c", str(cfg), "--state", "dead")
    assert listed.returncode == 0, listed.stderr
    text = listed.stdout
    assert "bad.nc" in text
    assert "cannot make sense" in text


def test_a_file_that_vanished_before_its_job_ran_is_skipped(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    cfg, inbox, _log = make_pipeline(tmp_path, delay=1.0)
    (inbox / "a.nc").write_bytes(b"a")
    (inbox / "b.nc").write_bytes(b"b")
    svc = ServiceThread(cfg)
    service_threads.append(svc)
    svc.wait_ready()
    wait_for(lambda: any(j["state"] == "running" for j in jobs(cfg)), message="a running job")
    (inbox / "b.nc").unlink()  # removed while a.nc's job runs
    wait_for(lambda: status(cfg)["skipped"] == 1, message="b.nc skipped")
    skipped = jobs(cfg, "skipped")
    assert Path(skipped[0]["path"]).name == "b.nc"
    assert "vanished" in skipped[0]["error"]
    svc.stop()
    assert svc.wait(30) == 0


@pytest.mark.slow
def test_cli_works_against_a_running_service(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    cfg, inbox, _log = make_pipeline(tmp_path, task="taskbox.behave", retry={"max_attempts": 1})
    (inbox / "bad.nc").write_bytes(b"b")
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready()
    wait_for(lambda: status(cfg)["dead"] == 1, message="bad.nc dead")
    report = status(cfg)
    assert report["service_pid"] == svc.proc.pid
    assert {"queued", "running", "retrying", "done", "dead", "skipped"} <= report.keys()
    assert report["recent_errors"][0]["path"].endswith("bad.nc")

    # enqueue: a file outside the patterns' reach of events (written while ignored), by hand
    manual = inbox / "manual.nc"
    manual.write_bytes(b"m")
    wait_for(lambda: status(cfg)["done"] == 1, message="manual.nc via the watcher")
    out = dpypeline("enqueue", "-c", str(cfg), str(manual), check=True).stdout
    assert out.startswith("0 new job(s)")  # same dedupe as the watcher

    # retry: fix the cause (rename the task's trigger away) is not possible for a name, so
    # give the dead job a fresh attempt and see it run (and fail) again
    [dead] = jobs(cfg, "dead")
    assert dpypeline("retry", "-c", str(cfg), str(dead["id"]), check=True).returncode == 0
    wait_for(
        lambda: jobs(cfg, "dead") and jobs(cfg, "dead")[0]["updated"] != dead["updated"],
        message="the retried job to run again",
    )
    assert sum(1 for j in jobs(cfg) if j["path"].endswith("bad.nc")) == 1
    assert dpypeline("enqueue", "-c", str(cfg), "/etc/hostname").returncode == 1
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


@pytest.mark.slow
def test_a_second_service_on_the_same_cache_dir_is_refused(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    cfg, _, _ = make_pipeline(tmp_path)
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready()
    proc = dpypeline("run", "-c", str(cfg), "--once")
    assert proc.returncode == 2
    assert "another dpypeline service" in proc.stderr
    assert str(svc.proc.pid) in proc.stderr
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


def test_once_drains_including_files_arriving_meanwhile_and_exits_0(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    cfg, inbox, log = make_pipeline(tmp_path, monitor=False, delay=0.3)
    for i in range(3):
        (inbox / f"a{i}.nc").write_bytes(b"a")

    def late() -> None:
        wait_for(lambda: runs(log), message="the first run")
        (inbox / "late.nc").write_bytes(b"late")

    thread = threading.Thread(target=late)
    thread.start()
    svc = ServiceThread(cfg)  # monitor: false == --once
    service_threads.append(svc)
    code = svc.wait(60)
    thread.join()
    assert code == 0, svc.log_text()
    assert sorted(r[0] for r in runs(log)) == ["a0.nc", "a1.nc", "a2.nc", "late.nc"]


def test_an_outage_pauses_the_service_without_spending_attempts(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    down = tmp_path / "store-is-down"
    down.touch()
    cfg, inbox, log = make_pipeline(
        tmp_path,
        task="taskbox.needs_service",
        down=str(down),
        retry={"max_attempts": 2, "backoff": {"initial": "100ms", "max": "400ms"}},
    )
    for name in ("a.nc", "b.nc", "c.nc"):
        (inbox / name).write_bytes(b"x")
    svc = ServiceThread(cfg)
    service_threads.append(svc)
    svc.wait_ready()
    wait_for(
        lambda: sum(e.get("event") == "service_paused" for e in svc.events()) >= 4,
        message="several pauses, more than max_attempts",
    )
    counts = status(cfg)
    assert counts["dead"] == counts["done"] == 0
    assert all(j["attempts"] == 0 for j in jobs(cfg) if j["state"] == "queued")
    down.unlink()  # the service is back
    wait_for(lambda: status(cfg)["done"] == 3, message="every job after the outage")
    assert [r[0] for r in runs(log)] == ["a.nc", "b.nc", "c.nc"]  # order kept
    assert all(j["attempts"] == 1 for j in jobs(cfg))
    svc.stop()
    assert svc.wait(30) == 0
