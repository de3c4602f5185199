"""Wall-clock steps under a running service: the real process under libfaketime, whose wall
clock (CLOCK_REALTIME) the test steps by rewriting a file while the monotonic clock runs on
untouched, as NTP stepping a clock at boot or an operator's ``date -s`` would. Job
timeouts, settle windows, backoffs, timers and watchdog pings keep real time; the stored
backoff ends are checked in-process, in test_ledger.py."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ServiceProcess, env_for_subprocess, jobs, wait_for, write_config
from test_notify import NotifySocket

pytestmark = pytest.mark.slow

DAY, HOUR = 86400, 3600
LIBFAKETIME = [
    *glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"),
    *glob.glob("/usr/lib/faketime/libfaketimeMT.so.1"),
    *glob.glob("/usr/local/lib/faketime/libfaketimeMT.so.1"),
]


class WallClock:
    """The wall-clock offset of the processes started with ``env``: libfaketime reads it
    from the file at every call (``FAKETIME_NO_CACHE``); the monotonic clock is left alone
    (``FAKETIME_DONT_FAKE_MONOTONIC``). Python's ``time.sleep`` fails (EINVAL) in this mode
    of libfaketime 0.9.10, which is why the tasks here wait on events instead."""

    def __init__(self, path: Path, library: str) -> None:
        self.path, self.offset = path, 0
        self._write()
        self.env = {
            "LD_PRELOAD": library,
            "FAKETIME_TIMESTAMP_FILE": str(path),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def step(self, seconds: int) -> None:
        self.offset += seconds
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.offset:+d}\n")
        os.replace(tmp, self.path)  # never a half-written offset


@pytest.fixture
def wall_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WallClock:
    """A wall clock the test steps, in the environment of every process it starts."""
    if not LIBFAKETIME:
        print("libfaketime is not installed (Debian package faketime): clock steps skipped")
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    clock = WallClock(tmp_path / "faketime", LIBFAKETIME[0])
    for name, value in clock.env.items():
        monkeypatch.setenv(name, value)
    return clock


PROBE = """\
import datetime, sys, time
for _ in sys.stdin:
    print(time.time(), datetime.datetime.now().timestamp(),
          datetime.datetime.now(datetime.UTC).timestamp(), time.monotonic(), flush=True)
