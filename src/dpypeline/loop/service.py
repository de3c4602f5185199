"""The service lifecycle on one screen: start, one loop, close.

``Service.run`` opens the ledger, recovers from whatever stopped the last run, runs the
setup tasks, starts the watcher and the scan thread, then loops: intake (observations →
settle → enqueue, in ``arrivals``) → health (decided in ``health``) → promote retries →
collect finished jobs → stop or start new ones. ``step(now)`` is one pass of that loop,
so tests drive it with their own clock and executor; the periodic duties are one table
(``timers``). ``now`` is monotonic: every wait keeps real time whatever the wall clock
does, and the wall clock only dates what the ledger stores (``clock``).

Signal handlers only set flags (see ``signals``); the loop reacts: the first SIGTERM/SIGINT
stops taking work and gives the running job ``stop_grace`` to finish; a job still running
then, or at a second signal, goes back to the head of the queue with its attempt refunded,
and the service stops. A stop therefore never waits for a two-hour job, and the job is
either ``done`` or queued again.
"""

from __future__ import annotations

import faulthandler
import time
from collections.abc import Mapping
from enum import StrEnum
from types import FrameType
from typing import Any

from dpypeline.clock import Clock
from dpypeline.config.model import PipelineConfig
from dpypeline.config.taskpath import task_dirs
from dpypeline.executors.serial import Executor, SerialExecutor
from dpypeline.loop.arrivals import Arrivals
from dpypeline.loop.health import Health, Snapshot, Verdict, status_line
from dpypeline.loop.progress import ExecutorFile, Observer, Observers, StatusNotice
from dpypeline.loop.restart import ClusterLost, StuckJob
from dpypeline.loop.timers import Timer, Timers
from dpypeline.loop.worker import Worker
from dpypeline.objectstore import close_clients
from dpypeline.observability.logs import get_logger
from dpypeline.observability.metrics import Metrics
from dpypeline.observability.systemd import Notifier
from dpypeline.ordering import held_summary
from dpypeline.outages import PendingSetup
from dpypeline.pipeline import Job, SetupContext, Task
from dpypeline.signals import Previous, StopSignals
from dpypeline.state.cachedir import forget_executor_status, write_executor_status
from dpypeline.state.ledger import JobRecord, Ledger
from dpypeline.wakeup import Wakeup
from dpypeline.watching.watch import Inbox

log = get_logger("dpypeline.service")

HEALTH_EVERY = 5.0
START_STEP = 60.0  # each start-up step (ledger, a setup task, a watch) may take this long
MAX_SLEEP = 1.0
EXECUTOR_STATUS_EVERY = 1.0  # how fresh `dpypeline status` shows the cluster
SYSTEMD_RESTARTS = "health pings stop so that systemd restarts the service"
RESTART = "the service restarts to reclaim the worker"
EXIT_JOBS_DEAD = 3  # `run --once` when a job ended dead: cron and batch wrappers see it
# `--max-runtime` ran out with work left: the next run goes on with it (sysexits.h's
# EX_TEMPFAIL, "try again later", which batch wrappers know)
EXIT_TIME_BUDGET = 75


