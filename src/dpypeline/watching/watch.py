"""Adapter around watchdog: the inotify watches, and the inbox every observation goes to.

Nothing here decides anything: observations (``observations``) go into one thread-safe
inbox that the service loop drains. The observer thread only filters by pattern and
enqueues; it never sleeps or stats (the original slept a second per file there).

Covered traps of watchdog (SPEC §1):
- an inotify queue overflow is only logged by watchdog (or not at all, by 6.0): the
  ``overflow`` module sees the kernel's overflow event itself and turns it into an
  ``overflow`` observation, and the service rescans;
- an emitter thread can die (e.g. its root was removed) while the observer lives on:
  ``check`` finds dead emitters and re-schedules them, reporting what it could not fix;
- a watch that cannot be set up (inotify limits) falls back to polling, loudly;
- a directory made after start that the kernel refuses a watch (``max_user_watches``
  reached) is skipped by watchdog; the ``overflow`` module sees the refusal and the
  directory is polled from then on (an ``unwatched`` observation), the rest of the tree
  keeping its events;
- files present at start are not reported: the service scans at start;
- only inotify reports close-after-write: ``poll`` watches scan every ``poll_interval``
  on the scan thread (``scanner``) (cheaper than watchdog's PollingObserver, which keeps and
  diffs a full snapshot with inode maps) and rely on the settle time alone.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyObserver

from dpypeline.config.model import WatchConfig
from dpypeline.watching import overflow
from dpypeline.watching.fsinfo import filesystem_type, is_network_fstype
from dpypeline.watching.observations import (
    Complete,
    Created,
    Deleted,
    NewDirectory,
    Observation,
    Overflow,
    Unwatched,
    Writing,
)
from dpypeline.watching.patterns import PathMatcher, watch_matcher

log = structlog.stdlib.get_logger("dpypeline.watch")

EVENT_TYPES: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileAttribEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


@dataclass(frozen=True, slots=True)
class ScanTarget:
    """What the scan thread needs of a watch, copied when a scan is requested: the loop
    thread alone owns (and changes) the watch's :class:`WatchSpec`."""

    index: int
    root: str
    matcher: PathMatcher
    follow_symlinks: bool
    poll: bool  # a ``poll`` watch: a full scan is also the look later polls compare with

    def relative(self, path: str) -> str | None:
        if path.startswith(self.root + os.sep):
            return path[len(self.root) + 1 :]
        return None


@dataclass
class WatchSpec:
    """One configured watch and how it is observed."""

    index: int
    config: WatchConfig
    root: str
    matcher: PathMatcher
    mode: Literal["inotify", "poll"]
    fstype: str
    observed: ObservedWatch | None = None
    directories: int = 0  # found by the last full scan
    # directories of an inotify watch refused a watch of their own, polled instead: each
    # with the directories its last poll walked (it and those below it have no watch)
    unwatched: dict[str, int] = field(default_factory=dict)

    def polled_directories(self) -> list[str]:
        """The unwatched directories to poll: each once, and none below another (a poll
        walks the whole tree below its directory)."""
        polled: list[str] = []
        for path in sorted(self.unwatched):
            if not polled or not path.startswith(polled[-1] + os.sep):
                polled.append(path)
        return polled

    def polled_count(self) -> int:
        """How many directories of the last full scan have no watch and are polled."""
        return sum(self.unwatched[path] for path in self.polled_directories())

    def target(self) -> ScanTarget:
        return ScanTarget(
            self.index, self.root, self.matcher, self.config.follow_symlinks, self.mode == "poll"
        )

    def relative(self, path: str) -> str | None:
        if path.startswith(self.root + os.sep):
            return path[len(self.root) + 1 :]
        return None