"""


def test_libfaketime_steps_the_wall_clock_of_python_and_not_the_monotonic_one(
    wall_clock: WallClock,
) -> None:
    """What every test below stands on."""
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env_for_subprocess(),
    )
    assert probe.stdin is not None
    assert probe.stdout is not None

    def read() -> list[float]:
        assert probe.stdin is not None
        assert probe.stdout is not None
        probe.stdin.write("\n")
        probe.stdin.flush()
        return [float(x) for x in probe.stdout.readline().split()]

    try:
        before = read()
        wall_clock.step(DAY)
        ahead = read()
        wall_clock.step(-DAY - HOUR)
        behind = read()
    finally:
        probe.stdin.close()
        probe.wait(10)
    for i in range(3):  # time.time, datetime.now, datetime.now(UTC)
        assert DAY - 5 < ahead[i] - before[i] < DAY + 5
        assert -HOUR - 5 < behind[i] - before[i] < -HOUR + 5
    assert 0 <= behind[3] - before[3] < 5  # time.monotonic runs on


def pipeline(
    tmp_path: Path, *, task: str, args: dict[str, Any], retry: dict[str, Any], settle: str = "100ms"
) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": settle, "rescan_interval": "1h"}],
            "retry": retry,
            "jobs": [{"name": "work", "tasks": [{"task": task, "with": args}]}],
            "logging": {"format": "json"},
        },
    )
    return cfg, inbox


def started(svc: ServiceProcess, n: int = 1) -> None:
    wait_for(lambda: len(svc.events("job_started")) >= n, message=f"{n} job_started")


def test_a_step_forward_neither_times_out_a_running_job_nor_spends_an_attempt(
    tmp_path: Path, wall_clock: WallClock, service_processes: list[ServiceProcess]
) -> None:
    log = tmp_path / "runs.log"
    cfg, inbox = pipeline(
        tmp_path,
        task="taskbox.work",
        args={"log": str(log), "seconds": 4},
        retry={"max_attempts": 1, "job_timeout": "1h"},  # the last attempt: a timeout kills it
    )
    (inbox / "a.nc").write_bytes(b"a")
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready()
    started(svc)
    wall_clock.step(DAY)
    assert not svc.events("job_done"), "the job ended before the step: nothing to prove"
    wait_for(lambda: svc.events("job_done", "job_dead", "job_retrying"), message="the job's end")
    [end] = svc.events("job_done", "job_dead", "job_retrying")
    assert end["event"] == "job_done", end
    assert [(j["state"], j["attempts"]) for j in jobs(cfg)] == [("done", 1)]


def test_a_step_back_still_times_out_a_job_on_time(
    tmp_path: Path, wall_clock: WallClock, service_processes: list[ServiceProcess]
) -> None:
    cfg, inbox = pipeline(
        tmp_path,
        task="taskbox.work",
        args={"log": str(tmp_path / "runs.log"), "seconds": 40},
        retry={"max_attempts": 1, "job_timeout": "3s"},
    )
    (inbox / "long.nc").write_bytes(b"l")
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready()
    started(svc)
    wall_clock.step(-HOUR)
    assert not svc.events("job_dead"), "timed out before the step: nothing to prove"
    # 3 s of timeout, the rest for a loaded machine: far from the 40 s the job would take
    wait_for(lambda: svc.events("job_dead"), timeout=15, message="the job timed out")
    [dead] = svc.events("job_dead")
    assert "timed out after 3s" in dead["error"]


def test_a_file_settling_across_a_step_back_is_taken(
    tmp_path: Path, wall_clock: WallClock, service_processes: list[ServiceProcess]
) -> None:
    log = tmp_path / "runs.log"
    cfg, inbox = pipeline(
        tmp_path,
        task="taskbox.work",
        args={"log": str(log), "seconds": 0},
        retry={"max_attempts": 1, "job_timeout": "1m"},
        settle="5s",
    )
    (inbox / "a.nc").write_bytes(b"a")
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready()
    wait_for(lambda: svc.events("scan_done"), message="the start-up scan")  # a.nc settles
    assert not svc.events("files_enqueued"), "settled before the step: nothing to prove"
    wall_clock.step(-HOUR)
    wait_for(lambda: svc.events("job_done"), timeout=20, message="the settled file's job")


def test_a_retry_due_across_a_step_back_runs_when_its_backoff_ends(
    tmp_path: Path, wall_clock: WallClock, service_processes: list[ServiceProcess]
) -> None:
    cfg, inbox = pipeline(
        tmp_path,
        task="taskbox.work",
        args={"log": str(tmp_path / "runs.log"), "seconds": 0},
        # the largest backoff allowed is long: only the step itself may bring the retry back
        retry={"max_attempts": 2, "backoff": {"initial": "4s", "max": "1h"}, "job_timeout": "1m"},
    )
    (inbox / "flaky.nc").write_bytes(b"f")
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready()
    wait_for(lambda: svc.events("job_retrying"), message="the first attempt's failure")
    wall_clock.step(-HOUR)
    assert len(svc.events("job_started")) == 1, "retried before the step: nothing to prove"
    wait_for(lambda: svc.events("job_done"), timeout=15, message="the retry, 4 s later")
    assert [(j["state"], j["attempts"]) for j in jobs(cfg)] == [("done", 2)]


def test_watchdog_pings_go_on_across_a_step_back(
    tmp_path: Path,
    wall_clock: WallClock,
    service_processes: list[ServiceProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        cfg, _ = pipeline(
            tmp_path,
            task="taskbox.noop",
            args={},
            retry={"max_attempts": 1, "job_timeout": "1m"},
        )
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping every half second
        svc = ServiceProcess(cfg)
        service_processes.append(svc)
        svc.wait_ready()
        wait_for(lambda: len(sock.sent("WATCHDOG=1")) >= 2, message="the first pings")
        wall_clock.step(-HOUR)
        stepped = len(sock.sent("WATCHDOG=1"))
        wait_for(
            lambda: len(sock.sent("WATCHDOG=1")) >= stepped + 4,
            timeout=10,
            message="pings after the step (systemd restarts a service 1 s without them)",
        )
    finally:
        sock.sock.close()
