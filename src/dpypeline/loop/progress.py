"""Progress, shown as it happens: STATUS for ``systemctl status``, what ``dpypeline
status`` reads of the executor, the live line of ``dpypeline run`` on a terminal, and
``dpypeline status --watch``.

The loop calls ``Observers.tick`` after every pass. When the ledger changed (a job started
or ended, a file was queued, ``dpypeline retry`` or ``skip`` committed from another
process) or a scan found files, the observers get a fresh ``View``, at most every ``REFRESH``
seconds on the monotonic clock: a job's end shows in STATUS well within a second, and a
backfill of thousands of short jobs costs a few cheap queries a second, not one per job.
Should a frame ever take long (a slow disk, a huge ledger), the next waits ``BUSY`` times
as long, so showing progress never takes more than a tenth of the loop's time. The health
timer still sends STATUS on its own, for what no write reveals (a pause, an unhealthy
watcher).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dpypeline.jobstate import JobState
from dpypeline.ordering import Hold
from dpypeline.paths import shown
from dpypeline.signals import StopSignals
from dpypeline.state.cachedir import write_executor_status
from dpypeline.state.transitions import TERMINAL, WAITING
from dpypeline.wakeup import Wakeup

if TYPE_CHECKING:
    from dpypeline.loop.worker import Worker
    from dpypeline.observability.systemd import Notifier
    from dpypeline.state.ledger import Claim, Ledger

REFRESH = 0.25  # seconds: how often, at most, a change reaches the observers
BUSY = 10  # a frame that took t seconds is followed by none for BUSY * t seconds
RATE_WINDOW = 30.0  # seconds of finished jobs the rate is measured over
WATCH_EVERY = 1.0  # seconds between frames of `status --watch`


@dataclass(frozen=True, slots=True)
class View:
    """What the loop shows of itself: the ledger's counts and this run's work.

    Done and skipped are read from the ledger against ``before`` (the jobs finished
    before this run), not counted by the worker: a dead job revived by ``dpypeline retry``
    or skipped by ``dpypeline skip`` in another process is shown as it is now."""

    counts: Mapping[str, int]  # every job of the ledger, by state
    ended: Mapping[JobState, int]  # attempts that ended in this run, by outcome
    running: tuple[str, ...] = ()  # the running jobs' files, relative to their watch roots
    held: tuple[Hold, ...] = ()  # every held job, with the job it waits for
    arriving: int = 0  # jobs still to come of files found (by the scan) but not queued yet
    before: int = 0  # jobs of the ledger already finished (done, dead, skipped) at start

    @property
    def finished(self) -> int:
        """Jobs of this run that will not run again by themselves (done, dead or skipped)."""
        return max(0, self.terminal - self.before)

    @property
    def terminal(self) -> int:
        return sum(self.counts.get(state.value, 0) for state in TERMINAL)

    @property
    def ended_total(self) -> int:
        """Attempts of this run that ended for good: only grows, so the rate is measured
        on it (``finished`` falls when the operator revives a dead job)."""
        return sum(self.ended.get(state, 0) for state in TERMINAL)

    @property
    def waiting(self) -> int:
        return sum(self.counts.get(state.value, 0) for state in WAITING)

    @property
    def stuck(self) -> dict[int, int]:
        """Jobs held behind each dead job: they wait for the operator, not for time."""
        by_dead: dict[int, int] = {}
        for h in self.held:
            if h.behind_state == JobState.DEAD:
                by_dead[h.behind] = by_dead.get(h.behind, 0) + 1
        return by_dead

    @property
    def known(self) -> int:
        """Every job of this run known so far, those of files found and not queued too."""
        return self.finished + self.waiting + self.arriving


def view(
    counts: Mapping[str, int],
    ended: Mapping[JobState, int],
    claims: Sequence[Claim],
    *,
    held: Sequence[Hold] = (),
    arriving: int = 0,
    before: int = 0,
) -> View:
    running = tuple(shown(os.path.relpath(c.record.path, c.record.root)) for c in claims)
    return View(dict(counts), dict(ended), running, tuple(held), arriving, before)


class Observer(Protocol):
    def update(self, view: View, now: float) -> None: ...
    def close(self) -> None: ...


class Observers:
    """Hands a fresh ``View`` to each observer when the ledger changed, rate-limited on
    ``clock`` (monotonic: a step of the wall clock neither floods nor freezes them)."""

    def __init__(
        self,
        observers: Sequence[Observer],
        every: float = REFRESH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._observers = list(observers)
        self._every = every
        self._clock = clock
        self._source: tuple[Ledger, Worker] | None = None
        self._arriving: Callable[[], int] = lambda: 0
        self._before = 0  # jobs finished before this run (see ``View``)
        self._version: tuple[int, int, int] | None = None  # what changed, when last looked
        self._shown: tuple[int, int, int] | None = None  # ... and when last shown
        self._last = -math.inf  # when last shown, on the loop's (wall) clock
        self._shown_at = -math.inf  # ... and on ``clock``
        self._wait = every  # how long after that the next frame may come

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def watch(
        self, ledger: Ledger, worker: Worker, arriving: Callable[[], int] = lambda: 0
    ) -> None:
        """Show ``ledger`` and ``worker``; ``arriving``: how many jobs the files found and
        not queued yet will make, so the total is known as soon as a scan is. The jobs
        finished by now are not this run's."""
        self._source, self._arriving = (ledger, worker), arriving
        self._before = View(ledger.counts(), {}).terminal

    def tick(self, now: float) -> None:
        if self._source is None:
            return
        self._version = self._changes()
        if self._version != self._shown and self._clock() >= self._shown_at + self._wait:
            self._show(now)

    def next_deadline(self) -> float | None:
        """When a change not yet shown is due, on the loop's clock (None: nothing to show)."""
        pending = self._source is not None and self._version != self._shown
        return self._last + self._wait if pending else None

    def close(self) -> None:
        """A last frame with the final counts (the ledger is still open), then close."""
        try:
            if self._source is not None:
                with contextlib.suppress(sqlite3.Error):  # a broken database ends the run
                    self._show(time.monotonic())
        finally:
            self._source = None
            for observer in self._observers:
                observer.close()

    def _changes(self) -> tuple[int, int, int]:
        """This connection's writes, other processes' commits, and the files arriving."""
        assert self._source is not None
        ledger = self._source[0]
        return (ledger.changes, ledger.data_version, self._arriving())

    def _show(self, now: float) -> None:
        assert self._source is not None
        ledger, worker = self._source
        started = self._clock()
        self._shown, self._last, self._shown_at = self._changes(), now, started
        counts = ledger.counts()
        claims, held = worker.active_claims(), ledger.held()
        frame = view(counts, worker.ended, claims, held=held, arriving=self._arriving())
        # jobs finished before this run: fewer when one of them is revived by `retry`
        self._before = min(self._before, frame.terminal)
        frame = replace(frame, before=self._before)
        for observer in self._observers:
            observer.update(frame, now)
        self._wait = max(self._every, BUSY * (self._clock() - started))


