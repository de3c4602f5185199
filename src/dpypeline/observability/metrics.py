"""Prometheus metrics: what the service is doing, for Grafana and alert rules.

Two kinds, read two ways. What the ledger holds (jobs by state, the oldest waiting job,
held jobs) is read when Prometheus scrapes, by :class:`LedgerCollector` through a
connection of its own: ``/metrics`` and ``dpypeline status --json`` run the same ledger
queries, so they agree, and a scrape only reads (WAL mode: it never waits for the loop's
writes, nor they for it). What *happens* (a job ends, a file is seen, the kernel drops
events) is counted where it happens, by one-line calls on :class:`Metrics` from the worker,
intake and the loop.

Each service has its own registry (never prometheus-client's global one) and, when
``metrics.listen`` is set, an endpoint on a thread of its own (``metrics_endpoint``), so a
scrape is answered while a job runs, and no client, however idle or slow, costs a thread.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Sequence
from importlib.metadata import version
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dpypeline.config.model import PipelineConfig, listen_address
from dpypeline.errors import ConfigError
from dpypeline.jobstate import JobState
from dpypeline.observability.logs import get_logger
from dpypeline.observability.metrics_endpoint import MetricsEndpoint
from dpypeline.state.ledger import Ledger

OUTCOMES = (JobState.DONE, JobState.RETRYING, JobState.DEAD, JobState.SKIPPED)
COMPONENTS = ("watch", "job_timeout", "executor")  # what a health check looks at
SOURCES = ("watch", "scan")  # how the service finds files (`dpypeline enqueue` is another process)
LEDGER_SOURCES = (*SOURCES, "cli")  # a job's source in the ledger
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))
BYTE_BUCKETS = (*(float(2**n) for n in range(10, 41, 3)), float("inf"))  # 1 KiB .. 1 TiB
JOB_LABEL = "pipeline_job"  # the pipeline job a series is of (config `jobs[].name`)
LATENCY_BUCKETS = (0.1, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, float("inf"))

log = get_logger("dpypeline.metrics")


def error_class(exc: BaseException | None) -> str:
    """The label a failure is counted under: its exception's class (``none`` without one,
    e.g. a job found dead at recovery)."""
    return type(exc).__name__ if exc is not None else "none"


class LedgerCollector(Collector):
    """Gauges of the ledger's state, read at scrape time through a read connection."""

    def __init__(self, cache_dir: Path, job_names: Sequence[str]) -> None:
        self.cache_dir, self.job_names = cache_dir, list(job_names)
        self._ledger: Ledger | None = None
        self._lock = threading.Lock()  # scrapes may come in parallel; one connection

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._ledger is None:
                self._ledger = Ledger(self.cache_dir)
            tally = self._ledger.tally()
            oldest = self._ledger.oldest_waiting()
            held = len(self._ledger.held())
        counts = {(job, s.value): 0 for job in self.job_names for s in JobState}
        sources = dict.fromkeys(LEDGER_SOURCES, 0)
        for (job, state, source), n in tally.items():
            counts[job, state] = counts.get((job, state), 0) + n
            sources[source] = sources.get(source, 0) + n
        age = max(time.time() - oldest.created, 0.0) if oldest is not None else 0.0
        jobs, by_source, lag, holds = self._families()
        for (job, state), n in sorted(counts.items()):
            jobs.add_metric([job, state], n)
        for source, n in sorted(sources.items()):
            by_source.add_metric([source], n)
        lag.add_metric([], age)
        holds.add_metric([], held)
        return [jobs, by_source, lag, holds]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "dpypeline_jobs",
                "Jobs in the ledger, by pipeline job and state",
                labels=[JOB_LABEL, "state"],
            ),
            GaugeMetricFamily(
                "dpypeline_ledger_jobs_by_source",
                "Jobs in the ledger by how their file came in (cli: `dpypeline enqueue`)",
                labels=["source"],
            ),
            GaugeMetricFamily(
                "dpypeline_oldest_waiting_seconds",
                "Age of the oldest queued or retrying job (0: none waits): the lag",
            ),
            GaugeMetricFamily(
                "dpypeline_jobs_held",
                "Queued jobs held behind an earlier, unwritten file of their append store",
            ),
        ]

    def close(self) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None


