"""sd_notify as systemd sees it: a real datagram socket as NOTIFY_SOCKET, the real service
process on the other end, or the service loop driven in this process with a clock the test
moves, where how long the pings stay away is the point. (The full systemd round trip is
tested in the systemd sandbox.)"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from conftest import env_for_subprocess, wait_for, write_config
from dpypeline.observability import systemd
from dpypeline.observability.systemd import Notifier
from test_service import Harness, make  # noqa: F401 - the fixture


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def poll(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            self.messages.append((time.monotonic(), data.decode()))

    def sent(self, field: str) -> list[float]:
        return [t for t, m in self.poll() if field in m.splitlines()]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.sock.close()


def start(
    tmp_path: Path, sock: NotifySocket, watchdog_usec: int, **job: object
) -> subprocess.Popen[bytes]:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms"}],
            "retry": {"max_attempts": 2, "job_timeout": "1s"},
            "jobs": [
                {
                    "name": "work",
                    "tasks": [
                        {"task": "taskbox.behave", "with": {"log": str(tmp_path / "runs.log")}}
                    ],
                }
            ],
            "logging": {"format": "json"},
        },
    )
    env = {
        **env_for_subprocess(),
        "NOTIFY_SOCKET": str(sock.path),
        "WATCHDOG_USEC": str(watchdog_usec),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "dpypeline", "run", "-c", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "service.log").open("w"),
    )


@pytest.mark.slow
def test_ready_status_pings_and_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    proc = start(tmp_path, notify_socket, watchdog_usec=2_000_000)  # ping every second
    try:
        wait_for(lambda: notify_socket.sent("READY=1"), message="READY=1")
        ready = next(m for _, m in notify_socket.poll() if "READY=1" in m)
        assert "STATUS=" in ready
        assert "0 queued" in ready
        (tmp_path / "inbox" / "a.nc").write_bytes(b"a")
        wait_for(lambda: len(notify_socket.sent("WATCHDOG=1")) >= 3, message="three pings")
        pings = notify_socket.sent("WATCHDOG=1")
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 1.5  # half of WATCHDOG_USEC, never slower than the timeout
        wait_for(
            lambda: any("1 done" in m for _, m in notify_socket.poll()),
            message="STATUS with the done job",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert notify_socket.sent("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def under_watchdog(
    make: Callable[..., Harness],  # noqa: F811 - the fixture imported above
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> NotifySocket:
    """The environment systemd gives a unit with WatchdogSec=2s, for a service made in
    this process (after ``make`` has cleared it)."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # a ping every second
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return notify_socket


def advance(h: Harness, seconds: float, step: float = 0.1) -> None:
    """Move the service's clock on by ``seconds``, one pass of its loop every ``step``."""
    for _ in range(round(seconds / step)):
        h.clock.advance(step)
        assert h.step(), "the service stopped"


def test_a_job_stuck_past_its_timeout_stops_the_pings(
    make: Callable[..., Harness],  # noqa: F811 - the fixture imported above
    under_watchdog: NotifySocket,
) -> None:
    sock = under_watchdog
    h = make("hang.nc", retry={"max_attempts": 2, "job_timeout": "1s"})
    h.executor.ignores_timeout = True  # blocks where no exception reaches
    assert sock.sent("READY=1")
    h.settle()
    h.running()
    advance(h, 1.0)
    assert sock.sent("WATCHDOG=1"), "a first ping"
    wait_for(
        lambda: advance(h, 0.5) or any("UNHEALTHY" in m for _, m in sock.poll()),
        message="the unhealthy status",
    )
    last_ping = len(sock.sent("WATCHDOG=1"))
    advance(h, 3.0)  # 3 s: six ping intervals, and well past systemd's 2 s watchdog
    assert len(sock.sent("WATCHDOG=1")) == last_ping
    assert not h.service.stuck  # no self-restart under a watchdog: systemd does it


def test_a_watched_directory_that_disappears_stops_the_pings(
    make: Callable[..., Harness],  # noqa: F811 - the fixture imported above
    under_watchdog: NotifySocket,
) -> None:
    sock = under_watchdog
    h = make()
    h.settle()
    advance(h, 2.0)
    assert len(sock.sent("WATCHDOG=1")) >= 2, "pings"
    shutil.rmtree(h.inbox)  # its inotify watch dies with it
    wait_for(
        lambda: advance(h, 0.1) or any("UNHEALTHY: watched directory" in m for _, m in sock.poll()),
        message="the unhealthy status",
    )
    last_ping = len(sock.sent("WATCHDOG=1"))
    advance(h, 3.0)
    # a ping of the pass that found it unhealthy may be read after the status: at most
    # that one; pinging on would send one every half-second of the 3 s
    assert len(sock.sent("WATCHDOG=1")) <= last_ping + 1


def test_notifier_is_silent_without_systemd_and_computes_half_the_watchdog() -> None:
    assert not Notifier({}).enabled
    assert Notifier({}).watchdog_interval is None
    n = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval == 15.0
    other = Notifier(
        {
            "NOTIFY_SOCKET": "/run/x",
            "WATCHDOG_USEC": "30000000",
            "WATCHDOG_PID": str(os.getpid() + 1),
        }
    )
    assert other.watchdog_interval is None  # the watchdog is meant for another process


def test_a_notify_socket_nobody_reads_never_holds_the_loop_up(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd drains its notify socket; when it does not (PID 1 busy: the queue is full),
    a send must not wait for it: the first costs ``SEND_TIMEOUT``, the next are dropped at
    once, with one warning, until systemd reads again."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setattr(systemd, "SEND_TIMEOUT", 0.2)
    notifier = Notifier()
    sender = threading.Thread(
        target=lambda: [notifier.status(f"step {i}") for i in range(100)], daemon=True
    )
    with capture_logs() as logs:
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), "a send to a full notify socket blocked the loop"
    assert [e["event"] for e in logs] == ["systemd_notify_failed"]
    assert "dropped" in logs[0]["action"]
    kept = [m for _, m in notify_socket.poll()]
    assert 0 < len(kept) < 100
    assert kept == [f"STATUS=step {i}" for i in range(len(kept))]  # the first ones, in order
    with capture_logs() as logs:
        notifier.status("read again")
    assert [m for _, m in notify_socket.poll()][-1] == "STATUS=read again"
    assert [e["event"] for e in logs] == ["systemd_notify_resumed"]
