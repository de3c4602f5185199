"""Progress as people see it: the live line of `dpypeline run` under a real pseudo-terminal,
`dpypeline status --watch` redrawing, and STATUS / `status --json` right after a job ends."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from conftest import dpypeline, env_for_subprocess, runs, status, wait_for, write_config
from dpypeline.jobstate import JobState
from dpypeline.loop.progress import Meter, Observers, View, progress_line, watch
from dpypeline.ordering import Hold
from dpypeline.state import holds
from dpypeline.state.ledger import Ledger
from test_notify import NotifySocket, notify_socket, start  # noqa: F401 - the fixture
from test_service import Harness, make  # noqa: F401 - the fixture

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LINE = re.compile(r"(\d+)/(\d+) jobs  ([\d.]+) jobs/s  ETA (\d+:\d\d:\d\d)  (\d+) dead")


class Terminal:
    """A command of the CLI on a real pseudo-terminal (120x30), its output kept as sent."""

    def __init__(self, *args: str) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        env = {**env_for_subprocess(), "TERM": "xterm-256color"}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dpypeline", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.master, self.raw = master, ""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def read(self, until: Callable[[], Any], timeout: float = 20.0) -> None:
        """Read what the program writes until ``until()`` holds or the program ends."""
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the program closed the terminal
                    return
                self.raw += data.decode(errors="replace")
            elif self.proc.poll() is not None:
                return

    def finish(self, timeout: float = 30.0) -> int:
        self.read(lambda: False, timeout)
        code = self.proc.wait(10)
        os.close(self.master)
        return code


def _twenty_files(tmp_path: Path, delay: float = 0.1) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(1, 21):
        (inbox / f"f{i:02}.nc").write_bytes(b"x")
    return write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms"}],
            "jobs": [
                {
                    "name": "work",
                    "tasks": [
                        {
                            "task": "taskbox.record",
                            "with": {"log": str(tmp_path / "runs.log"), "delay": delay},
                        }
                    ],
                }
            ],
        },
    )


def test_run_on_a_terminal_shows_a_live_line_with_rate_and_eta_under_the_log(
    tmp_path: Path,
) -> None:
    term = Terminal("run", "--once", "-c", str(_twenty_files(tmp_path)))
    assert term.finish() == 0, term.text
    frames = [m.groups() for m in LINE.finditer(term.text)]
    assert frames, term.text
    # while it works: a part done, a rate, a time left and the running job's file
    midway = [f for f in frames if 0 < int(f[0]) < 20 and float(f[2]) > 0]
    assert midway, frames
    assert all(f[1] == "20" for f in midway)
    assert re.search(r"\d+/20 jobs .* running: f\d\d\.nc", term.text)
    assert frames[-1][:2] == ("20", "20")  # the last frame: everything finished
    # log lines scroll above it: the line is erased, the log line printed, the line redrawn
    assert re.search(r"jobs/s[^\n]*\r\x1b\[2K[^\n]*job_done", term.raw), term.raw[-3000:]
    assert len(runs(tmp_path / "runs.log")) == 20


def test_no_live_line_without_a_terminal_or_with_no_progress(tmp_path: Path) -> None:
    cfg = _twenty_files(tmp_path, delay=0.0)
    piped = dpypeline("run", "--once", "-c", str(cfg))  # stderr is a pipe
    assert piped.returncode == 0, piped.stderr
    assert "job_done" in piped.stderr
    assert "jobs/s" not in piped.stderr
    assert "\x1b[" not in piped.stderr
    (tmp_path / "inbox" / "f21.nc").write_bytes(b"x")
    term = Terminal("run", "--once", "--no-progress", "-c", str(cfg))
    assert term.finish() == 0, term.text
    assert "job_done" in term.text  # the log is there, on the terminal
    assert "jobs/s" not in term.text


def test_status_watch_redraws_the_counts_every_second(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.nc").write_bytes(b"a")
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox)}],
            "jobs": [{"name": "work", "tasks": [{"task": "taskbox.noop"}]}],
        },
    )
    term = Terminal("status", "--watch", "-c", str(cfg))
    try:
        term.read(lambda: "queued 0" in term.text)
        assert "queued 0" in term.text, term.text
        dpypeline("enqueue", "-c", str(cfg), str(inbox / "a.nc"), check=True)
        term.read(lambda: "queued 1" in term.text)
        assert "queued 1" in term.text, term.text  # a later frame, with the new count
        stamps = re.findall(r"every 1s, (\d\d:\d\d:\d\d)", term.text)
        assert len(set(stamps)) >= 2, term.text  # two frames, a second apart
        os.killpg(term.proc.pid, signal.SIGINT)  # Ctrl-C
        assert term.finish() == 0, term.text
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_status_watch_ends_on_a_ctrl_c_that_lands_in_a_finalizer() -> None:
    """Raised as KeyboardInterrupt inside a finalizer, a Ctrl-C is only printed as
    "Exception ignored", and the redrawing goes on: the signal must end it all the same."""
    frames: list[int] = []

    class Collected:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):  # the handler runs here, inside the finalizer
                pass

    def show() -> None:
        frames.append(len(frames))
        assert len(frames) < 5, "the Ctrl-C was lost: still redrawing"
        Collected()  # made and collected at once
        print("queued 0")

    before = signal.getsignal(signal.SIGINT)
    assert watch(show, every=0.01) == 0
    assert frames == [0]  # it ended after the frame in which Ctrl-C came
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back


def test_status_and_status_json_show_a_jobs_end_within_a_second(
    tmp_path: Path,
    notify_socket: NotifySocket,  # noqa: F811 - the fixture imported above
) -> None:
    proc = start(tmp_path, notify_socket, watchdog_usec=0)  # STATUS on the health timer: 5 s
    try:
        wait_for(lambda: notify_socket.sent("READY=1"), message="READY=1")
        (tmp_path / "inbox" / "a.nc").write_bytes(b"a")
        wait_for(lambda: runs(tmp_path / "runs.log"), interval=0.005, message="the job's run")
        ended = time.monotonic()  # the task has returned: the job ends now

        def done_status() -> float | None:
            return next(
                (t for t, m in notify_socket.poll() if re.search(r"STATUS=.*\b1 done", m)), None
            )

        arrived = wait_for(done_status, timeout=10, interval=0.01, message="STATUS 1 done")
        assert arrived - ended < 1.0
        asked: list[float] = []

        def done_json() -> bool:
            asked.append(time.monotonic())
            return bool(status(tmp_path / "pipeline.yaml")["done"] == 1)

        wait_for(done_json, timeout=10, interval=0.01, message="status --json: 1 done")
        assert asked[-1] - ended < 1.0  # asked within the second, and answered with it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_jobs_end_is_counted_once_for_status_and_the_progress_shown(
    make: Callable[..., Harness],  # noqa: F811 - the fixture imported above
    notify_socket: NotifySocket,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under systemd the frame's counts make the STATUS line: the ledger is not counted a
    second time for it."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    h = make("a.nc")
    h.settle()
    [job] = h.running()
    counted: list[str] = []
    assert h.service._ledger is not None
    h.service._ledger._db.set_trace_callback(
        lambda sql: counted.append(sql) if "count" in sql.lower() else None
    )
    h.executor.finish(job)
    assert h.step()

    def done_status() -> bool:
        h.service._live.tick(time.time())  # as the loop does after each pass
        return any(re.search(r"STATUS=.*\b1 done", m) for _, m in notify_socket.poll())

    wait_for(done_status, timeout=5, interval=0.01, message="STATUS 1 done")
    assert len(counted) == 1, counted


# -- the pure parts -----------------------------------------------------------------------


class _Ledger:
    def __init__(self) -> None:
        self.changes = 0
        self.data_version = 1
        self.state = {"queued": 3, "running": 1, "done": 2}

    def counts(self) -> dict[str, int]:
        return dict(self.state)

    def held(self) -> list[Hold]:
        return []


class _Worker:
    ended: ClassVar[dict[JobState, int]] = {JobState.DONE: 2}

    def active_claims(self) -> list[Any]:
        return []


class _Seen:
    def __init__(self) -> None:
        self.frames: list[tuple[float, View]] = []

    def update(self, view: View, now: float) -> None:
        self.frames.append((now, view))

    def close(self) -> None:
        pass


class _Clock:
    """A monotonic clock the test moves; the loop's wall clock is the ``now`` it passes."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_observers_see_a_change_at_once_or_at_most_every_refresh() -> None:
    ledger, seen, clock = _Ledger(), _Seen(), _Clock()
    live = Observers([seen], every=0.25, clock=clock)
    live.watch(ledger, _Worker())  # type: ignore[arg-type]
    live.tick(100.0)
    assert [t for t, _ in seen.frames] == [100.0]
    assert live.next_deadline() is None  # nothing new: the loop sleeps as long as it likes
    ledger.changes = 1
    clock.t = 0.1
    live.tick(100.1)  # too soon after the last frame: shown at the deadline
    assert len(seen.frames) == 1
    assert live.next_deadline() == 100.25
    clock.t = 0.25
    live.tick(100.25)
    assert [t for t, _ in seen.frames] == [100.0, 100.25]
    live.tick(100.3)  # unchanged: nothing
    assert len(seen.frames) == 2
    ledger.state = {"queued": 2, "running": 1, "done": 3}
    live.close()  # a last frame
    assert len(seen.frames) == 3
    assert seen.frames[-1][1].finished == 1  # the 2 done before the run are not this run's
    assert seen.frames[-1][1].waiting == 3