class StatusNotice:
    """STATUS= for ``systemctl status`` as soon as the counts change (the notifier sends
    only a line that differs from the last). The line is made from the frame's counts, not
    counted again."""

    def __init__(self, notifier: Notifier, line: Callable[[float, Mapping[str, int]], str]) -> None:
        self._notifier, self._line = notifier, line

    def update(self, view: View, now: float) -> None:
        if self._notifier.enabled:
            self._notifier.status(self._line(now, view.counts))

    def close(self) -> None:
        pass


class ExecutorFile:
    """What ``dpypeline status`` shows of a cluster (jobs in flight), written when a job
    starts or ends rather than only on the executor-status timer."""

    def __init__(self, cache_dir: Path, describe: Callable[[], dict[str, Any]]) -> None:
        self._cache_dir, self._describe = cache_dir, describe

    def update(self, view: View, now: float) -> None:
        write_executor_status(self._cache_dir, self._describe())

    def close(self) -> None:
        pass


class Meter:
    """Jobs finished per second over about the last ``window`` seconds. The loop adds
    samples; the terminal's refresh thread reads the rate, which falls while nothing ends."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, now: float, finished: int) -> None:
        with self._lock:
            self._samples.append((now, finished))
            while len(self._samples) > 1 and self._samples[1][0] <= now - self._window:
                self._samples.popleft()

    def rate(self, now: float) -> float | None:
        with self._lock:
            if not self._samples:
                return None
            (start, first), (_, last) = self._samples[0], self._samples[-1]
        span = now - start
        return (last - first) / span if span >= 0.5 else None


def progress_line(view: View, rate: float | None) -> str:
    """``812/2000 jobs  41.2 jobs/s  ETA 0:00:28  3 dead  running: f813.nc``, or with jobs
    held behind a dead one ``21/23 jobs  0.0 jobs/s  2 held behind dead #3  1 dead``: the
    ETA is for the jobs that will still finish by themselves, and is left out when none
    will."""
    stuck = view.stuck
    left = view.waiting - sum(stuck.values()) + view.arriving  # what will still finish
    if left > 0 and rate:
        eta: str | None = str(timedelta(seconds=round(left / rate)))
    elif left > 0:
        eta = "-:--:--"
    else:
        eta = None if stuck else "0:00:00"
    parts = [
        f"{view.finished}/{view.known} jobs",
        f"{rate:.1f} jobs/s" if rate is not None else "- jobs/s",
    ]
    if eta is not None:
        parts.append(f"ETA {eta}")
    if stuck:
        parts.append(", ".join(f"{n} held behind dead #{job}" for job, n in sorted(stuck.items())))
    parts.append(f"{view.counts.get(JobState.DEAD.value, 0)} dead")
    if skipped := view.ended.get(JobState.SKIPPED, 0):
        parts.append(f"{skipped} skipped")
    if view.running:
        more = len(view.running) - 1
        parts.append("running: " + view.running[0] + (f" (+{more})" if more else ""))
    return "  ".join(parts)


class TerminalProgress:
    """The live line at the bottom of a terminal while ``dpypeline run`` works, with the log
    lines scrolling above it. rich redraws it four times a second from its own thread;
    while it is up, the log handlers writing to the terminal go through rich's console."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._meter = Meter()
        self._view: View | None = None
        self._live: Live | None = None
        self._rerouted: list[logging.StreamHandler[Any]] = []

    def update(self, view: View, now: float) -> None:
        self._meter.add(now, view.ended_total)
        self._view = view
        if self._live is None:
            self._start()

    def close(self) -> None:
        if self._live is None:
            return
        for handler in self._rerouted:
            handler.setStream(self._stream)
        self._rerouted = []
        self._live.stop()
        self._live = None

    def _start(self) -> None:
        console = Console(file=self._stream)
        self._live = Live(console=console, redirect_stdout=False, get_renderable=self._render)
        self._live.start()
        above = _AboveTheLine(console)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._stream:
                handler.setStream(above)
                self._rerouted.append(handler)

    def _render(self) -> RenderableType:
        frame = self._view
        if frame is None:
            return Text("")
        known = frame.known
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=20)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        grid.add_row(
            ProgressBar(total=max(known, 1), completed=frame.finished, width=20),
            Text(progress_line(frame, self._meter.rate(time.monotonic()))),
        )
        return grid


