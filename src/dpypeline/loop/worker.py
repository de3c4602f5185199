"""From a claimed job to its recorded outcome: the pre-run checks, the job's context, how
an exception is classified, and the backoff. The executor runs the function; the ledger
records the result; this module decides what the result means.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from dpypeline.clock import Clock
from dpypeline.config.model import PipelineConfig, RetryConfig
from dpypeline.errors import (
    ConfigError,
    JobTimeout,
    PermanentError,
    SkipFile,
    TransientError,
    Unavailable,
)
from dpypeline.executors.serial import Executor, Finished
from dpypeline.observability.logs import get_logger
from dpypeline.observability.metrics import Metrics
from dpypeline.ordering import Held, behind_dead, hold_for
from dpypeline.paths import refusal
from dpypeline.pipeline import Job, JobCall, JobContext
from dpypeline.state.ledger import Claim, JobRecord, JobState, Ledger
from dpypeline.watching.scan import FileVersion

log = get_logger("dpypeline.worker")

MAX_ERROR = 2000


@dataclass(frozen=True, slots=True)
class Decision:
    state: JobState
    error: str | None = None
    not_before: float | None = None


def describe(exc: BaseException, path: str | None = None, shown_as: str = "the file") -> str:
    """One line: the exception's class and message; the job's own *path*, which the line,
    the ledger row and status already show, is named *shown_as* instead of repeated."""
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    if path:
        text = text.replace(repr(path), shown_as).replace(path, shown_as)
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def backoff(attempt: int, retry: RetryConfig) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    return retry.backoff.delay(attempt)


def decide(exc: BaseException, claim: Claim, retry: RetryConfig, now: float) -> Decision:
    """Turn a failed attempt into the job's next state."""
    rec = claim.record
    if isinstance(exc, SkipFile):
        return Decision(JobState.SKIPPED, f"skipped: {exc}")
    if isinstance(exc, FileNotFoundError) and not os.path.exists(rec.path):
        return Decision(JobState.SKIPPED, f"skipped: {rec.path} vanished while it was processed")
    if isinstance(exc, PermanentError | ConfigError):  # a task's own settings are wrong
        return Decision(
            JobState.DEAD,
            f"{describe(exc, rec.path)} (permanent; fix the cause, then run:"
            f" dpypeline retry {rec.id})",
        )
    if isinstance(exc, JobTimeout):
        reason = f"timed out after {retry.job_timeout:g}s (retry.job_timeout)"
    else:
        reason = describe(exc, rec.path)
    if rec.attempts >= retry.max_attempts:
        return Decision(
            JobState.DEAD,
            f"failed {rec.attempts} of {retry.max_attempts} attempts;"
            f" last: {reason}. Fix the cause, then run:"
            f" dpypeline retry {rec.id}",
        )
    return Decision(JobState.RETRYING, reason, now + backoff(rec.attempts, retry))