class _SlowLedger(_Ledger):
    """Counting takes ``cost`` seconds of the clock, as counting every row of a large
    ledger did."""

    def __init__(self, clock: _Clock, cost: float) -> None:
        super().__init__()
        self.clock, self.cost, self.counted = clock, cost, 0

    def counts(self) -> dict[str, int]:
        self.clock.t += self.cost
        self.counted += 1
        return super().counts()


def test_a_slow_frame_is_not_redone_on_every_pass_of_the_loop() -> None:
    clock = _Clock()
    ledger, seen = _SlowLedger(clock, cost=0.5), _Seen()
    live = Observers([seen], every=0.25, clock=clock)
    live.watch(ledger, _Worker())  # type: ignore[arg-type]
    passes = 0
    while clock.t < 60.0:  # a minute of a busy loop: every pass writes, each takes 10 ms
        ledger.changes += 1
        clock.t += 0.01
        live.tick(1000.0 + clock.t)
        passes += 1
    # a frame that took 0.5 s is followed by none for 5 s: a tenth of the time, at most
    assert ledger.counted <= 60.0 / 5.0 + 1, (ledger.counted, passes)
    assert ledger.counted >= 60.0 / 6.0
    assert live.next_deadline() == seen.frames[-1][0] + 5.0


def test_the_refresh_follows_the_monotonic_clock_not_the_wall_clock() -> None:
    ledger, seen, clock = _Ledger(), _Seen(), _Clock()
    live = Observers([seen], every=0.25, clock=clock)
    live.watch(ledger, _Worker())  # type: ignore[arg-type]
    live.tick(100.0)
    ledger.changes, clock.t = 1, 0.3
    live.tick(40.0)  # the wall clock was stepped back a minute: the change still shows
    assert [t for t, _ in seen.frames] == [100.0, 40.0]
    ledger.changes, clock.t = 2, 0.4
    live.tick(500.0)  # ... or forward: no frame before the refresh is due
    assert len(seen.frames) == 2


