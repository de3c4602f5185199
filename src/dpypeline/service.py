"""The service lifecycle on one screen: start, one loop, close.

``Service.run`` opens the ledger, recovers from whatever stopped the last run, runs the
setup tasks, starts the watcher and the scan thread, then loops: drain observations →
settle → enqueue → promote retries → collect finished jobs → start new ones →
health. ``step(now)`` is one pass of that loop, so tests can drive it directly.

Signal handlers only set flags (anything more is unsafe in a handler: a lock the loop
holds at that instant would never be released) and the interpreter wakes the loop through
``signal.set_wakeup_fd`` (see ``wakeup``); the loop reacts:
the first SIGTERM/SIGINT stops taking work and gives the running job ``stop_grace`` to
finish; a job still running then, or at a second signal, goes back to the head of the
queue with its attempt refunded, and the service stops. A stop therefore never waits for
a two-hour job, and the job is either ``done`` or queued again.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Any

from dpypeline.config import PipelineConfig
from dpypeline.executors.ordering import held_summary
from dpypeline.executors.serial import Executor, SerialExecutor
from dpypeline.logs import get_logger
from dpypeline.objectstore import close_clients
from dpypeline.outages import PendingSetup
from dpypeline.pipeline import Job, SetupContext, Task
from dpypeline.state.cachedir import forget_executor_status, write_executor_status
from dpypeline.state.ledger import Ledger
from dpypeline.systemd import Notifier
from dpypeline.wakeup import Wakeup
from dpypeline.watching import intake
from dpypeline.watching.settle import Settler, StableFile
from dpypeline.watching.watch import Inbox, Observation, Scanner, Watcher, WatchSpec, build_specs
from dpypeline.worker import Worker

log = get_logger("dpypeline.service")

HEALTH_EVERY = 5.0
START_STEP = 60.0  # each start-up step (ledger, a setup task, a watch) may take this long
PRUNE_EVERY = 3600.0
MAX_SLEEP = 1.0
EXECUTOR_STATUS_EVERY = 1.0  # how fresh `dpypeline status` shows the cluster
CLUSTER_GRACE = 15.0  # a lost Dask scheduler this long makes the service restart itself
EXIT_JOBS_DEAD = 3  # `run --once` when a job ended dead: cron and batch wrappers see it


class Status(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class StuckJob(RuntimeError):
    """A job ignored its timeout; only a restart of the process can reclaim its thread."""


class ClusterLost(RuntimeError):
    """The Dask scheduler or cluster is gone; a restart reconnects to it or rebuilds it."""


class Service:
    def __init__(
        self,
        config: PipelineConfig,
        jobs: list[Job],
        setup: list[Task] | None = None,
        *,
        once: bool | None = None,
    ) -> None:
        self.config, self.jobs, self.setup = config, jobs, setup or []
        self.once = (not config.monitor) if once is None else once
        self.job_names = [job.name for job in jobs]
        self.status = Status.CREATED
        self.problems: list[str] = []
        self.stuck = False
        self._stop_requested = self._stop_now = False
        self._stop_deadline: float | None = None
        self._wake = Wakeup()  # rung by the watcher, the executor and signals
        self._inbox = Inbox(self._wake)
        self._settler = Settler()
        self._pending_scans = 0
        self._next: dict[str, float] = {}
        self._ledger: Ledger | None = None
        self._watcher: Watcher | None = None
        self._scanner: Scanner | None = None
        self._specs: list[WatchSpec] = []
        self._executor = self._make_executor()
        self._cluster_lost_since: float | None = None
        self.cluster_lost = False
        self._worker: Worker | None = None
        self._setup = PendingSetup([], None, config.retry.backoff)
        self._notifier = Notifier()
        wd = self._notifier.watchdog_interval
        self._health_every = min(HEALTH_EVERY, wd) if wd else HEALTH_EVERY
        self._stuck_reported = False
        self._recovered_dead = 0

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Start, loop until done (``once``) or stopped, close. Returns the exit code."""
        if not faulthandler.is_enabled():
            # the watchdog's SIGABRT (and any fatal signal) prints every thread's stack to
            # stderr, which is the journal under systemd: where was it stuck?
            faulthandler.enable()
        previous = self._install_signal_handlers()  # a stop during start-up is not lost
        try:
            self.start()
            try:
                while self.step():
                    self._sleep()
                if self.stuck:
                    raise StuckJob("a job did not stop after its timeout")
                if self.cluster_lost:
                    raise ClusterLost("the Dask scheduler is unreachable")
                return EXIT_JOBS_DEAD if self.once and self.jobs_dead else 0
            finally:
                reason = "stuck job" if self.stuck else "cluster lost" if self.cluster_lost else ""
                self.close(reason or "stopped")
        finally:
            self._restore_signal_handlers(previous)  # after close: more signals change nothing

    def start(self) -> None:
        """Either fully succeeds or closes what it opened, marks itself failed and re-raises."""
        self.status = Status.STARTING
        cfg = self.config
        now = time.time()
        extend = self._notifier.extend_timeout  # each step that makes progress asks for time
        try:
            extend(START_STEP)
            self._ledger = Ledger(cfg.cache_dir, service=True)
            rec = self._ledger.recover(cfg.retry.max_attempts, now)
            if rec.resumed or rec.dead:
                log.warning(
                    "jobs_recovered",
                    resumed=rec.resumed,
                    dead=rec.dead,
                    reason="jobs were running when the service last stopped",
                )
            self._recovered_dead = len(rec.dead_jobs)
            for job in rec.dead_jobs:  # one entry each, like any other job that ends dead
                log.error(
                    "job_dead",
                    job_id=job.id,
                    file=job.path,
                    job=job.job,
                    attempt=job.attempts,
                    state=job.state.value,
                    error=job.error,
                )
            extend(START_STEP)  # a cluster may take a while to come up
            self._executor.start()
            self._worker = Worker(cfg, self.jobs, self._ledger, self._executor)
            ctx = SetupContext(objectstores=cfg.objectstores, log=log)
            extend(START_STEP * max(1, len(self.setup)))
            # a store that does not answer yet is waited for while the service runs (READY,
            # STATUS "waiting for objectstore X"): no job starts until setup has succeeded
            self._setup = PendingSetup(self.setup, ctx, cfg.retry.backoff)
            self._setup.run(now)
            extend(START_STEP)
            self._specs = build_specs(list(cfg.watch))
            self._watcher = Watcher(
                self._specs, self._inbox, on_progress=lambda: extend(START_STEP)
            )
            self._watcher.start()
            self._scanner = Scanner(self._specs, self._inbox)
            self._scanner.start()
            for spec in self._specs:
                self._request_scan(spec.index, "startup")
                self._schedule(spec, now)
        except BaseException:
            self.status = Status.FAILED
            self.close("start-up failed")
            raise
        self.status = Status.RUNNING
        log.info(
            "service_ready",
            name=cfg.name,
            cache_dir=str(cfg.cache_dir),
            once=self.once,
            watches=[{"path": s.root, "mode": s.mode, "fs": s.fstype} for s in self._specs],
            jobs=self.job_names,
        )
        self._notifier.ready(self.status_text())

    def close(self, reason: str = "stopped") -> None:
        """Idempotent; always ends ``stopped`` (or ``failed``)."""
        if self.status in (Status.STOPPED,):
            return
        if self._scanner is not None:
            self._scanner.stop()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self._executor.close()
        close_clients()
        if self.config.executor.kind != "serial":
            forget_executor_status(self.config.cache_dir)
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self.status is not Status.FAILED:
            self.status = Status.STOPPED
        if self.once and self.jobs_dead:
            log.warning(
                "service_stopped",
                reason=reason,
                jobs_dead=self.jobs_dead,
                exit_code=EXIT_JOBS_DEAD,
                action="see `dpypeline jobs --state dead`; fix the cause, then `dpypeline retry`",
            )
        else:
            log.info("service_stopped", reason=reason)

    @property
    def jobs_dead(self) -> int:
        """Jobs that ended dead in this run (at recovery or after their last attempt)."""
        worker = self._worker.ended_dead if self._worker is not None else 0
        return self._recovered_dead + worker

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def request_stop(self) -> None:
        if self._stop_requested:
            self._stop_now = True
        self._stop_requested = True
        self._inbox.wake.set()

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Plain assignments, nothing else: no lock, no I/O, no logging. The wake-up byte
        was already written by the interpreter (``set_wakeup_fd``)."""
        self._stop_now = self._stop_requested
        self._stop_requested = True

    def _install_signal_handlers(self) -> tuple[dict[int, Any], int] | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        handlers: dict[int, Any] = {
            s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)
        }
        return handlers, signal.set_wakeup_fd(self._wake.signal_fd, warn_on_full_buffer=False)

    def _restore_signal_handlers(self, previous: tuple[dict[int, Any], int] | None) -> None:
        if previous is None:
            return
        handlers, wakeup_fd = previous
        signal.set_wakeup_fd(wakeup_fd)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    # -- the loop -------------------------------------------------------------------------

    def step(self, now: float | None = None) -> bool:
        """One pass of the loop. Returns False when the service should stop."""
        assert self._ledger is not None
        assert self._worker is not None
        now = time.time() if now is None else now
        ledger, worker = self._ledger, self._worker
        self._inbox.wake.clear()
        for obs in self._inbox.drain():
            self._observe(obs, now)
        self._periodic(now)
        self._enqueue(self._settler.poll(now), now)
        next_retry = ledger.next_retry_at()
        if next_retry is not None and next_retry <= now:
            ledger.promote_due(now)
        worker.collect(now)
        for job_id in self._executor.enforce_timeouts(now):
            if self._notifier.watchdog_interval:
                # systemd's watchdog restarts the service once the pings stop (the job is
                # overdue: unhealthy); its attempt was counted before it ran
                if not self._stuck_reported:
                    self._stuck_reported = True
                    log.error(
                        "job_stuck",
                        job_id=job_id,
                        reason="the job ignored its timeout;"
                        " health pings stop so that systemd restarts the service",
                    )
                continue
            log.error(
                "job_stuck",
                job_id=job_id,
                reason="the job ignored its timeout; the service restarts to reclaim the worker",
            )
            worker.abandon_stuck(job_id, now)
            self.stuck = True
            return False
        if self._cluster_gone(now):
            log.error("cluster_lost", problems=self.problems, action="restarting the service")
            worker.release_all(now)
            self.cluster_lost = True
            return False
        if self._stop_requested:
            if self.status is Status.RUNNING:
                self.status = Status.STOPPING
                self._stop_deadline = now + self.config.stop_grace
                running = len(worker.active_claims())
                log.info("service_stopping", running=running, grace=self.config.stop_grace)
                self._notifier.stopping(f"stopping; {running} job(s) to finish")
            if worker.busy() and self._stop_deadline is not None and now >= self._stop_deadline:
                self._stop_now = True
            if worker.busy():
                self._health_if_due(now)
            if self._stop_now and worker.busy():
                worker.release_all(now)
                self._executor.interrupt()
                self._executor.close()
            return worker.busy()
        if not self._setup.done and not self._setup.run(now, background=True):
            return True
        while (
            now >= worker.paused_until
            and self._executor.capacity() > 0
            and (claim := ledger.claim(now, worker.gate)) is not None
        ):
            worker.start(claim, now)
        if self.once and self._drained():
            if held := held_summary(ledger.held()):
                log.warning("service_drained", **ledger.counts(), held=held)
            else:
                log.info("service_drained", **ledger.counts())
            return False
        return True

    def _cluster_gone(self, now: float) -> bool:
        """Unreachable for longer than CLUSTER_GRACE. Under a systemd watchdog the missing
        pings make systemd restart the service; without one it restarts itself."""
        since = self._cluster_lost_since
        return (
            since is not None
            and now - since > CLUSTER_GRACE
            and not self._notifier.watchdog_interval
        )

    def _drained(self) -> bool:
        assert self._ledger is not None
        assert self._worker is not None
        return (
            self._pending_scans == 0
            and self._setup.done
            and len(self._settler) == 0
            and not self._worker.busy()
            and not self._ledger.has_unfinished()
        )

    def _observe(self, obs: Observation, now: float) -> None:
        if obs.kind == "overflow":
            log.warning("watch_overflow", reason=obs.reason, action="rescanning every watch")
            for spec in self._specs:
                self._request_scan(spec.index, "overflow")
            return
        spec = self._specs[obs.watch]
        settle = spec.config.settle
        if obs.kind == "writing":
            self._settler.note(obs.path, spec.root, settle, now, eligible=spec.mode == "poll")
        elif obs.kind == "complete":
            self._settler.note(obs.path, spec.root, settle, now, eligible=True)
        elif obs.kind == "deleted":
            self._settler.forget(obs.path)
        elif obs.kind == "directory":
            self._request_scan(spec.index, "new directory", obs.path)
        elif obs.kind == "scanned":
            self._pending_scans -= 1  # a failed scan too: it was logged, the next one retries
            if not obs.failed:
                self._reconcile(spec, obs, now)

    def _reconcile(self, spec: WatchSpec, obs: Observation, now: float) -> None:
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
        trust_events = spec.mode == "inotify" and obs.reason in ("rescan", "watch check")
        stale = max(spec.config.rescan_interval, spec.config.settle)
        for f in new:
            quiet = self._settler.quiet_for(f.path, now)
            if trust_events and quiet is not None and quiet < stale:
                continue
            self._settler.note(
                f.path, spec.root, spec.config.settle, now, eligible=True, sig=(f.size, f.mtime_ns)
            )
        if obs.reason != "poll" or new:
            log.info(
                "scan_done", watch=spec.root, reason=obs.reason, files=len(files), new=len(new)
            )
        prune_key = f"prune{spec.index}"
        if obs.full and obs.reason in ("startup", "rescan") and now >= self._next.get(prune_key, 0):
            self._next[prune_key] = now + PRUNE_EVERY
            removed = self._ledger.prune(
                now, self.config.retention, present=(f.path for f in files), root=spec.root
            )
            if removed:
                log.info("ledger_pruned", removed=removed)

    def _enqueue(self, stable: list[StableFile], now: float) -> None:
        assert self._ledger is not None
        by_root: dict[str, list[StableFile]] = defaultdict(list)
        follows = {s.root: s.config.follow_symlinks for s in self._specs}
        for f in intake.allowed(stable, lambda root: follows.get(root, False)):
            by_root[f.root].append(f)
        for root, files in by_root.items():
            added = intake.enqueue(
                self._ledger, files, root, self.job_names, source="watch", now=now
            )
            if added:
                log.info("files_enqueued", watch=root, files=len(files), jobs=added)

    def _request_scan(self, watch: int, reason: str, subdir: str | None = None) -> None:
        assert self._scanner is not None
        self._pending_scans += 1
        self._scanner.request(watch, reason, subdir)

    def _schedule(self, spec: WatchSpec, now: float) -> None:
        if spec.config.rescan_interval:
            self._next[f"rescan{spec.index}"] = now + spec.config.rescan_interval
        if spec.mode == "poll":
            self._next[f"poll{spec.index}"] = now + spec.config.poll_interval
        self._next.setdefault("health", now + self._health_every)

    def _periodic(self, now: float) -> None:
        for spec in self._specs:
            key = f"rescan{spec.index}"
            if key in self._next and now >= self._next[key]:
                self._next[key] = now + spec.config.rescan_interval
                self._request_scan(spec.index, "rescan")
            key = f"poll{spec.index}"
            if key in self._next and now >= self._next[key]:
                self._next[key] = now + spec.config.poll_interval
                if self._pending_scans == 0:
                    self._request_scan(spec.index, "poll")
        if self.config.executor.kind != "serial" and now >= self._next.get("executor", 0.0):
            self._next["executor"] = now + EXECUTOR_STATUS_EVERY
            write_executor_status(self.config.cache_dir, self._executor.describe())
        self._health_if_due(now)

    def _health_if_due(self, now: float) -> None:
        if now >= self._next.get("health", 0.0):
            self._next["health"] = now + self._health_every
            self._prove_health(now)

    def _prove_health(self, now: float) -> None:
        """The watchdog ping: sent only when the watcher, the worker and the database all
        answer; a failed database query raises and ends the loop (systemd restarts it)."""
        problems = self.check_health(now)
        if self._notifier.enabled:
            status = self.status_text()  # a query: proves the database answers
            if not problems:
                self._notifier.watchdog()
            self._notifier.status(status)
            if self._stop_requested and self._worker is not None and self._worker.busy():
                # the graceful stop progresses: running jobs have until the stop deadline
                left = (self._stop_deadline or now) - now
                self._notifier.extend_timeout(max(left, 0.0) + self._health_every * 3)

    def status_text(self) -> str:
        """One line for ``systemctl status``: counts, what the service is doing, problems."""
        assert self._ledger is not None
        counts = self._ledger.counts()
        text = ", ".join(f"{n} {state}" for state, n in counts.items())
        doing = self.status.value
        if not self._setup.done:
            doing = f"waiting for {self._setup.waiting_for} (setup)"
        elif self._worker is not None and self._worker.paused_until > time.time():
            doing = f"paused: {self._worker.pause_reason}"
        elif self._pending_scans:
            doing += f", scanning ({self._pending_scans} pending)"
        if self.problems:
            doing += "; UNHEALTHY: " + "; ".join(self.problems)
        if held := held_summary(self._ledger.held()):
            doing += "; " + held
        return f"{doing}; {text}"

    def check_health(self, now: float) -> list[str]:
        """Repair what can be repaired; what is left makes the service unhealthy."""
        problems: list[str] = []
        if self._watcher is not None:
            health = self._watcher.check()
            problems = health.problems
            for index in health.restarted:
                log.warning(
                    "watch_restarted",
                    watch=self._specs[index].root,
                    action="rescanning: events may have been missed",
                )
                self._request_scan(index, "watch restarted")
            for index in health.recount:
                self._request_scan(index, "watch check")
            for index in health.polling:
                self._schedule(self._specs[index], now)
                self._request_scan(index, "watch check")
        if self._scanner is not None and not self._scanner.is_alive():
            problems.append("the scan thread has stopped")
        if self._executor.is_overdue(now):
            problems.append("a job is running past retry.job_timeout")
        lost = self._executor.problems()
        if not lost:
            self._cluster_lost_since = None
        elif self._cluster_lost_since is None:
            self._cluster_lost_since = now
        problems.extend(lost)
        if problems != self.problems:
            (log.error if problems else log.info)("health_changed", problems=problems)
        self.problems = problems
        return problems

    def _make_executor(self) -> Executor:
        if self.config.executor.kind == "dask":
            from dpypeline.executors.dask import DaskExecutor

            source = self.config.source
            dirs = [str(Path(source).resolve().parent)] if source is not None else []
            return DaskExecutor(self._inbox.wake, self.config.executor, dirs)
        return SerialExecutor(self._inbox.wake)

    def _sleep(self) -> None:
        now = time.time()
        deadlines = [
            d
            for d in (
                self._settler.next_deadline(),
                self._ledger.next_retry_at() if self._ledger else None,
                self._executor.next_deadline(),
                None if self._setup.done else self._setup.next_at,
                self._worker.paused_until
                if self._worker and self._worker.paused_until > now
                else None,
                *self._next.values(),
            )
            if d is not None
        ]
        timeout = min([MAX_SLEEP, *(d - now for d in deadlines)])
        if timeout > 0:
            self._inbox.wake.wait(timeout)


def reexec() -> None:
    """Replace this process with a fresh copy of itself (same PID, same arguments)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