class Status(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Service:
    def __init__(
        self,
        config: PipelineConfig,
        jobs: list[Job],
        setup: list[Task] | None = None,
        *,
        once: bool | None = None,
        executor: Executor | None = None,
        dask_client: Any = None,
        observers: tuple[Observer, ...] = (),  # what shows progress (a terminal's live line)
        max_runtime: float | None = None,  # seconds from start; then stop as on SIGTERM
    ) -> None:
        self.config, self.jobs, self.setup = config, jobs, setup or []
        self.once = (not config.monitor) if once is None else once
        self.max_runtime = max_runtime
        self._budget_ends: float | None = None  # on the monotonic clock
        self.budget_reached = False
        self.work_left = False  # after a stop for the budget: jobs still queued
        self.job_names = [job.name for job in jobs]
        self.status = Status.CREATED
        self.stuck = self.cluster_lost = False
        self._wake = Wakeup()  # rung by the watcher, the executor and signals
        self._stop = StopSignals(self._wake)
        self._stop_deadline: float | None = None
        self._inbox = Inbox(self._wake)
        self.metrics = Metrics(self.job_names, list(config.objectstores))
        self._clock = Clock()
        self._arrivals = Arrivals(
            config, self.job_names, self._inbox, self.metrics, clock=self._clock
        )
        self._health = Health()
        self._timers = Timers()
        self._ledger: Ledger | None = None
        self._executor = executor or self._make_executor(dask_client)  # a client: the caller's
        self._worker: Worker | None = None
        self._setup = PendingSetup([], None, config.retry.backoff)
        self._notifier = Notifier()
        wd = self._notifier.watchdog_interval
        self._health_every = min(HEALTH_EVERY, wd) if wd else HEALTH_EVERY
        self._stuck_reported = False
        self._live = Observers([StatusNotice(self._notifier, self.status_text), *observers])

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
                if self.budget_reached and self._ledger is not None:
                    self.work_left = self._ledger.has_unfinished() or not self._arrivals.idle
                if self.work_left:
                    return EXIT_TIME_BUDGET
                return EXIT_JOBS_DEAD if self.once and self.jobs_dead else 0
            finally:
                reason = "stuck job" if self.stuck else "cluster lost" if self.cluster_lost else ""
                reason = reason or ("time budget reached" if self.budget_reached else "")
                self.close(reason or "stopped")
        finally:
            self._restore_signal_handlers(previous)  # after close: more signals change nothing

    def start(self, now: float | None = None, wall: float | None = None) -> None:
        """Either fully succeeds or closes what it opened, marks itself failed and re-raises."""
        self.status = Status.STARTING
        cfg = self.config
        if self.max_runtime is not None:  # start-up counts: it is part of the wall time
            self._budget_ends = time.monotonic() + self.max_runtime
        now, _ = self._clock.read(now, wall)
        extend = self._notifier.extend_timeout  # each step that makes progress asks for time
        try:
            extend(START_STEP)
            self._ledger = Ledger(cfg.cache_dir, service=True)
            self.metrics.serve(cfg)  # a port in use: ConfigError, before any job runs
            self._worker = Worker(
                cfg, self.jobs, self._ledger, self._executor, self.metrics, clock=self._clock
            )
            self._worker.recover(now)
            # the wall clock may have been stepped back while the service was down
            self._ledger.retime_retries(self._clock.wall(now), cfg.retry.backoff.max)
            # a file found counts from then on: one job per configured job once it settles
            settling, per_file = self._arrivals.settler, len(self.job_names)
            self._live.watch(self._ledger, self._worker, lambda: len(settling) * per_file)
            extend(START_STEP)  # a cluster may take a while to come up
            self._executor.start()
            ctx = SetupContext(objectstores=cfg.objectstores, log=log)
            extend(START_STEP * max(1, len(self.setup)))
            # a store that does not answer yet is waited for while the service runs (READY,
            # STATUS "waiting for objectstore X"): no job starts until setup has succeeded
            self._setup = PendingSetup(self.setup, ctx, cfg.retry.backoff)
            self._setup.run(now)
            extend(START_STEP)
            self._arrivals.open(self._ledger, now, on_progress=lambda: extend(START_STEP))
            self._timers.every(Timer.HEALTH, self._health_every, now + self._health_every)
            if cfg.executor.kind != "serial":
                self._timers.every(Timer.EXECUTOR_STATUS, EXECUTOR_STATUS_EVERY, None)
                self._live.add(ExecutorFile(cfg.cache_dir, self._executor.describe))
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
            watches=[
                {"path": s.root, "mode": s.mode, "fs": s.fstype} for s in self._arrivals.specs
            ],
            jobs=self.job_names,
        )
        self._notifier.ready(self.status_text(now))

    def close(self, reason: str = "stopped") -> None:
        """Idempotent; always ends ``stopped`` (or ``failed``)."""
        if self.status is Status.STOPPED:
            return
        self._live.close()  # a last frame while the ledger is open
        self._arrivals.close()
        self._executor.close()
        self.metrics.close()
        close_clients()
        if self.config.executor.kind != "serial":
            forget_executor_status(self.config.cache_dir)
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self.status is not Status.FAILED:
            self.status = Status.STOPPED
        if self.work_left:
            log.warning(
                "service_stopped",
                reason=reason,
                exit_code=EXIT_TIME_BUDGET,
                action="work is left in the queue: the next run takes it up where this one stopped",
            )
        elif self.once and self.jobs_dead:
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
        return self._worker.ended_dead if self._worker is not None else 0

    @property
    def dead_jobs(self) -> list[JobRecord]:
        """Those jobs, as they were recorded dead (the Python API returns them)."""
        return list(self._worker.dead_jobs) if self._worker is not None else []

    @property
    def outcomes(self) -> dict[str, int]:
        """Attempts recorded in this run, by the state they ended in."""
        ended = self._worker.ended if self._worker is not None else {}
        return {state.value: n for state, n in ended.items()}

    @property
    def problems(self) -> list[str]:
        """What made the last health check fail (empty: healthy)."""
        return self._health.problems

    @property
    def stop_requested(self) -> bool:
        return self._stop.requested

    def request_stop(self) -> None:
        self._stop.request()

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """The SIGTERM/SIGINT handler: sets flags only (see ``signals``)."""
        self._stop.on_signal(signum, frame)

    def _install_signal_handlers(self) -> Previous | None:
        return self._stop.install()

    def _restore_signal_handlers(self, previous: Previous | None) -> None:
        self._stop.restore(previous)

    # -- the loop -------------------------------------------------------------------------

    def step(self, now: float | None = None, wall: float | None = None) -> bool:
        """One pass of the loop. Returns False when the service should stop. ``now`` is
        monotonic; ``wall``, what the wall clock says at ``now`` (by default ``now`` when
        a caller gives it, the real clocks otherwise)."""
        assert self._ledger is not None
        assert self._worker is not None
        now, stepped = self._clock.read(now, wall)
        ledger, worker = self._ledger, self._worker
        self._inbox.wake.clear()
        self._arrivals.step(now)
        if self._timers.fire(Timer.EXECUTOR_STATUS, now):
            write_executor_status(self.config.cache_dir, self._executor.describe())
        self._health_if_due(now)
        next_retry = worker.next_retry(now, stepped)
        if next_retry is not None and next_retry <= now:
            ledger.promote_due(self._clock.wall(now))
        worker.collect(now)
        if self._stuck(now):
            return False
        if self._health.cluster_gone(now, watchdog=bool(self._notifier.watchdog_interval)):
            log.error("cluster_lost", problems=self.problems, action="restarting the service")
            worker.release_all(now)
            self.cluster_lost = True
            return False
        if self._budget_spent():
            self._stop.request()
        if self._stop.requested:
            return self._stopping(now)
        if not self._setup.done and not self._setup.run(now, background=True):
            return True
        while (
            now >= worker.paused_until
            and self._executor.capacity() > 0
            and (claim := ledger.claim(self._clock.wall(now), worker.gate)) is not None
        ):
            worker.start(claim, now)
        if self.once and self._drained():
            if held := held_summary(ledger.held()):
                log.warning("service_drained", **ledger.counts(), held=held)
            else:
                log.info("service_drained", **ledger.counts())
            return False
        return True

    def _stuck(self, now: float) -> bool:
        """A job that ignored its timeout: the service stops, to restart and reclaim the
        worker (or, under a systemd watchdog, stops proving health so systemd restarts it)."""
        assert self._worker is not None
        watchdog = bool(self._notifier.watchdog_interval)
        for job_id in self._executor.enforce_timeouts(now):
            if watchdog and self._stuck_reported:
                continue
            self._stuck_reported = True
            log.error(
                "job_stuck",
                job_id=job_id,
                reason="the job ignored its timeout; "
                + (SYSTEMD_RESTARTS if watchdog else RESTART),
            )
            if watchdog:
                # systemd's watchdog restarts the service once the pings stop (the job is
                # overdue: unhealthy); its attempt was counted before it ran
                continue
            self._worker.abandon_stuck(job_id, now)
            self.stuck = True
            return True
        return False

    def _budget_spent(self) -> bool:
        """``--max-runtime`` ran out: no new job starts, running ones get ``stop_grace``,
        as on SIGTERM. Said once."""
        if self._budget_ends is None or self.budget_reached:
            return False
        if time.monotonic() < self._budget_ends:
            return False
        self.budget_reached = True
        log.info(
            "time_budget_reached",
            max_runtime=self.max_runtime,
            running=len(self._worker.active_claims()) if self._worker else 0,
            action="no new job starts; running jobs get stop_grace, the rest waits for the"
            " next run",
        )
        return True

    def _stopping(self, now: float) -> bool:
        """A stop was asked for: no new work; running jobs get ``stop_grace``, then (or at
        a second signal) go back to the queue. True while jobs still run."""
        assert self._worker is not None
        worker = self._worker
        if self.status is Status.RUNNING:
            self.status = Status.STOPPING
            self._stop_deadline = now + self.config.stop_grace
            running = len(worker.active_claims())
            log.info("service_stopping", running=running, grace=self.config.stop_grace)
            self._notifier.stopping(f"stopping; {running} job(s) to finish")
        if not worker.busy():
            return False
        if self._stop_deadline is not None and now >= self._stop_deadline:
            self._stop.now = True
        self._health_if_due(now)
        if self._stop.now:
            worker.release_all(now)
            self._executor.interrupt()
            self._executor.close()
        return worker.busy()

    def _drained(self) -> bool:
        assert self._ledger is not None
        assert self._worker is not None
        return (
            self._arrivals.idle
            and self._setup.done
            and not self._worker.busy()
            and not self._ledger.has_unfinished()
        )

    def _health_if_due(self, now: float) -> None:
        if self._timers.fire(Timer.HEALTH, now):
            self._prove_health(now)

    def _prove_health(self, now: float) -> None:
        """The watchdog ping: sent only when the watcher, the worker and the database all
        answer; a failed database query raises and ends the loop (systemd restarts it)."""
        verdict = self.check_health(now)
        if self._notifier.enabled:
            status = self.status_text(now)  # a query: proves the database answers
            if verdict.healthy:
                self._notifier.watchdog()
            self._notifier.status(status)
            if self._stop.requested and self._worker is not None and self._worker.busy():
                # the graceful stop progresses: running jobs have until the stop deadline
                left = (self._stop_deadline or now) - now
                self._notifier.extend_timeout(max(left, 0.0) + self._health_every * 3)

    def check_health(self, now: float) -> Verdict:
        """Repair what can be repaired; what is left makes the service unhealthy."""
        watching, overdue = self._arrivals.check(now), self._executor.is_overdue(now)
        executor = self._executor.problems()
        self.metrics.health(watching, overdue, executor)
        verdict = self._health.assess(now, watching=watching, overdue=overdue, executor=executor)
        if verdict.changed:
            (log.info if verdict.healthy else log.error)(
                "health_changed", problems=verdict.problems
            )
        return verdict

    def status_text(self, now: float | None = None, counts: Mapping[str, int] | None = None) -> str:
        """One line for ``systemctl status``: counts (read now unless given, as the progress
        observers do with the counts of their frame), what the service is doing, problems."""
        assert self._ledger is not None
        now = time.monotonic() if now is None else now
        worker = self._worker
        paused = worker is not None and worker.paused_until > now
        return status_line(
            Snapshot(
                status=self.status.value,
                counts=self._ledger.counts() if counts is None else counts,
                setup_waiting_for=None if self._setup.done else self._setup.waiting_for,
                paused=worker.pause_reason if worker is not None and paused else None,
                pending_scans=self._arrivals.pending_scans,
                problems=tuple(self.problems),
                held=held_summary(self._ledger.held()),
            )
        )

    def _make_executor(self, client: Any) -> Executor:
        if self.config.executor.kind == "dask":
            from dpypeline.executors.dask import DaskExecutor

            dirs = task_dirs(self.config)
            return DaskExecutor(self._inbox.wake, self.config.executor, dirs, client)
        return SerialExecutor(self._inbox.wake)

    def _sleep(self) -> None:
        now = time.monotonic()
        worker, ledger = self._worker, self._ledger
        self._live.tick(now)  # what this pass changed: STATUS, the terminal's line
        next_retry = ledger.next_retry_at() if ledger else None
        deadlines = (
            self._arrivals.next_deadline(),
            self._clock.monotonic(next_retry) if next_retry is not None else None,
            self._executor.next_deadline(),
            None if self._setup.done else self._setup.next_at,
            worker.paused_until if worker and worker.paused_until > now else None,
            self._timers.next_deadline(),
            self._live.next_deadline(),
            self._budget_ends,  # monotonic, as now is here
        )
        timeout = min([MAX_SLEEP, *(d - now for d in deadlines if d is not None)])
        if timeout > 0:
            self._inbox.wake.wait(timeout)
