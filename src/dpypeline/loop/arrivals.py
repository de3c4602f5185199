"""Intake, the first stage of the loop: observations → settle → enqueue.

The watcher and the scan thread put what they see into the inbox; here, on the loop's
thread, each observation is turned into a settle candidate (or a scan request), stable
files go into the ledger, and the rescans and polls of each watch fall due. The watch
specs (``WatchSpec``) are built here and changed only from the loop's thread (a watch
that falls back to polling is switched by ``check``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from itertools import groupby

from dpypeline.clock import Clock
from dpypeline.config.model import PipelineConfig
from dpypeline.loop import intake
from dpypeline.loop.timers import Timer, Timers
from dpypeline.observability.logs import get_logger
from dpypeline.observability.metrics import Metrics
from dpypeline.state.ledger import Ledger
from dpypeline.watching.observations import (
    Complete,
    Created,
    Deleted,
    NewDirectory,
    Observation,
    Overflow,
    Scanned,
    Unwatched,
    Writing,
)
from dpypeline.watching.scan import FileVersion
from dpypeline.watching.scanner import Scanner
from dpypeline.watching.settle import Settler, StableFile
from dpypeline.watching.watch import Inbox, Watcher, WatchSpec, build_specs

log = get_logger("dpypeline.service")

PRUNE_EVERY = 3600.0


class Arrivals:
    """Owns the watcher, the scan thread, the settler and the per-watch timers."""

    def __init__(
        self,
        config: PipelineConfig,
        job_names: list[str],
        inbox: Inbox,
        metrics: Metrics | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.config, self.job_names, self.inbox = config, job_names, inbox
        self.metrics = metrics or Metrics()
        self.clock = clock or Clock()  # settling is monotonic; the ledger's times are wall
        self.settler = Settler()
        self.pending_scans = 0  # requested and not yet reported back
        self.found_by: dict[str, str] = {}  # settling files found by a scan (or a poll)
        # settling files a rescan after an overflow found complete: (size, mtime_ns) seen
        self.rescued: dict[str, tuple[int, int]] = {}
        self.specs: list[WatchSpec] = []
        self.timers = Timers()
        self._ledger: Ledger | None = None
        self.watcher: Watcher | None = None
        self.scanner: Scanner | None = None

    def open(self, ledger: Ledger, now: float, on_progress: Callable[[], None]) -> None:
        """Start watching every configured directory and ask for the start-up scans."""
        self._ledger = ledger
        self.specs = build_specs(list(self.config.watch))
        self.watcher = Watcher(self.specs, self.inbox, on_progress=on_progress)
        self.watcher.start()
        self.scanner = Scanner(self.inbox)
        self.scanner.start()
        for spec in self.specs:
            self.request_scan(spec.index, "startup")
            self._schedule(spec, now)
            self.timers.every(Timer.PRUNE, PRUNE_EVERY, None, spec.index)
        self.metrics.watches((spec.root, spec.mode) for spec in self.specs)

    def close(self) -> None:
        if self.scanner is not None:
            self.scanner.stop()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self._ledger = None

    @property
    def idle(self) -> bool:
        """No scan pending and no file settling: nothing more can arrive by itself."""
        return self.pending_scans == 0 and len(self.settler) == 0

    def next_deadline(self) -> float | None:
        due = (self.settler.next_deadline(), self.timers.next_deadline())
        return min((d for d in due if d is not None), default=None)

    def step(self, now: float) -> None:
        """Drain the inbox, request the scans that fall due, enqueue what has settled."""
        for obs in self.inbox.drain():
            self._observe(obs, now)
        for spec in self.specs:
            if self.timers.fire(Timer.RESCAN, now, spec.index):
                self.request_scan(spec.index, "rescan")
            if self.timers.fire(Timer.POLL, now, spec.index) and self.pending_scans == 0:
                if spec.mode == "poll":
                    self.request_scan(spec.index, "poll")
                else:  # an inotify watch polls only its directories refused a watch
                    for directory in spec.polled_directories():
                        self.request_scan(spec.index, "poll", directory)
        self._enqueue(self.settler.poll(now), now)

    def check(self, now: float) -> list[str]:
        """Repair the watches that can be repaired (rescanning where events may have been
        missed); return what could not be repaired."""
        problems: list[str] = []
        if self.watcher is not None:
            health = self.watcher.check()
            problems = health.problems
            for index in health.restarted:
                log.warning(
                    "watch_restarted",
                    watch=self.specs[index].root,
                    action="rescanning: events may have been missed",
                )
                self.request_scan(index, "watch restarted")
            for index in health.recount:
                self.request_scan(index, "watch check")
            for index in health.polling:
                self._schedule(self.specs[index], now)
                self.request_scan(index, "watch check")
        if self.scanner is not None and not self.scanner.is_alive():
            problems.append("the scan thread has stopped")
        self.metrics.watches((spec.root, spec.mode) for spec in self.specs)
        return problems

    def request_scan(self, watch: int, reason: str, subdir: str | None = None) -> None:
        assert self.scanner is not None
        self.pending_scans += 1
        self.metrics.scans.labels(reason).inc()
        self.scanner.request(self.specs[watch].target(), reason, subdir)

    def _schedule(self, spec: WatchSpec, now: float) -> None:
        interval = spec.config.rescan_interval
        if interval:
            self.timers.every(Timer.RESCAN, interval, now + interval, spec.index)
        if spec.mode == "poll":
            poll = spec.config.poll_interval
            self.timers.every(Timer.POLL, poll, now + poll, spec.index)

    def _observe(self, obs: Observation, now: float) -> None:
        match obs:
            case Overflow():
                self.metrics.overflows.inc()
                log.warning("watch_overflow", reason=obs.reason, action="rescanning every watch")
                for spec in self.specs:
                    self.request_scan(spec.index, "overflow")
            case Created() | Writing() | Complete():
                self._noticed(obs, now)
            case Deleted():
                self.settler.forget(obs.path)
            case Unwatched():
                self._poll_unwatched(self.specs[obs.watch], obs, now)
            case NewDirectory():
                # watchdog reports a link to a directory inside a new one as a directory;
                # scans never go through links to directories
                if not os.path.islink(obs.path):
                    self.request_scan(obs.watch, "new directory", obs.path)
            case Scanned():
                self._scanned(obs, now)

    def _noticed(self, obs: Created | Writing | Complete, now: float) -> None:
        """A file being written (settles unless a close comes first, on a poll watch only
        by its settle time) or complete (settles by its settle time)."""
        spec = self.specs[obs.watch]
        if isinstance(obs, Created) and self._known(obs.path):
            return  # a late report: a close or a scan has shown this version complete
        if self.settler.quiet_for(obs.path, now) is None:
            self.metrics.files_seen.labels("watch").inc()  # once per file version noticed
        if isinstance(obs, Complete):
            self.settler.note(obs.path, spec.root, spec.config.settle, now, eligible=True)
        elif not self._stale(obs.path):
            eligible = spec.mode == "poll"
            self.settler.note(obs.path, spec.root, spec.config.settle, now, eligible=eligible)

    def _scanned(self, obs: Scanned, now: float) -> None:
        spec = self.specs[obs.watch]
        self.pending_scans -= 1  # a failed scan too: it was logged, the next one retries
        if obs.full and not obs.failed:
            spec.directories = obs.directories  # for the watcher's coverage check
        elif obs.path in spec.unwatched and obs.reason == "poll":
            if obs.directories:
                spec.unwatched[obs.path] = obs.directories
            else:  # gone: nothing left there to poll
                del spec.unwatched[obs.path]
        if not obs.failed:
            self._reconcile(spec, obs, now)

    def _poll_unwatched(self, spec: WatchSpec, obs: Unwatched, now: float) -> None:
        """Poll, from now on, a directory of an inotify watch that the kernel refused a
        watch (the user's ``fs.inotify.max_user_watches`` reached): watchdog goes on
        without it, and files written there would otherwise wait for the next rescan."""
        if spec.mode != "inotify" or obs.path in spec.unwatched:
            return  # a poll watch (or one that fell back to polling) sees it already
        if not spec.unwatched:
            poll = spec.config.poll_interval
            self.timers.every(Timer.POLL, poll, now + poll, spec.index)
        spec.unwatched[obs.path] = 1
        log.warning(
            "directory_polled",
            watch=spec.root,
            directory=obs.path,
            error=obs.reason,
            polled=len(spec.unwatched),
            action=f"no inotify watch could be added: polling it every"
            f" {spec.config.poll_interval:g}s instead; raise the sysctl"
            " fs.inotify.max_user_watches and restart to restore its events",
        )
        self.request_scan(spec.index, "poll", obs.path)

    def _stale(self, path: str) -> bool:
        """Whether a "being written" report of ``path`` is older than the rescan after an
        overflow that found it complete: watchdog hands on the events read with the
        overflow only after the overflow has been noticed, and the close that would end
        such a report was lost. The version on disk is still the one the rescan saw, and
        a writer still holding it open is seen when it is due."""
        seen = self.rescued.get(path)
        if seen is None or not self.settler.settling(path, seen):
            self.rescued.pop(path, None)
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == seen

    def _known(self, path: str) -> bool:
        """Whether the version of ``path`` on disk now is settling as complete already, or
        in the ledger."""
        assert self._ledger is not None
        try:
            st = os.stat(path)
        except OSError:
            return False  # gone: its deletion is reported too
        if self.settler.settling(path, (st.st_size, st.st_mtime_ns)):
            return True
        version = FileVersion(path, st.st_size, st.st_mtime_ns)
        return not intake.unknown(self._ledger, [version], self.job_names)

    def _reconcile(self, spec: WatchSpec, obs: Scanned, now: float) -> None:
        """Hand the files a scan found, and the ledger does not know, to the settler.

        A file inotify reports as being written stays so: a periodic scan must not declare
        it complete behind the writer's back (a writer pausing longer than ``settle``).
        Scans made because events were lost (overflow, a new directory written before its
        watch existed, a restarted watch) decide by themselves, and so does a periodic scan
        for a file silent for a whole ``rescan_interval`` (created by a hard link, say, so
        no close will ever come)."""
        assert self._ledger is not None
        files = obs.files
        new = [files[i] for i in intake.unknown(self._ledger, files, self.job_names)]
        source = "watch" if obs.reason == "poll" else "scan"  # polling is how a poll watch watches
        unseen = [f.path for f in new if self.settler.quiet_for(f.path, now) is None]
        self.found_by.update(dict.fromkeys(unseen, source))
        self.metrics.files_seen.labels(source).inc(len(unseen))
        trust_events = spec.mode == "inotify" and obs.reason in ("rescan", "watch check")
        stale = max(spec.config.rescan_interval, spec.config.settle)
        for f in new:
            quiet = self.settler.quiet_for(f.path, now)
            if trust_events and quiet is not None and quiet < stale:
                continue
            self.settler.note(
                f.path, spec.root, spec.config.settle, now, eligible=True, sig=(f.size, f.mtime_ns)
            )
            if obs.reason == "overflow":
                self.rescued[f.path] = (f.size, f.mtime_ns)
        if obs.reason != "poll" or new:
            log.info(
                "scan_done", watch=spec.root, reason=obs.reason, files=len(files), new=len(new)
            )
        full_walk = obs.full and obs.reason in ("startup", "rescan")
        if full_walk and self.timers.fire(Timer.PRUNE, now, spec.index):
            removed = self._ledger.prune(
                self.clock.wall(now),
                self.config.retention,
                present=(f.path for f in files),
                root=spec.root,
            )
            if removed:
                log.info("ledger_pruned", removed=removed)

    def _enqueue(self, stable: list[StableFile], now: float) -> None:
        """Stable files into the ledger, in the order they settled, each job recording
        whether an event or a scan found its file (``source``)."""
        assert self._ledger is not None
        found_by = {f.path: self.found_by.pop(f.path, "watch") for f in stable}
        for f in stable:
            self.rescued.pop(f.path, None)
        if not len(self.settler):
            self.found_by.clear()  # files a scan found that vanished before they settled
            self.rescued.clear()
        by_root: dict[str, list[StableFile]] = defaultdict(list)
        follows = {s.root: s.config.follow_symlinks for s in self.specs}
        for f in intake.allowed(stable, lambda root: follows.get(root, False)):
            by_root[f.root].append(f)
        for root, files in by_root.items():
            added = 0
            for source, run in groupby(files, key=lambda f: found_by[f.path]):
                n = intake.enqueue(
                    self._ledger,
                    list(run),
                    root,
                    self.job_names,
                    source=source,
                    now=self.clock.wall(now),
                )
                self.metrics.enqueued.labels(source).inc(n)
                added += n
            if added:
                log.info("files_enqueued", watch=root, files=len(files), jobs=added)
