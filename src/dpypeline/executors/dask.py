"""The Dask executor: jobs run on the workers of a Dask cluster, the service loop stays here.

The cluster is a ``LocalCluster`` on this machine by default, an existing scheduler when
``executor.address`` is set, or any cluster class named in ``executor.cluster``
(:mod:`dpypeline.executors.cluster`); given a ``Client`` of the caller's own, it runs on
that client's cluster and leaves both open when it closes. This module and that one are
the only ones that import ``distributed``. Workers only run tasks; the ledger stays with the
service, which records every attempt before it is submitted and every outcome as it
arrives.

Slots. At most ``workers // workers_per_event`` jobs are in flight, counted afresh as
workers come and go (batch jobs start late and die at walltime; adaptive clusters grow
and shrink). A finished future sets the loop's wake event from the client's callback; the
loop records the outcome before the slot is used again.

Failures. The scheduler this executor starts marks a task erred the first time a worker
dies under it (``allowed-failures: 0``), so a killed worker, a batch job past its walltime
or ``scancel`` costs the job one attempt, which is retried with backoff like any other
transient error. A job past ``retry.job_timeout`` has its future cancelled and the worker
that ran it restarted (a thread cannot be stopped any other way); the attempt counts as a
timeout.

Commits: compute in parallel, commit in order. A job that commits to a resource (its
first task that declares a commit, :mod:`dpypeline.commits`: a Zarr store, an upload
prefix, a user's database) runs in two stages: *compute* (every task before the commit:
opening, cleaning, encoding) is submitted at once and runs in parallel with others;
*commit* (the committing task and anything after it) is submitted only when the job is
the earliest one in flight for that resource and no other commit to it is running
(:class:`dpypeline.ordering.CommitOrder`). So commits to one resource never
overlap and happen in queue order, exactly as with the serial executor; commits to
different resources and jobs that commit nothing run freely. When a job of an ordered
resource (an append store) fails, the later jobs of that resource in flight are withdrawn
before their commit and reported as ``Held``: they go back to the queue without spending
an attempt, behind it. Time spent computed and waiting for the turn to commit does not
count towards ``job_timeout``. The commit runs where its computed value lies, so the
dataset is not moved. A commit whose future timed out keeps its resource closed to the
next commit until its worker has been restarted, so a write that ignores its
cancellation cannot overlap the next one.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dpypeline.commits import Staged
from dpypeline.config.model import ClusterConfig, ExecutorConfig
from dpypeline.errors import JobTimeout
from dpypeline.executors.cluster import (
    CloseClients,
    LogSetup,
    TaskPath,
    build_cluster,
    scale,
    tls_security,
)
from dpypeline.executors.serial import Finished
from dpypeline.observability.logs import get_logger, quiet_libraries, settings
from dpypeline.ordering import CommitOrder, Held

if TYPE_CHECKING:
    from distributed import Client, Future

log = get_logger("dpypeline.dask")

WORKERS_EVERY = 1.0  # seconds between counts of the cluster's workers
CONNECT_TIMEOUT = 30.0
RESTART_TIMEOUT = 60.0


def run_whole(call: Staged) -> None:
    call()  # the chain's value stays on the worker: only the outcome comes back


def run_compute(call: Staged) -> Any:
    return call.compute()


def run_commit(call: Staged, value: Any) -> None:
    call.commit(value)


@dataclass
class _InFlight:
    job_id: int
    call: Staged
    resource: str | None  # what it commits to: commits to one resource run one at a time
    started: float
    timeout: float | None
    future: Future
    stage: str = "run"  # run | compute | computed | commit
    computed: Future | None = None
    waiting_since: float | None = None  # computed, waiting for its turn to commit


@dataclass
class _Events:
    """Futures that finished, handed from the client's event loop to the service loop."""

    wake: threading.Event
    done: deque[tuple[int, Future]] = field(default_factory=deque)

    def callback(self, job_id: int) -> Callable[[Future], None]:
        def on_done(future: Future) -> None:
            self.done.append((job_id, future))
            self.wake.set()

        return on_done