def build_specs(watches: list[WatchConfig]) -> list[WatchSpec]:
    specs = []
    for i, w in enumerate(watches):
        root = os.path.realpath(w.path)
        fstype = filesystem_type(root)
        mode = w.mode if w.mode != "auto" else ("poll" if is_network_fstype(fstype) else "inotify")
        specs.append(WatchSpec(i, w, root, watch_matcher(w), mode, fstype))
    return specs


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's dispatcher thread: filter, enqueue, wake the loop. Nothing else."""

    def __init__(self, spec: WatchSpec, inbox: Inbox) -> None:
        self.spec, self.inbox = spec, inbox

    def _file(self, kind: type[Created | Writing | Complete], path: str) -> None:
        rel = self.spec.relative(path)
        if rel is not None and self.spec.matcher.matches(rel):
            self.inbox.put(kind(self.spec.index, path))

    def dispatch(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        if isinstance(event, DirMovedEvent | DirCreatedEvent):
            path = os.fsdecode(event.dest_path) if isinstance(event, DirMovedEvent) else src
            if path and self.spec.relative(path) is not None:
                self.inbox.put(NewDirectory(self.spec.index, path))
        elif isinstance(event, FileMovedEvent):  # src or dest is "" when outside the tree
            if src:
                self.inbox.put(Deleted(self.spec.index, src))
            if event.dest_path:
                self._file(Complete, os.fsdecode(event.dest_path))
        elif isinstance(event, FileClosedEvent | FileAttribEvent):
            self._file(Complete, src)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            # watchdog's "created" for each file of a directory moved in, or made before its
            # watch existed (synthetic in watchdog 6, a simulated IN_CREATE in 7), is no sign
            # of a writer: no close will follow it; nor is a hard link made to a file already
            # there (ln, rsync --link-dest). A writer still at work sends IN_MODIFY next.
            # An empty file reported created may be one of those too ("created": the loop
            # looks whether this version is known already).
            if isinstance(event, FileModifiedEvent):
                self._file(Writing, src)
            elif event.is_synthetic or _already_written(event.src_path):
                self._file(Complete, src)
            else:
                self._file(Created, src)
        elif isinstance(event, FileDeletedEvent):
            self.inbox.put(Deleted(self.spec.index, src))


class Inbox:
    """The loop's mailbox: observations from any thread, and a wake-up event."""

    def __init__(self, wake: threading.Event | None = None) -> None:
        self._q: queue.SimpleQueue[Observation] = queue.SimpleQueue()
        self.wake = wake or threading.Event()

    def put(self, obs: Observation) -> None:
        self._q.put(obs)
        self.wake.set()

    def drain(self, limit: int = 100_000) -> list[Observation]:
        out: list[Observation] = []
        try:
            while len(out) < limit:
                out.append(self._q.get_nowait())
        except queue.Empty:
            pass
        return out


class Watcher:
    """The inotify observer of all ``inotify`` watches, kept alive by ``check``."""

    def __init__(
        self,
        specs: list[WatchSpec],
        inbox: Inbox,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.specs, self.inbox = specs, inbox
        self._on_progress = on_progress  # called before each watch is set up (can be slow)
        self._observer: BaseObserver | None = None
        self._short = 0  # consecutive checks that found fewer watches than directories

    def start(self) -> None:
        overflow.install()
        overflow.listen(self._overflowed)
        overflow.listen_refused(self._refused)
        # Full events: a file moved in from outside the tree is a move (complete), not a
        # creation (which would wait for a close that never comes).
        self._observer = InotifyObserver(generate_full_events=True)
        self._observer.start()  # first: then a watch that fails raises from its schedule()
        for spec in self.specs:
            if spec.mode == "inotify":
                if self._on_progress is not None:
                    self._on_progress()
                self._schedule(spec)

    def _overflowed(self) -> None:
        self.inbox.put(Overflow("inotify queue overflow"))

    def _refused(self, directory: str, error: OSError) -> None:
        """On the thread that asked for the watch (watchdog's, or the loop's in
        ``_schedule``): tell the loop, which polls the directory if its watch uses inotify."""
        for spec in self.specs:
            if directory == spec.root or spec.relative(directory) is not None:
                self.inbox.put(Unwatched(spec.index, directory, str(error)))

    def _schedule(self, spec: WatchSpec) -> None:
        assert self._observer is not None
        try:
            spec.observed = self._observer.schedule(
                _Handler(spec, self.inbox), spec.root, recursive=True, event_filter=EVENT_TYPES
            )
        except OSError as exc:
            log.error(
                "watch_failed",
                watch=spec.root,
                error=str(exc),
                action=f"polling it every {spec.config.poll_interval:g}s instead; raise the"
                " sysctls fs.inotify.max_user_watches / max_user_instances to restore events",
            )
            spec.mode, spec.observed = "poll", None
            spec.unwatched.clear()

    def check(self) -> WatchHealth:
        """Find dead parts and repair what can be repaired: re-establish dead emitters, and
        poll instead when the kernel holds fewer watches than there are directories."""
        health = WatchHealth()
        if self._observer is None:
            return health
        if not self._observer.is_alive():
            health.problems.append("the watchdog observer thread has stopped")
            return health
        health.restarted, health.problems = self._revive_emitters()
        self._check_coverage(health)
        return health

    def _check_coverage(self, health: WatchHealth) -> None:
        """watchdog skips, silently, any subdirectory it cannot watch (inotify's watch limit
        reached, say), so count the watches the kernel really holds for this process."""
        inotify = [s for s in self.specs if s.mode == "inotify"]
        held = inotify_watch_count()
        expected = sum(s.directories - s.polled_count() for s in inotify)
        if held is None or held >= expected:
            self._short = 0
            return
        self._short += 1
        if self._short == 1:  # maybe directories were removed since the scan: count again
            health.recount += [s.index for s in inotify]
            return
        log.error(
            "watch_incomplete",
            watches_held=held,
            directories=expected,
            action="polling every watch instead of inotify; raise the sysctl"
            " fs.inotify.max_user_watches and restart to restore events",
        )
        for spec in inotify:
            if spec.observed is not None and self._observer is not None:
                with contextlib.suppress(KeyError):
                    self._observer.unschedule(spec.observed)
            spec.mode, spec.observed = "poll", None
            spec.unwatched.clear()
            health.polling.append(spec.index)
        self._short = 0

    def _revive_emitters(self) -> tuple[list[int], list[str]]:
        assert self._observer is not None
        alive = {e.watch for e in self._observer.emitters if e.is_alive()}
        repaired, problems = [], []
        for spec in self.specs:
            if spec.mode != "inotify" or spec.observed in alive:
                continue
            if spec.observed is not None:
                with contextlib.suppress(KeyError):
                    self._observer.unschedule(spec.observed)
                spec.observed = None
            if not os.path.isdir(spec.root):
                problems.append(f"watched directory {spec.root} is gone")
                continue
            self._schedule(spec)
            repaired.append(spec.index)
        return repaired, problems

    def stop(self) -> None:
        overflow.unlisten(self._overflowed)
        overflow.unlisten_refused(self._refused)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None


@dataclass
class WatchHealth:
    restarted: list[int] = field(default_factory=list)  # re-established: events were missed
    recount: list[int] = field(default_factory=list)  # to rescan before judging coverage
    polling: list[int] = field(default_factory=list)  # watches switched to polling
    problems: list[str] = field(default_factory=list)  # what could not be repaired


def inotify_watch_count() -> int | None:
    """Watches held by this process's inotify instances, from /proc (None if unknown)."""
    count = 0
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    count += sum(1 for line in info if line.startswith("inotify wd:"))
            except OSError:
                continue
    except OSError:
        return None
    return count


def _already_written(path: bytes | str) -> bool:
    """Whether a file reported as created already has content, or is a hard link to a
    file that existed: a writer that creates a file finds it empty, and any write it
    makes after the event is reported as a modification."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_size > 0 or st.st_nlink > 1