def test_rate_is_over_the_window_and_falls_while_nothing_ends() -> None:
    meter = Meter(window=10.0)
    assert meter.rate(0.0) is None
    meter.add(0.0, 0)
    meter.add(5.0, 50)
    assert meter.rate(5.0) == pytest.approx(10.0)
    assert meter.rate(10.0) == pytest.approx(5.0)  # no job ended for 5 s
    meter.add(20.0, 100)  # the sample of t=0 is out of the window
    assert meter.rate(20.0) == pytest.approx(50 / 15)


def test_progress_line_says_done_of_known_rate_eta_dead_and_what_runs() -> None:
    frame = View(
        {"queued": 10, "running": 2, "done": 20, "dead": 7},
        {JobState.DONE: 8, JobState.DEAD: 1, JobState.RETRYING: 3},
        ("a/f1.nc", "a/f2.nc"),
        before=18,
    )
    assert progress_line(frame, 2.0) == (
        "9/21 jobs  2.0 jobs/s  ETA 0:00:06  7 dead  running: a/f1.nc (+1)"
    )
    assert "- jobs/s  ETA -:--:--" in progress_line(frame, None)


# -- held, dead and found files, with the service's loop ----------------------------------


def _frames(h: Harness) -> _Seen:
    """Frames the service's observers are shown from now on (as a terminal's line is)."""
    seen = _Seen()
    h.service._live.add(seen)
    return seen