class DaskExecutor:
    """Jobs on a Dask cluster, at most ``workers // workers_per_event`` at a time."""

    def __init__(
        self,
        wake: threading.Event,
        config: ExecutorConfig,
        task_dirs: list[str] | None = None,
        client: Client | None = None,
    ) -> None:
        self._config = config
        self._given = client  # the caller's: used, never closed
        self._task_dirs = task_dirs or []
        self._events = _Events(wake)
        self._wake = wake
        self._client: Client | None = None
        self._cluster: Any = None
        self._adaptive = False
        self._workers = 0
        self._counted = 0.0
        self._jobs: dict[int, _InFlight] = {}
        self._commits = CommitOrder()
        self._fenced: dict[str, threading.Event] = {}  # resources waiting for a worker restart
        self._finished: list[Finished] = []
        self._lost = ""
        self._address: str | None = None
        self._dashboard: str | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to the scheduler or build the cluster; closes what it made if it fails."""
        import dask
        from distributed import Client

        quiet_libraries()  # importing distributed set its loggers to INFO
        cfg = self._config
        try:
            if self._given is not None:
                self._client = self._given
            elif cfg.address:
                security = tls_security(cfg.tls) if cfg.tls is not None else None
                self._client = Client(cfg.address, timeout=CONNECT_TIMEOUT, security=security)
            else:
                cc = cfg.cluster or ClusterConfig()
                with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                    self._cluster = build_cluster(cc, cfg.tls)
                    if cc.scale:
                        self._adaptive = scale(self._cluster, cc.scale)
                self._client = Client(self._cluster, timeout=CONNECT_TIMEOUT)
            for plugin in (TaskPath(self._task_dirs), CloseClients(), LogSetup(settings())):
                self._client.register_plugin(plugin, name=plugin.name)
        except BaseException:
            self.close()
            raise
        # asked once: both are calls to the scheduler, which could hang once it is gone
        self._address = self._client.scheduler.address
        self._dashboard = self._client.dashboard_link or None  # "": none
        self._count_workers(time.monotonic(), force=True)
        log.info("cluster_ready", **self.describe())
        if not str(self._address).startswith("tls://"):
            action = (
                "any client that reaches the scheduler runs code on its workers: set executor.tls"
            )
            log.warning("cluster_unauthenticated", address=self._address, action=action)

    def close(self) -> None:
        """Cancel what runs, close the client and the cluster this executor started (a
        batch cluster cancels its jobs); a caller's client only loses this executor's
        futures, which the scheduler then drops. Idempotent."""
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        self._jobs.clear()
        if client is not None and client is not self._given:
            try:
                client.close(timeout=10)
            except Exception as exc:  # noqa: BLE001 - closing must go on to the cluster
                log.warning("cluster_close_failed", part="client", error=str(exc))
        if cluster is not None:
            try:
                cluster.close(timeout=30)
            except Exception as exc:  # noqa: BLE001 - the service is stopping anyway
                log.warning("cluster_close_failed", part="cluster", error=str(exc))

    def interrupt(self) -> None:
        """Forget every job now (a second stop signal; the worker has put them back). The
        close that follows disconnects the client, and the scheduler drops its tasks: no
        call to a scheduler that may be gone is made here."""
        self._jobs.clear()
        self._commits.clear()

    # -- slots ----------------------------------------------------------------------------

    def capacity(self) -> int:
        now = time.monotonic()
        self._count_workers(now)
        if self._lost:
            return 0
        slots = self._workers // self._config.workers_per_event
        if self._adaptive and not self._jobs:
            slots = max(slots, 1)  # an adaptive cluster at zero workers grows on demand
        return max(0, slots - len(self._jobs))

    def _count_workers(self, now: float, *, force: bool = False) -> None:
        client = self._client
        if client is None or (not force and now - self._counted < WORKERS_EVERY):
            return
        self._counted = now
        if client.status != "running":
            self._lost = f"the Dask scheduler is unreachable (client {client.status})"
            return
        try:
            info = client.sync(client.scheduler.identity, n_workers=0, callback_timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the scheduler
            self._lost = f"the Dask scheduler does not answer: {type(exc).__name__}: {exc}"
            return
        self._lost = ""
        workers, per_event = int(info["n_workers"]), self._config.workers_per_event
        if workers != self._workers:
            log.info("cluster_workers", workers=workers, was=self._workers)
            if 0 < workers < per_event:
                log.warning(
                    "cluster_too_small",
                    workers=workers,
                    workers_per_event=per_event,
                    action="no job starts until the cluster has workers_per_event workers",
                )
        self._workers = workers

    def in_flight(self) -> list[int]:
        return list(self._jobs)

    # -- running jobs ---------------------------------------------------------------------

    def submit(self, job_id: int, call: Staged, timeout: float | None, now: float) -> None:
        assert self._client is not None
        commit = call.commits_to
        if commit is None:
            future = self._client.submit(run_whole, call, pure=False, key=_key(job_id, "run"))
            job = _InFlight(job_id, call, None, now, timeout, future)
        else:
            future = self._client.submit(run_compute, call, pure=False, key=_key(job_id, "compute"))
            job = _InFlight(job_id, call, commit.resource, now, timeout, future, stage="compute")
            self._commits.add(job_id, commit.resource, ordered=commit.ordered)
        self._jobs[job_id] = job
        future.add_done_callback(self._events.callback(job_id))

    def completed(self) -> list[Finished]:
        done = self._events.done
        while done:
            job_id, future = done.popleft()
            job = self._jobs.get(job_id)
            if job is None or job.future is not future:
                continue  # cancelled meanwhile: already reported
            self._on_done(job, future)
        finished, self._finished = self._finished, []
        return finished

    def _on_done(self, job: _InFlight, future: Future) -> None:
        if future.status == "finished" and job.stage == "compute":
            job.stage, job.computed = "computed", future
            job.waiting_since = time.monotonic()
            self._commits.computed(job.job_id)
            self._next_commit(job.resource)
            return
        if future.status == "finished":
            self._finish(job, Finished(job.job_id))
            return
        error: BaseException
        if future.status == "error":
            error = future.exception() or RuntimeError("the task failed without an exception")
        else:
            error = RuntimeError(f"the task was cancelled on the cluster ({future.status})")
        self._finish(job, Finished(job.job_id, error=error))

    def _finish(self, job: _InFlight, result: Finished) -> None:
        result.duration = time.monotonic() - job.started
        self._jobs.pop(job.job_id, None)
        self._finished.append(result)
        if job.resource is not None:
            failed = result.error is not None
            for job_id in self._commits.finished(job.job_id, failed=failed):
                self._withdraw(self._jobs.pop(job_id), behind=job.job_id)
            self._next_commit(job.resource)
        self._wake.set()

    def _withdraw(self, job: _InFlight, behind: int) -> None:
        """A later job of an ordered resource whose earlier job failed: dropped before its
        commit (its computed value is released), and reported as held."""
        for future in (job.future, job.computed):
            if future is not None:
                future.release()
        self._finished.append(
            Finished(job.job_id, error=Held(behind), duration=time.monotonic() - job.started)
        )

    def _next_commit(self, resource: str | None) -> None:
        """Start the earliest job's commit to ``resource`` once it is computed and nothing
        else commits there: commits to a resource never overlap and keep queue order."""
        if resource is None or self._client is None:
            return
        fence = self._fenced.get(resource)
        if fence is not None:
            if not fence.is_set():
                return
            del self._fenced[resource]
        job_id = self._commits.next_commit(resource)
        if job_id is None:
            return
        head = self._jobs[job_id]
        head.stage = "commit"
        if head.waiting_since is not None:  # waiting for its turn is not running late
            head.started += time.monotonic() - head.waiting_since
            head.waiting_since = None
        head.future = self._client.submit(
            run_commit, head.call, head.computed, pure=False, key=_key(head.job_id, "commit")
        )
        head.future.add_done_callback(self._events.callback(head.job_id))

    # -- timeouts -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines = [j.started + (j.timeout or 0.0) for j in self._timed()]
        return min(deadlines, default=None)

    def enforce_timeouts(self, now: float) -> list[int]:
        """Cancel jobs past their timeout and restart the workers that ran them; the
        attempts are reported as timeouts by the next ``completed``. Never stuck."""
        for resource in [r for r, fence in self._fenced.items() if fence.is_set()]:
            self._next_commit(resource)
        late = [j for j in self._timed() if now >= j.started + (j.timeout or 0.0)]
        for job in late:
            futures = [f for f in (job.future, job.computed) if f is not None]
            fence = threading.Event()
            if job.stage == "commit" and job.resource is not None:
                self._fenced[job.resource] = fence
            threading.Thread(
                target=self._restart_workers_of,
                args=(futures, fence),
                name=f"dpypeline-dask-timeout-{job.job_id}",
                daemon=True,
            ).start()
            self._finish(job, Finished(job.job_id, error=JobTimeout()))
        return []

    def _timed(self) -> list[_InFlight]:
        """Jobs whose clock runs: not those computed and waiting for their turn to commit."""
        return [j for j in self._jobs.values() if j.timeout is not None and j.stage != "computed"]

    def _restart_workers_of(self, futures: list[Future], fence: threading.Event) -> None:
        """A cancelled task goes on running in its worker's thread; only a restart of the
        worker process gets that thread back."""
        client = self._client
        try:
            if client is None:
                return
            keys = {f.key for f in futures}
            processing = client.processing()
            workers = [w for w, ks in processing.items() if keys & set(ks)]
            client.cancel(futures)
            if workers:
                log.warning("workers_restarting", workers=workers, reason="a job timed out")
                client.restart_workers(workers, timeout=RESTART_TIMEOUT, raise_for_error=False)
        except Exception as exc:  # noqa: BLE001 - best effort: the fence opens regardless
            log.warning("workers_restart_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            fence.set()
            self._wake.set()

    def is_overdue(self, now: float) -> bool:
        return False  # a timed-out future is cancelled, never left running

    # -- health and status ----------------------------------------------------------------

    def problems(self) -> list[str]:
        self._count_workers(time.monotonic())
        problems = [self._lost] if self._lost else []
        status = getattr(getattr(self._cluster, "status", None), "name", None)
        if status is not None and status not in ("running", "created"):
            problems.append(f"the Dask cluster is {status}")
        return problems

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "dask",
            "address": self._address,
            "dashboard": self._dashboard,
            "cluster": type(self._cluster).__name__ if self._cluster is not None else None,
            "workers": self._workers,
            "slots": self._workers // self._config.workers_per_event,
            "in_flight": len(self._jobs),
        }


def _key(job_id: int, stage: str) -> str:
    """A task key unique to this attempt (a key the scheduler still holds would return the
    old result), readable on the dashboard."""
    return f"dpypeline-job-{job_id}-{stage}-{uuid.uuid4().hex[:8]}"
