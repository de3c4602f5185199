"""The service loop driven step by step: ``Service.step(now)`` with a clock the test moves
and an executor the test ends jobs on, against real files, inotify and SQLite. What the
process boundary proves (real signals, SIGKILL, re-exec) stays in test_process.py and
test_signals.py; here each guarantee of the loop costs milliseconds."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from watchdog.events import DirCreatedEvent, FileCreatedEvent

from conftest import wait_for
from dpypeline.config.model import config_from_dict
from dpypeline.errors import JobTimeout, TransientError
from dpypeline.executors.core import Finished
from dpypeline.loop.health import CLUSTER_GRACE, Health, Snapshot, status_line
from dpypeline.loop.service import HEALTH_EVERY, Service, Status, StopReason
from dpypeline.loop.timers import Timer, Timers
from dpypeline.pipeline import Job, Task
from dpypeline.state.cachedir import DB_FILE
from dpypeline.state.ledger import JobState, Ledger
from dpypeline.watching.watch import _Handler

SETTLE = 0.5
GRACE = 2.0  # how long the fake executor's jobs get to honour an interruption


@dataclass
class _Run:
    timeout: float | None
    started: float
    interrupted_at: float | None = None


@dataclass
class FakeExecutor:
    """The ``Executor`` protocol with the test in charge: a job runs until the test ends
    it (``finish``); past its timeout it is interrupted and ends with ``JobTimeout``,
    unless ``ignores_timeout``, when it is reported stuck ``GRACE`` later."""

    wake: threading.Event = field(default_factory=threading.Event)
    slots: int = 1
    ignores_timeout: bool = False
    lost: list[str] = field(default_factory=list)  # what ``problems`` reports
    running: dict[int, _Run] = field(default_factory=dict)
    interrupted: bool = False
    closed: int = 0
    _done: list[Finished] = field(default_factory=list)

    def finish(self, job_id: int, error: BaseException | None = None) -> None:
        del self.running[job_id]
        self._done.append(Finished.of(job_id, error))
        self.wake.set()

    def start(self) -> None:
        pass

    def capacity(self) -> int:
        return self.slots - len(self.running)

    def in_flight(self) -> list[int]:
        return list(self.running)

    def submit(self, job_id: int, fn: Callable[[], Any], timeout: float | None, now: float) -> None:
        assert self.capacity() > 0, "a job was submitted beyond the executor's capacity"
        self.running[job_id] = _Run(timeout, now)

    def completed(self) -> list[Finished]:
        done, self._done = self._done, []
        return done

    def next_deadline(self) -> float | None:
        return None

    def enforce_timeouts(self, now: float) -> None:
        for job_id, run in list(self.running.items()):
            if run.timeout is None or now < run.started + run.timeout:
                continue
            if run.interrupted_at is None:
                run.interrupted_at = now
                if not self.ignores_timeout:
                    self.finish(job_id, JobTimeout())

    def stuck(self, now: float) -> list[int]:
        return [
            job_id
            for job_id, run in self.running.items()
            if run.interrupted_at is not None and now >= run.interrupted_at + GRACE
        ]

    def is_overdue(self, now: float) -> bool:
        return any(
            r.timeout is not None and now >= r.started + r.timeout + GRACE
            for r in self.running.values()
        )

    def problems(self) -> list[str]:
        return list(self.lost)

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake", "slots": self.slots, "in_flight": len(self.running)}

    def interrupt(self) -> None:
        self.interrupted = True

    def close(self) -> None:
        self.closed += 1


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class Harness:
    service: Service
    executor: FakeExecutor
    clock: Clock
    inbox: Path
    cache_dir: Path

    def step(self) -> bool:
        return self.service.step(self.clock.now)

    def steps_until(self, predicate: Callable[[], Any], message: str) -> None:
        """Step at the current time until ``predicate()`` holds: the watcher and the scan
        thread are real, so what they report arrives when it arrives."""

        def stepped() -> Any:
            assert self.step(), "the service stopped"
            return predicate()

        wait_for(stepped, timeout=10, interval=0.002, message=message)

    def settle(self) -> None:
        """Until the start-up scan has reported the inbox's files, then past ``settle``."""
        self.steps_until(lambda: self.service._arrivals.pending_scans == 0, "the start-up scan")
        self.clock.advance(SETTLE)

    def running(self, n: int = 1) -> list[int]:
        """Step until ``n`` jobs run on the executor; their ids."""
        self.steps_until(lambda: len(self.executor.running) == n, f"{n} running job(s)")
        return list(self.executor.running)

    def exit_code(self) -> int:
        """Once the loop has ended: what ``run`` returns, the process's exit code."""
        self.service.close()
        return self.service._exit_code()

    def jobs(self) -> dict[str, tuple[JobState, int]]:
        """File name -> (state, attempts), read from the ledger as `dpypeline jobs` would."""
        ledger = Ledger(self.cache_dir)
        try:
            return {Path(r.path).name: (r.state, r.attempts) for r in ledger.jobs(limit=100)}
        finally:
            ledger.close()