class Metrics:
    """The service's registry, its event counters, and (optionally) its HTTP endpoint."""

    def __init__(self, job_names: Sequence[str] = (), objectstores: Sequence[str] = ()) -> None:
        self.job_names, self.objectstores = list(job_names), list(objectstores)
        self.registry = r = CollectorRegistry()
        # Not "job": Prometheus sets that label to the scrape job's name (and moves ours to
        # "exported_job"), as it does "instance".
        job = [JOB_LABEL]
        self.finished = Counter(
            "dpypeline_jobs_finished",
            "Job attempts ended, by outcome",
            [*job, "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "dpypeline_job_duration_seconds",
            "How long a job's tasks ran",
            job,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "dpypeline_job_retries",
            "Failed attempts to be retried, by error class",
            [*job, "error"],
            registry=r,
        )
        self.dead = Counter(
            "dpypeline_jobs_dead", "Jobs ended dead, by error class", [*job, "error"], registry=r
        )
        self.input_bytes = Histogram(
            "dpypeline_job_input_bytes",
            "Size of the file each started job reads",
            job,
            buckets=BYTE_BUCKETS,
            registry=r,
        )
        self.claim_latency = Histogram(
            "dpypeline_job_claim_latency_seconds",
            "From a file's job entering the queue to its first attempt starting",
            job,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.files_seen = Counter(
            "dpypeline_files_seen",
            "Files noticed: complete by an event (watch), or new to the ledger in a scan (scan)",
            ["source"],
            registry=r,
        )
        self.enqueued = Counter(
            "dpypeline_jobs_enqueued",
            "Jobs the service added to the ledger for settled files",
            ["source"],
            registry=r,
        )
        self.overflows = Counter(
            "dpypeline_inotify_overflows",
            "Kernel event queue overflows (a rescan follows)",
            registry=r,
        )
        self.scans = Counter(
            "dpypeline_scans", "Directory scans requested, by reason", ["reason"], registry=r
        )
        self.healthy = Gauge("dpypeline_healthy", "1 when the last health check passed", registry=r)
        self.component = Gauge(
            "dpypeline_component_healthy",
            "1 when the component passed the last health check",
            ["component"],
            registry=r,
        )
        self.watch_mode = Gauge(
            "dpypeline_watch_mode",
            "1 for the way each watched root is observed",
            ["watch", "mode"],
            registry=r,
        )
        self.outage = Gauge(
            "dpypeline_outage", "1 while jobs wait out an outage of what they write to", registry=r
        )
        self.store_outage = Gauge(
            "dpypeline_objectstore_outage",
            "1 while the object store is in an outage",
            ["objectstore"],
            registry=r,
        )
        Info("dpypeline_build", "The running version", registry=r).info(
            {"version": version("dpypeline"), "python": sys.version.split()[0]}
        )
        for name in self.job_names:  # every series exists from the start, at zero
            for outcome in OUTCOMES:
                self.finished.labels(name, outcome.value)
            self.duration.labels(name)
        for source in SOURCES:
            self.files_seen.labels(source)
            self.enqueued.labels(source)
        self.healthy.set(1)
        for component in COMPONENTS:
            self.component.labels(component).set(1)
        self.outage_over()
        self._collector: LedgerCollector | None = None
        self._endpoint: MetricsEndpoint | None = None

    # -- the endpoint ---------------------------------------------------------------------

    def serve(self, config: PipelineConfig) -> None:
        """Start the endpoint if ``metrics.listen`` is set. A port that cannot be had is a
        ConfigError (exit 2) naming the field and its line; a thread that cannot be had is
        logged, and the service runs on without the endpoint."""
        listen = config.metrics.listen
        if listen is None:
            return
        host, port = listen_address(listen)
        self._collector = LedgerCollector(config.cache_dir, self.job_names)
        self.registry.register(self._collector)
        try:
            self._endpoint = MetricsEndpoint(self.registry, host, port)
        except OSError as exc:
            self.close()
            raise ConfigError(
                f"{config.where('metrics', 'listen')}: cannot serve metrics on {listen}:"
                f" {exc.strerror or exc} (is another process using the port? choose another)"
            ) from None
        try:
            self._endpoint.start()
        except RuntimeError as exc:  # no thread to be had: the jobs matter more
            self.close()
            log.error(
                "metrics_endpoint_failed",
                listen=listen,
                error=str(exc),
                action="the service runs on without /metrics; raise its task limit"
                " (TasksMax=) and restart it to have them again",
            )

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the endpoint listens (the real port when the config said 0)."""
        return self._endpoint.address if self._endpoint is not None else None

    def close(self) -> None:
        """Idempotent: stop the endpoint and close its read connection."""
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector.close()
            self._collector = None

    # -- events ---------------------------------------------------------------------------

    def job_started(self, job: str, size: int, attempt: int, queued_for: float) -> None:
        self.input_bytes.labels(job).observe(size)
        if attempt == 1:
            self.claim_latency.labels(job).observe(max(queued_for, 0.0))

    def job_ended(
        self, job: str, state: JobState, duration: float | None, exc: BaseException | None
    ) -> None:
        self.finished.labels(job, state.value).inc()
        if duration is not None:
            self.duration.labels(job).observe(duration)
        if state is JobState.RETRYING:
            self.retries.labels(job, error_class(exc)).inc()
        elif state is JobState.DEAD:
            self.dead.labels(job, error_class(exc)).inc()

    def outage_began(self, reason: str) -> None:
        """An outage; the object stores it names (the errors name them) are marked down."""
        self.outage.set(1)
        for store in self.objectstores:
            self.store_outage.labels(store).set(int(f"'{store}'" in reason))

    def outage_over(self) -> None:
        self.outage.set(0)
        for store in self.objectstores:
            self.store_outage.labels(store).set(0)

    def health(self, watching: list[str], overdue: bool, executor: list[str]) -> None:
        failing = {"watch": bool(watching), "job_timeout": overdue, "executor": bool(executor)}
        for component, failed in failing.items():
            self.component.labels(component).set(0 if failed else 1)
        self.healthy.set(0 if any(failing.values()) else 1)

    def watches(self, modes: Iterable[tuple[str, str]]) -> None:
        """(root, mode) of every watch, after start-up and each health check."""
        for root, mode in modes:
            for known in ("inotify", "poll"):
                self.watch_mode.labels(root, known).set(int(known == mode))