class _AboveTheLine(io.TextIOBase):
    """Where the log handlers write while the line is up: each complete line is printed
    above it as it is, long lines left for the terminal to wrap (rich's own stand-in for
    stderr, which catches any other writes, would break them at the terminal's width)."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            shown = Text("\n").join(Text.from_ansi(line) for line in lines)
            self._console.print(shown, soft_wrap=True)
        return len(text)


def wanted(no_progress: bool, stream: TextIO | None = None) -> bool:
    """The live line only on a terminal: never for journald, a pipe or a file."""
    return not no_progress and (stream or sys.stderr).isatty()


def watch(show: Callable[[], object], every: float = WATCH_EVERY, json: bool = False) -> int:
    """Run ``show`` (a command that prints) every ``every`` seconds and redraw what it
    printed, like watch(1), until Ctrl-C or SIGTERM. Not on a terminal, each frame is
    printed after the last; ``json``: each document after the last, as printed (a stream
    for ``jq``).

    The signal only sets a flag (``signals.StopSignals``), read between frames. Left to
    raise KeyboardInterrupt, a Ctrl-C that lands while a finalizer runs (a connection or a
    console being collected) is printed as "Exception ignored" and lost, and the redrawing
    would go on for ever."""
    console = Console(file=sys.stdout)
    wake = Wakeup()
    stop = StopSignals(wake)
    previous = stop.install()

    def frame() -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            show()
        if json:
            return out.getvalue().rstrip()
        stamp = datetime.now().astimezone().strftime("%H:%M:%S %Z")
        return f"every {every:g}s, {stamp} (Ctrl-C ends)\n{out.getvalue().rstrip()}"

    def pause() -> bool:
        """Wait ``every`` seconds; False once a stop was asked for (the signal's wake-up
        byte ends the wait at once)."""
        wake.wait(every)
        return not stop.requested

    try:
        if json or not console.is_terminal:
            while not stop.requested:
                print(frame(), flush=True)
                pause()
            return 0
        with Live(Text(frame()), console=console, auto_refresh=False) as screen:
            while pause():
                screen.update(Text(frame()), refresh=True)
        return 0
    except BrokenPipeError:  # the reader left (`| head`): stop, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        StopSignals.restore(previous)