class Worker:
    """Starts claimed jobs on the executor and records how they end."""

    def __init__(
        self,
        config: PipelineConfig,
        jobs: list[Job],
        ledger: Ledger,
        executor: Executor,
        metrics: Metrics | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.config, self.ledger, self.executor = config, ledger, executor
        self.clock = clock or Clock()  # the ledger's times are the wall clock's
        self.metrics = metrics or Metrics()
        self.jobs = {job.name: job for job in jobs}
        # job name -> the ordered resource it commits to (an append store), if any
        self.ordered = {j.name: r for j in jobs if (r := j.ordered_resource()) is not None}
        self._writers: dict[str, list[str]] = {}  # ordered resource -> the jobs writing it
        for name, resource in self.ordered.items():
            self._writers.setdefault(resource, []).append(name)
        # asked by the ledger before it counts a job's attempt; only ordered resources hold
        self.gate = self._gate if self.ordered else None
        # a job's root is its watch's resolved path (or a watch since removed: never follow)
        self._follows = {os.path.realpath(w.path): w.follow_symlinks for w in config.watch}
        self._active: dict[int, tuple[Claim, Any]] = {}
        self.paused_until = 0.0  # no new job before this: a service they need is down
        self._outages = 0  # consecutive Unavailable failures, for the pause's backoff
        self.ended_dead = 0  # jobs recorded dead in this run (``run --once`` exits non-zero)
        self.dead_jobs: list[JobRecord] = []  # those jobs, as recorded: the API's caller sees them
        self.ended: Counter[JobState] = Counter()  # attempts recorded in this run, by outcome
        self.pause_reason = ""  # the outage behind the pause, for STATUS

    def recover(self, now: float) -> None:
        """Start-up after any stop: jobs that were running run again, or end dead when
        they have used all their attempts (they keep taking the process down)."""
        rec = self.ledger.recover(self.config.retry.max_attempts, self.clock.wall(now))
        if rec.resumed or rec.dead:
            log.warning(
                "jobs_recovered",
                resumed=rec.resumed,
                dead=rec.dead,
                reason="jobs were running when the service last stopped",
            )
        self.ended_dead += len(rec.dead_jobs)
        self.dead_jobs.extend(rec.dead_jobs)
        for job in rec.dead_jobs:  # one entry each, like any other job that ends dead
            self.metrics.job_ended(job.job, JobState.DEAD, None, None)
            log.error(
                "job_dead",
                job_id=job.id,
                file=job.path,
                job=job.job,
                attempt=job.attempts,
                state=job.state.value,
                error=job.error,
            )

    def busy(self) -> bool:
        return bool(self._active)

    def active_claims(self) -> list[Claim]:
        return [claim for claim, _ in self._active.values()]

    def start(self, claim: Claim, now: float) -> None:
        rec = claim.record
        jlog = log.bind(job_id=rec.id, file=rec.path, job=rec.job, attempt=rec.attempts)
        try:
            refused = refusal(rec.path, follow_symlinks=self._follows.get(rec.root, False))
            st = os.stat(rec.path) if refused is None else None
        except FileNotFoundError:
            return self._record(
                claim,
                Decision(JobState.SKIPPED, "skipped: the file vanished before it was processed"),
                jlog,
                now,
            )
        except (OSError, ValueError) as exc:  # unreadable directory, a name too long, ...
            return self._record(
                claim,
                Decision(
                    JobState.DEAD,
                    f"cannot look at the file: {describe(exc)}. Fix the cause, then run:"
                    f" dpypeline retry {rec.id}",
                ),
                jlog,
                now,
            )
        if refused is not None or st is None:
            return self._record(claim, Decision(JobState.SKIPPED, f"skipped: {refused}"), jlog, now)
        if (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns):
            return self._record(claim, self._changed(claim, st, now), jlog, now)
        job = self.jobs.get(rec.job)
        if job is None:
            return self._record(
                claim,
                Decision(JobState.SKIPPED, f"skipped: job '{rec.job}' is no longer in the config"),
                jlog,
                now,
            )
        context = JobContext(
            job_id=rec.id,
            attempt=rec.attempts,
            path=rec.path,
            relpath=os.path.relpath(rec.path, rec.root),
            root=rec.root,
            job=rec.job,
            log=jlog,
            objectstores=self.config.objectstores,
        )
        self._active[rec.id] = (claim, jlog)
        waited = self.clock.wall(now) - rec.created
        self.metrics.job_started(rec.job, rec.size, rec.attempts, waited)
        jlog.info("job_started")
        self.executor.submit(
            rec.id, JobCall(job, rec.path, context), self.config.retry.job_timeout, now
        )
        return None

    def _changed(self, claim: Claim, st: os.stat_result, now: float) -> Decision:
        """The file changed since its job was queued. A version the ledger knows has its
        own job: this one is skipped. An unknown one is still settling; once it settles it
        takes this job's place (:func:`dpypeline.ordering.takeover`), so the job waits for
        it, as after a transient failure, and keeps holding the later files of its resource
        meanwhile."""
        rec = claim.record
        version = FileVersion(rec.path, st.st_size, st.st_mtime_ns)
        if not self.ledger.unknown([version], [rec.job]):
            return Decision(
                JobState.SKIPPED,
                "skipped: superseded by a newer version of the file"
                f" (size {st.st_size}), which has its own job",
            )
        waiting = TransientError(
            f"{rec.path} changed since this job was queued (size {rec.size}, now"
            f" {st.st_size}); the new version takes this job's place once it has settled"
        )
        return decide(waiting, claim, self.config.retry, self.clock.wall(now))

    def next_retry(self, now: float, stepped: float = 0.0) -> float | None:
        """When (monotonic) the next backoff ends. The ledger stores backoff ends on the
        wall clock, to survive a restart: a step of that clock (``stepped``) moves them with
        it, so each retry still waits what it had left, and none waits longer than the
        largest backoff (a step the service did not see, while it was down)."""
        wall, longest = self.clock.wall(now), self.config.retry.backoff.max
        if stepped:
            log.warning(
                "clock_stepped",
                seconds=round(stepped, 1),
                reason="the wall clock was stepped; job timeouts, settle times and backoffs"
                " keep real time, and the stored backoff ends move with the clock",
            )
        at = self.ledger.next_retry_at()
        if stepped or (at is not None and at > wall + longest):
            self.ledger.retime_retries(wall, longest, stepped)
            at = self.ledger.next_retry_at()
        return None if at is None else self.clock.monotonic(at)

    def _gate(self, rec: JobRecord) -> int | None:
        """The job ``rec`` must wait behind (an earlier job of its ordered resource that
        has not committed and is not running), or None: it may start."""
        resource = self.ordered.get(rec.job)
        if resource is None:
            return None
        hold = hold_for(rec.id, self.ledger.ahead(rec.id, self._writers[resource]))
        if hold is None:
            return None
        level = "warning" if hold.needs_operator else "info"
        getattr(log, level)(
            "job_held",
            job_id=rec.id,
            file=rec.path,
            job=rec.job,
            store=resource,
            behind=hold.behind,
            behind_state=hold.behind_state,
            state=JobState.QUEUED.value,
            reason=hold.reason,
        )
        return hold.behind

    def collect(self, now: float) -> int:
        """Record every finished job; returns how many finished."""
        finished = self.executor.completed()
        for f in finished:
            self._finish(f, now)
        return len(finished)

    def _finish(self, f: Finished, now: float) -> None:
        claim, jlog = self._active.pop(f.job_id)
        if isinstance(f.error, Unavailable):
            return self._pause(claim, f.error, jlog, now)
        if isinstance(f.error, Held):
            return self._park(claim, f.error, jlog, now)
        self._outages = 0
        self.metrics.outage_over()
        if f.error is None:
            decision = Decision(JobState.DONE)
        else:
            decision = decide(f.error, claim, self.config.retry, self.clock.wall(now))
        self._record(claim, decision, jlog, now, duration=f.duration, exc=f.error)
        return None

    def _pause(self, claim: Claim, exc: Unavailable, jlog: Any, now: float) -> None:
        """An outage is not the file's fault: the job goes back to the head of the queue
        without spending an attempt, and no job starts until the pause is over. Pauses grow
        like the retry backoff while the outage lasts, so an outage of any length costs no
        attempts and no hot loop."""
        self._outages += 1
        wait = backoff(self._outages, self.config.retry)
        self.paused_until = now + wait
        self.pause_reason = _short(str(exc))
        self.metrics.outage_began(str(exc))
        self.ledger.release(claim, self.clock.wall(now))
        jlog.warning(
            "service_paused",
            state=JobState.QUEUED.value,
            error=describe(exc),
            retry_in=round(wait, 1),
            outages=self._outages,
            action="the job waits at the head of the queue; nothing to do if the"
            " service comes back",
        )

    def _park(self, claim: Claim, held: Held, jlog: Any, now: float) -> None:
        """Withdrawn before its commit: an earlier job of the same ordered resource failed.
        Back to the queue without spending an attempt, held behind that job."""
        self.ledger.park(claim, held.behind, self.clock.wall(now))
        jlog.info(
            "job_held",
            store=self.ordered.get(claim.record.job),
            behind=held.behind,
            state=JobState.QUEUED.value,
            reason=held.reason,
        )

    def abandon_stuck(self, job_id: int, now: float) -> None:
        """A job that ignored its timeout: record the attempt as failed (its thread cannot
        be reclaimed; the service restarts after this)."""
        claim, jlog = self._active.pop(job_id)
        decision = decide(JobTimeout(), claim, self.config.retry, self.clock.wall(now))
        self._record(claim, decision, jlog, now)

    def release_all(self, now: float) -> None:
        """A stop that cannot wait: running jobs go back to the head of the queue."""
        for job_id in list(self._active):
            claim, jlog = self._active.pop(job_id)
            self.ledger.release(claim, self.clock.wall(now))
            jlog.warning(
                "job_released",
                state=JobState.QUEUED.value,
                reason="the service was stopped during the job; it will run again",
            )

    def _record(
        self,
        claim: Claim,
        d: Decision,
        jlog: Any,
        now: float,
        *,
        duration: float | None = None,
        exc: BaseException | None = None,
    ) -> None:
        wall = self.clock.wall(now)
        self.ledger.finish(claim, d.state, wall, error=d.error, not_before=d.not_before)
        self.ended[d.state] += 1
        self.metrics.job_ended(claim.record.job, d.state, duration, exc)
        if d.state is JobState.DEAD:
            self.ended_dead += 1
            self.dead_jobs.append(
                replace(claim.record, state=JobState.DEAD, error=d.error, finished=wall)
            )
        fields: dict[str, Any] = {"state": d.state.value}
        if duration is not None:
            fields["duration"] = round(duration, 4)
        if d.error:
            fields["error"] = d.error
        if d.not_before is not None:
            fields["retry_in"] = round(d.not_before - wall, 1)
        level = {
            JobState.DONE: "info",
            JobState.RETRYING: "warning",
            JobState.SKIPPED: "warning",
        }.get(d.state, "error")
        if exc is not None and d.state is JobState.DEAD:
            fields["exc_info"] = exc
        getattr(jlog, level)(f"job_{d.state.value}", **fields)
        if d.state is JobState.DEAD and claim.record.job in self.ordered:
            rid = claim.record.id
            if held := sum(h.behind == rid for h in self.ledger.held()):
                jlog.warning(
                    "store_held",
                    store=self.ordered[claim.record.job],
                    held=held,
                    reason=behind_dead(rid, held),
                )