@pytest.fixture
def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Harness]]:
    """A started service on ``tmp_path/inbox`` (files listed are written first)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)  # not under systemd
    started: list[Service] = []

    def make(
        *files: str,
        once: bool = False,
        stop_grace: str = "30s",
        retry: dict[str, Any] | None = None,
    ) -> Harness:
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        for name in files:
            (inbox / name).write_bytes(name.encode())
        config = config_from_dict(
            {
                "cache_dir": str(tmp_path / "state"),
                "stop_grace": stop_grace,
                "watch": [{"path": str(inbox), "settle": f"{SETTLE}s", "rescan_interval": "1h"}],
                "retry": retry or {"max_attempts": 3, "job_timeout": "1h"},
                "jobs": [{"name": "work", "tasks": [{"task": "taskbox.noop"}]}],
            }
        )
        executor, clock = FakeExecutor(), Clock()
        service = Service(
            config, [Job("work", [Task("taskbox.noop")])], once=once, executor=executor
        )
        executor.wake = service._inbox.wake
        service.start(clock.now)
        started.append(service)
        return Harness(service, executor, clock, inbox, config.cache_dir)

    yield make
    for service in started:
        service.close()


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e["event"] == name]


def test_first_signal_lets_the_running_job_finish_and_starts_no_other(
    make: Callable[..., Harness],
) -> None:
    h = make("a.nc", "b.nc")
    h.settle()
    [job] = h.running()
    h.service.on_signal(signal.SIGTERM, None)
    assert h.step()  # stopping: the job may finish
    assert h.service.status is Status.STOPPING
    h.executor.finish(job)
    assert not h.step()
    assert not h.executor.interrupted  # the job ran to its end
    assert h.executor.running == {}
    assert h.jobs() == {"a.nc": (JobState.DONE, 1), "b.nc": (JobState.QUEUED, 0)}
    assert h.exit_code() == 0


def test_a_job_still_running_when_stop_grace_ends_goes_back_uncounted(
    make: Callable[..., Harness],
) -> None:
    h = make("long.nc", stop_grace="10s")
    h.settle()
    h.running()
    h.service.on_signal(signal.SIGTERM, None)  # one signal, as systemctl stop sends
    assert h.step()
    h.clock.advance(10.0 - 0.01)
    assert h.step(), "stopped before stop_grace was over"
    assert not h.executor.interrupted
    h.clock.advance(0.01)
    with capture_logs() as captured:
        assert not h.step()
    assert h.executor.interrupted  # the grace, not the job's time
    assert events(captured, "job_released")
    assert h.jobs() == {"long.nc": (JobState.QUEUED, 0)}
    assert h.exit_code() == 0


def test_a_second_signal_puts_the_running_job_back_at_once_uncounted(
    make: Callable[..., Harness],
) -> None:
    h = make("long.nc", stop_grace="10m")
    h.settle()
    h.running()
    h.service.on_signal(signal.SIGTERM, None)
    assert h.step()
    assert h.service.status is Status.STOPPING  # the first signal taken
    h.service.on_signal(signal.SIGTERM, None)
    assert not h.step()  # the same instant: no grace for a second signal
    assert h.executor.interrupted  # the job did not run to its end
    assert h.jobs() == {"long.nc": (JobState.QUEUED, 0)}
    assert h.exit_code() == 0


def test_a_job_that_honours_its_timeout_is_retried_and_the_loop_goes_on(
    make: Callable[..., Harness],
) -> None:
    h = make("slow.nc", retry={"max_attempts": 3, "job_timeout": "30s"})
    h.settle()
    h.running()
    h.clock.advance(30.0)
    assert h.step()  # interrupted: it ends with JobTimeout
    assert h.step()  # ... which is collected
    assert h.jobs() == {"slow.nc": (JobState.RETRYING, 1)}
    assert not h.service.stuck


def test_a_job_that_ignores_its_timeout_is_recorded_failed_and_the_service_restarts(
    make: Callable[..., Harness],
) -> None:
    h = make("hang.nc", retry={"max_attempts": 3, "job_timeout": "30s"})
    h.executor.ignores_timeout = True
    h.settle()
    h.running()
    h.clock.advance(30.0)
    assert h.step()  # interrupted; it has GRACE to unwind
    h.clock.advance(GRACE - 0.01)
    assert h.step()
    h.clock.advance(0.01)
    with capture_logs() as captured:
        assert not h.step()
    assert h.service.stuck  # run() raises StuckJob: the CLI re-executes the service
    assert [e["job_id"] for e in events(captured, "job_stuck")] == list(h.executor.running)
    assert h.jobs() == {"hang.nc": (JobState.RETRYING, 1)}  # the attempt counts


def test_a_cluster_lost_past_the_grace_puts_running_jobs_back_and_restarts(
    make: Callable[..., Harness],
) -> None:
    h = make("a.nc")
    h.settle()
    h.running()
    h.executor.lost = ["the Dask scheduler tcp://127.0.0.1:8786 is unreachable"]
    lost_at = h.clock.advance(HEALTH_EVERY)  # the health check notices
    assert h.step()
    assert h.service.problems == h.executor.lost
    h.clock.now = lost_at + CLUSTER_GRACE  # not longer than the grace yet
    assert h.step()
    assert not h.service.cluster_lost
    h.clock.advance(0.01)
    with capture_logs() as captured:
        assert not h.step()
    assert h.service.cluster_lost  # run() raises ClusterLost: the CLI re-executes
    assert events(captured, "cluster_lost")[0]["problems"] == h.executor.lost
    assert h.jobs() == {"a.nc": (JobState.QUEUED, 0)}


def test_a_cluster_back_within_the_grace_changes_nothing(make: Callable[..., Harness]) -> None:
    h = make("a.nc")
    h.settle()
    h.running()
    h.executor.lost = ["the Dask scheduler is unreachable"]
    h.clock.advance(HEALTH_EVERY)
    assert h.step()
    h.executor.lost = []
    h.clock.advance(HEALTH_EVERY)
    assert h.step()
    h.executor.lost = ["the Dask scheduler is unreachable"]  # lost again: a new grace
    for _ in range(3):
        h.clock.advance(HEALTH_EVERY)
        assert h.step()
    assert not h.service.cluster_lost


def test_once_exits_only_when_the_ledger_is_drained_and_nothing_settles(
    make: Callable[..., Harness],
) -> None:
    h = make("a.nc", "b.nc", once=True)
    # files found, not yet settled, nothing in the ledger: not drained
    h.steps_until(lambda: h.service._arrivals.pending_scans == 0, "the start-up scan")
    assert h.jobs() == {}
    h.clock.advance(SETTLE)
    for name in ("a.nc", "b.nc"):
        [job] = h.running()
        assert h.jobs()[name] == (JobState.RUNNING, 1)
        h.executor.finish(job)
    with capture_logs() as captured:
        assert not h.step()
    [drained] = events(captured, "service_drained")
    assert (drained["done"], drained["queued"], drained["running"]) == (2, 0, 0)
    assert h.service.jobs_dead == 0


def test_once_waits_for_a_file_that_arrived_meanwhile_and_still_settles(
    make: Callable[..., Harness],
) -> None:
    h = make("a.nc", once=True)
    h.settle()
    [first] = h.running()
    # moved in whole, as rsync or a model's post-processing delivers: one report, so no
    # report of a write or a close can come after the clock has moved on and restart its
    # settle time beyond the clock's reach
    written = h.inbox.parent / "late.nc"
    written.write_bytes(b"late")
    written.replace(h.inbox / "late.nc")
    settler = h.service._arrivals.settler
    h.steps_until(lambda: settler.next_deadline() is not None, "the late file's arrival")
    h.executor.finish(first)
    assert h.step(), "exited with a file still settling"
    h.clock.advance(SETTLE)
    [late] = h.running()
    h.executor.finish(late)
    assert not h.step()
    assert h.jobs() == {"a.nc": (JobState.DONE, 1), "late.nc": (JobState.DONE, 1)}


def test_a_late_report_of_an_empty_file_as_created_neither_holds_it_nor_the_run_back(
    make: Callable[..., Harness],
) -> None:
    """watchdog reports each file of a new directory as created when it adds that
    directory's watch, which can be after the file's close or a scan has shown it
    complete. An empty file so reported must still settle, and once taken it must not
    linger as being written: a ``--once`` run would never end."""
    h = make("a.nc", once=True)
    h.settle()
    [first] = h.running()
    empty = h.inbox / "new" / "empty.nc"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    settler = h.service._arrivals.settler
    h.steps_until(lambda: settler.next_deadline() is not None, "the empty file's close or scan")
    report = _Handler(h.service._arrivals.specs[0], h.service._inbox)
    report.dispatch(FileCreatedEvent(str(empty)))
    assert h.step()
    h.clock.advance(SETTLE)
    h.executor.finish(first)
    [job] = h.running()
    report.dispatch(FileCreatedEvent(str(empty)))  # later still: the ledger has it
    h.executor.finish(job)
    assert not h.step(), "the --once run waits for a file it has already taken"
    assert h.jobs() == {"a.nc": (JobState.DONE, 1), "empty.nc": (JobState.DONE, 1)}


def test_a_link_to_a_directory_reported_as_a_new_directory_is_not_scanned(
    make: Callable[..., Harness],
) -> None:
    """watchdog reports a link to a directory, found in a new directory, as a directory
    created; scans never go through such a link (a link to the tree's own top would show
    every file again under a second name)."""
    h = make("a.nc")
    h.settle()
    [job] = h.running()
    loop = h.inbox / "loop"
    loop.symlink_to(h.inbox)
    report = _Handler(h.service._arrivals.specs[0], h.service._inbox)
    with capture_logs() as captured:
        report.dispatch(DirCreatedEvent(str(loop)))
        assert h.step()
        h.steps_until(lambda: h.service._arrivals.pending_scans == 0, "no scan pending")
    assert [e for e in events(captured, "scan_done") if e.get("reason") == "new directory"] == []
    assert not any("/loop/" in path for path in h.service._arrivals.settler._candidates)
    h.executor.finish(job)


def test_a_failed_job_runs_again_when_its_backoff_has_passed(
    make: Callable[..., Harness],
) -> None:
    h = make(
        "flaky.nc", retry={"max_attempts": 3, "backoff": {"initial": "20s"}, "job_timeout": "1h"}
    )
    h.settle()
    [job] = h.running()
    h.executor.finish(job, TransientError("the network blinked"))
    assert h.step()
    assert h.jobs() == {"flaky.nc": (JobState.RETRYING, 1)}
    h.clock.advance(20.0 - 0.01)
    assert h.step()
    assert h.executor.running == {}
    assert h.jobs() == {"flaky.nc": (JobState.RETRYING, 1)}
    h.clock.advance(0.01)
    assert h.step()
    assert list(h.executor.running) == [job]  # promoted, claimed and started in one pass
    assert h.jobs() == {"flaky.nc": (JobState.RUNNING, 2)}


def test_a_job_whose_file_changed_before_it_started_waits_for_the_new_version_in_its_place(
    make: Callable[..., Harness],
) -> None:
    """The file changed between its job's queueing and its start (rewritten, or re-sent
    while the service was stopped and its dead job retried): the job neither runs the
    half-written file nor ends skipped (which would let the later files of an append store
    overtake the new version); it waits, and the new version, once settled, takes it over."""
    h = make(
        "a.nc",
        "b.nc",
        retry={"max_attempts": 3, "backoff": {"initial": "20s"}, "job_timeout": "1h"},
    )
    h.settle()
    [a] = h.running()
    (h.inbox / "b.nc").write_bytes(b"b, written again")
    h.executor.finish(a)
    h.steps_until(lambda: h.jobs()["b.nc"][0] is not JobState.QUEUED, "b taken")
    assert h.jobs() == {"a.nc": (JobState.DONE, 1), "b.nc": (JobState.RETRYING, 1)}
    assert h.executor.running == {}
    settler = h.service._arrivals.settler
    h.steps_until(lambda: settler.next_deadline() is not None, "the new version's arrival")
    h.clock.advance(SETTLE)
    with capture_logs() as captured:
        [b] = h.running()
    assert b == a + 1  # its own job, in its place: the new version has none of its own
    assert h.jobs() == {"a.nc": (JobState.DONE, 1), "b.nc": (JobState.RUNNING, 1)}
    [superseded] = events(captured, "job_superseded")
    assert (superseded["job_id"], superseded["was"]) == (b, "retrying")
    h.executor.finish(b)


def test_a_wall_clock_step_keeps_a_retry_due_when_its_backoff_ends(
    make: Callable[..., Harness],
) -> None:
    """``now`` is monotonic; the ledger's backoff end is a wall-clock time, moved with a
    step of that clock (the real clocks under a running process: test_clock.py)."""
    h = make(
        "flaky.nc", retry={"max_attempts": 3, "backoff": {"initial": "20s"}, "job_timeout": "1h"}
    )
    h.settle()
    [job] = h.running()
    h.executor.finish(job, TransientError("the network blinked"))
    assert h.step()
    with capture_logs() as captured:
        assert h.service.step(h.clock.now, wall=h.clock.now - 3600)  # stepped back an hour
    assert [e["seconds"] for e in events(captured, "clock_stepped")] == [-3600.0]
    h.clock.advance(20.0 - 0.01)
    assert h.service.step(h.clock.now, wall=h.clock.now - 3600)
    assert h.executor.running == {}
    h.clock.advance(0.01)
    assert h.service.step(h.clock.now, wall=h.clock.now - 3600)
    assert list(h.executor.running) == [job]
    assert h.jobs() == {"flaky.nc": (JobState.RUNNING, 2)}


def test_a_stored_backoff_end_beyond_the_largest_backoff_is_due_within_it(
    make: Callable[..., Harness],
) -> None:
    """A wall clock stepped back while nothing watched it leaves a backoff end far ahead:
    the job waits at most the largest backoff the config allows, not the size of the step."""
    h = make(
        "flaky.nc",
        retry={"max_attempts": 3, "backoff": {"initial": "20s", "max": "1m"}, "job_timeout": "1h"},
    )
    h.settle()
    [job] = h.running()
    h.executor.finish(job, TransientError("the network blinked"))
    assert h.step()
    db = sqlite3.connect(h.cache_dir / DB_FILE)
    with db:
        db.execute("UPDATE jobs SET not_before = ?", (h.clock.now + 3600,))
    db.close()
    assert h.step()
    h.clock.advance(60.0 - 0.01)
    assert h.step()
    assert h.executor.running == {}
    h.clock.advance(0.01)
    assert h.step()
    assert list(h.executor.running) == [job]


def test_a_restart_brings_a_backoff_end_stored_beyond_the_largest_backoff_within_it(
    make: Callable[..., Harness],
) -> None:
    """The wall clock stepped back while the service was stopped: at start-up, before the
    first pass of the loop, no stored backoff end is further than the largest backoff."""
    h = make(
        "flaky.nc",
        retry={"max_attempts": 3, "backoff": {"initial": "20s", "max": "1m"}, "job_timeout": "1h"},
    )
    h.settle()
    [job] = h.running()
    h.executor.finish(job, TransientError("the network blinked"))
    assert h.step()
    h.service.close()
    db = sqlite3.connect(h.cache_dir / DB_FILE)
    with db:
        db.execute("UPDATE jobs SET not_before = ?", (h.clock.now + 3600,))
    db.close()
    jobs = [Job("work", [Task("taskbox.noop")])]
    again = Service(h.service.config, jobs, executor=FakeExecutor())
    again.start(h.clock.now)
    try:
        ledger = Ledger(h.cache_dir)
        try:
            assert ledger.next_retry_at() == h.clock.now + 60.0
        finally:
            ledger.close()
    finally:
        again.close()


def test_health_is_a_pure_decision_with_the_cluster_grace() -> None:
    health = Health()
    verdict = health.assess(0.0, watching=[], overdue=False, executor=[])
    assert verdict.healthy
    assert not verdict.changed
    verdict = health.assess(1.0, watching=["gone"], overdue=True, executor=["lost"])
    assert verdict.problems == ["gone", "a job is running past retry.job_timeout", "lost"]
    assert verdict.changed
    assert not health.cluster_gone(1.0 + CLUSTER_GRACE, watchdog=False)
    assert health.cluster_gone(1.1 + CLUSTER_GRACE, watchdog=False)
    assert not health.cluster_gone(1.1 + CLUSTER_GRACE, watchdog=True)  # systemd restarts


def test_status_line_says_what_the_service_waits_for_first() -> None:
    counts = {"queued": 2, "done": 1}
    assert status_line(Snapshot("running", counts)) == "running; 2 queued, 1 done"
    assert status_line(Snapshot("running", counts, pending_scans=1, problems=("x",))) == (
        "running, scanning (1 pending); UNHEALTHY: x; 2 queued, 1 done"
    )
    setup = Snapshot("running", counts, setup_waiting_for="objectstore s3", paused="down")
    assert status_line(setup).startswith("waiting for objectstore s3 (setup); ")


def test_timers_fire_once_per_period_and_rate_limits_do_not_wake_the_loop() -> None:
    timers = Timers()
    timers.every(Timer.RESCAN, 60.0, 100.0, watch=0)
    timers.every(Timer.PRUNE, 3600.0, None, watch=0)
    assert timers.next_deadline() == 100.0  # the prune, due at once, is no wake-up
    assert timers.fire(Timer.PRUNE, 50.0, watch=0)
    assert not timers.fire(Timer.PRUNE, 51.0, watch=0)
    assert not timers.fire(Timer.RESCAN, 99.9, watch=0)
    assert not timers.fire(Timer.RESCAN, 100.0, watch=1)  # another watch's duty
    assert timers.fire(Timer.RESCAN, 100.0, watch=0)
    assert not timers.fire(Timer.RESCAN, 159.9, watch=0)
    assert timers.next_deadline() == 160.0


def _lone_service(tmp_path: Path, executor: FakeExecutor) -> Service:
    (tmp_path / "inbox").mkdir()
    config = config_from_dict(
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(tmp_path / "inbox")}],
            "jobs": [{"name": "work", "tasks": [{"task": "taskbox.noop"}]}],
        }
    )
    service = Service(config, [Job("work", [Task("taskbox.noop")])], executor=executor)
    executor.wake = service._inbox.wake
    return service


def test_the_service_is_a_context_manager_that_starts_and_closes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As distributed's ``Server``: a second start while it runs changes nothing, a second
    close neither, why it stopped is said once, and a closed service does not start again."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    executor = FakeExecutor()
    service = _lone_service(tmp_path, executor)
    with capture_logs() as captured:
        with service as entered:
            assert entered is service
            assert service.status is Status.RUNNING
            service.start()
        assert service.status is Status.STOPPED
        service.close()
    assert len(events(captured, "service_ready")) == 1
    assert [e["reason"] for e in events(captured, "service_stopped")] == ["stopped"]
    assert service.stop_reason is StopReason.STOPPED
    assert executor.closed == 1
    with pytest.raises(RuntimeError, match="cannot start again"):
        service.start()


class _NoCluster(FakeExecutor):
    def start(self) -> None:
        raise ConnectionError("no scheduler at tcp://10.0.0.1:8786")


def test_a_start_that_fails_closes_what_it_opened_once_and_ends_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    executor = _NoCluster()
    service = _lone_service(tmp_path, executor)
    with capture_logs() as captured, pytest.raises(ConnectionError), service:
        pytest.fail("the body runs only once the service has started")
    service.close()
    assert service.status is Status.FAILED
    assert service.stop_reason is StopReason.START_FAILED
    assert executor.closed == 1
    assert [e["reason"] for e in events(captured, "service_stopped")] == ["start-up failed"]