def _latest(seen: _Seen) -> str | None:
    return progress_line(seen.frames[-1][1], 0.0) if seen.frames else None


def _shown(h: Harness, seen: _Seen, want: Callable[[str], bool], message: str) -> str:
    """Tick as the loop does after each pass (on the real monotonic clock) until the line
    of the latest frame is what ``want`` asks for; that line."""

    def line() -> str | None:
        h.service._live.tick(time.time())
        text = _latest(seen)
        return text if text is not None and want(text) else None

    try:
        return str(wait_for(line, timeout=5, interval=0.02, message=message))
    finally:
        print("last line:", _latest(seen))


def _dead_ahead_of_two(started: Callable[..., Harness]) -> tuple[Harness, _Seen, Ledger, int]:
    """Three files; the first job ends dead (one attempt) while the two after it are held
    behind it, as the jobs of an append store are; ``other`` is the ledger as another
    process (``dpypeline retry`` / ``skip``) opens it."""
    h = started("a.nc", "b.nc", "c.nc", retry={"max_attempts": 1, "job_timeout": "1h"})
    frames = _frames(h)
    h.settle()
    [first] = h.running()
    other = Ledger(h.cache_dir)
    with other._tx() as db:
        for job_id in (2, 3):
            holds.hold(db, job_id, first)
    h.executor.finish(first, RuntimeError("the store refused the write"))
    h.steps_until(lambda: h.jobs()["a.nc"][0] == JobState.DEAD, "the first job dead")
    return h, frames, other, first


def test_jobs_held_behind_a_dead_job_are_shown_as_held_with_no_eta(
    make: Callable[..., Harness],  # noqa: F811 - the fixture imported above
) -> None:
    h, frames, other, first = _dead_ahead_of_two(make)
    try:
        line = _shown(h, frames, lambda t: t.startswith("1/3 jobs"), "a frame with 1/3 jobs")
        assert f"2 held behind dead #{first}" in line
        assert "ETA" not in line  # nothing left that will finish by itself
        assert "1 dead" in line
    finally:
        other.close()


def test_the_line_follows_retry_and_skip_made_by_another_process(
    make: Callable[..., Harness],  # noqa: F811 - the fixture imported above
) -> None:
    h, frames, other, first = _dead_ahead_of_two(make)
    try:
        _shown(h, frames, lambda t: "1 dead" in t, "a frame with 1 dead")
        assert other.retry([first], time.time()) == 1
        # no step of the service: only the other process wrote
        line = _shown(h, frames, lambda t: "0 dead" in t, "the retry shown: 0 dead")
        assert line.startswith("0/3 jobs")  # the revived job is to do again
        assert "ETA" in line
        assert "held behind dead" not in line
        [again] = h.running()
        h.executor.finish(again, RuntimeError("the store refused the write"))
        h.steps_until(lambda: h.jobs()["a.nc"][0] == JobState.DEAD, "dead again")
        _shown(h, frames, lambda t: "1 dead" in t, "dead again: 1 dead")
        assert other.skip(first, time.time(), "accepted: ") is not None
        line = _shown(h, frames, lambda t: "0 dead" in t, "the skip shown: 0 dead")
        assert line.startswith("1/3 jobs")
        assert "held" not in line
    finally:
        other.close()


def test_the_total_counts_the_files_a_scan_found_before_they_are_queued(
    make: Callable[..., Harness],  # noqa: F811 - the fixture imported above
) -> None:
    h = make(*(f"f{i:02}.nc" for i in range(50)))
    frames = _frames(h)
    h.steps_until(lambda: h.service._arrivals.pending_scans == 0, "the start-up scan")
    assert h.jobs() == {}  # found, settling: no job yet
    line = _shown(h, frames, lambda t: "/50 jobs" in t, "50 jobs known after the scan")
    assert line.startswith("0/50 jobs  0.0 jobs/s  ETA -:--:--"), line
