"""Stopping by signal: handlers take no lock, a signal wakes the loop at once, and a storm of
SIGTERMs against a real service stops it within stop_grace, every time."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ServiceProcess, status, wait_for, write_config
from dpypeline.config.model import config_from_dict
from dpypeline.loop.service import Service
from dpypeline.pipeline import Job, Task


@pytest.fixture
def service(tmp_path: Path) -> Service:
    (tmp_path / "inbox").mkdir()
    config = config_from_dict(
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(tmp_path / "inbox")}],
            "jobs": [{"name": "noop", "tasks": [{"task": "taskbox.noop"}]}],
        }
    )
    return Service(config, [Job("noop", [Task("taskbox.noop")])])


def test_the_stop_handler_returns_while_another_thread_holds_the_loops_locks(
    service: Service,
) -> None:
    """Whatever the loop may hold when a signal lands (its wake-up event's lock, the logging
    locks), the handler does not wait for it."""
    wake = service._inbox.wake
    held = [wake._cond, logging._lock, *(h.lock for h in logging.getLogger().handlers if h.lock)]  # type: ignore[attr-defined]
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        for lock in held:
            lock.acquire()
        holding.set()
        release.wait()
        for lock in reversed(held):
            lock.release()

    holder = threading.Thread(target=hold, name="test-lock-holder", daemon=True)
    holder.start()
    holding.wait(5)
    handler = threading.Thread(
        target=service.on_signal, args=(signal.SIGTERM, None), name="test-handler", daemon=True
    )
    try:
        handler.start()
        handler.join(2)
        returned = not handler.is_alive()
    finally:
        release.set()
        holder.join(5)
        handler.join(5)
    assert returned, "the signal handler waited for a lock"
    assert service.stop_requested


def test_a_signal_wakes_the_loops_wait_at_once(service: Service) -> None:
    previous = service._install_signal_handlers()
    assert previous is not None  # pytest runs tests on the main thread
    try:
        service._inbox.wake.clear()
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
        t0 = time.monotonic()
        timer.start()
        woken = service._inbox.wake.wait(10)
        waited = time.monotonic() - t0
        timer.join()
    finally:
        service._restore_signal_handlers(previous)
    assert woken
    assert waited < 2
    assert service.stop_requested


@pytest.mark.slow
def test_a_sigterm_storm_stops_a_busy_service_within_stop_grace_every_time(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    """Many SIGTERMs at random short intervals, against a service running jobs: each round
    must end with a clean stop (exit 0, ``service_stopped``) within stop_grace + 2 s."""
    grace, margin, rounds = 3.0, 2.0, 8
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = tmp_path / "runs.log"
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "stop_grace": f"{grace}s",
            "watch": [{"path": str(inbox), "settle": "50ms"}],
            "jobs": [
                {
                    "name": "work",
                    "tasks": [{"task": "taskbox.record", "with": {"log": str(log), "delay": 0.02}}],
                }
            ],
            "logging": {"format": "json"},
        },
    )
    rng = random.Random(20261201)
    stop_times = []
    for r in range(rounds):
        for i in range(100):
            (inbox / f"r{r}-{i:03d}.nc").write_bytes(b"x")
        svc = ServiceProcess(cfg)
        service_processes.append(svc)
        svc.wait_ready()
        wait_for(lambda: status(cfg)["running"] >= 1, message="a running job")
        t0 = time.monotonic()
        deadline = t0 + grace + margin
        while svc.proc.poll() is None and time.monotonic() < deadline:
            svc.signal(signal.SIGTERM)
            time.sleep(rng.uniform(0.0005, 0.02))
        try:
            code = svc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            svc.kill()
            pytest.fail(f"round {r}: still running {grace + margin}s after the first SIGTERM")
        stop_times.append(time.monotonic() - t0)
        assert code == 0, f"round {r}: exit {code}\n{svc.log.read_text()[-3000:]}"
        assert svc.events()[-1]["event"] == "service_stopped"
        svc.log.unlink()
    print(f"stop time under a SIGTERM storm: max {max(stop_times):.3f}s over {rounds} rounds")
    assert max(stop_times) <= grace + margin
