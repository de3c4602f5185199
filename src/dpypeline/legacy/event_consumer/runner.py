"""What every consumer does on ``run()``: the service on the Akita's directory, running the
job producer's jobs, with the ledger in ``CACHE_DIR`` (``.dpypeline`` in the working
directory when unset). Files already there and files that arrive are each done exactly
once, and a second run of the same script repeats nothing. Events are logged through the
script's own ``logging`` set-up, as the original's were."""

from __future__ import annotations

from typing import Any

from dpypeline.api import Pipeline
from dpypeline.errors import ConfigError, Replaced
from dpypeline.legacy.cache_state import report_carried
from dpypeline.legacy.dead import report_dead
from dpypeline.legacy.etl_pipeline.basic_pipeline import BasicPipeline
from dpypeline.legacy.etl_pipeline.core import Job, Task
from dpypeline.legacy.watched import watch_entry
from dpypeline.observability.logs import into_host_logging
from dpypeline.pipeline import Job as EngineJob


def akita_of(queue: Any) -> Any:
    """The Akita a consumer serves: the one that was given this ``queue``."""
    akita = getattr(queue, "akita", None)
    if akita is None:
        raise Replaced(
            "an event consumer takes `queue=akita.queue`, the queue of an Akita made with"
            " get_akita_dependencies: file events now go through the durable ledger in"
            " CACHE_DIR, not through a queue of its own"
        )
    return akita


def engine_jobs(job_producer: Any) -> list[EngineJob]:
    """The service's jobs for a job producer. A ``BasicPipeline`` (or ``ThreadPipeline``)
    gives its jobs, each run and recorded on its own; any other producer, one job named
    after its class that calls its ``produce_jobs(event)`` on each file, as the original's
    consumers did."""
    if isinstance(job_producer, BasicPipeline) and (
        type(job_producer).produce_jobs is BasicPipeline.produce_jobs
    ):
        jobs: list[EngineJob] = list(job_producer.jobs)
        if not jobs:
            raise ConfigError("the pipeline has no jobs: add one with add_job(Job(...)) first")
        return jobs
    produce = getattr(job_producer, "produce_jobs", None)
    if not callable(produce):
        raise ConfigError(
            f"job_producer {job_producer!r} has no produce_jobs(event): give a BasicPipeline"
            " or an ETLPipeline subclass"
        )
    return [Job(name=type(job_producer).__name__, tasks=[Task(function=produce)])]


def run_jobs(
    akita: Any, job_producer: Any, *, dask_client: Any = None, workers_per_event: int = 1
) -> int:
    """Run the service until every file is done (``monitor=False``) or until SIGTERM,
    SIGINT or ``akita.stop()`` (``monitor=True``). Returns the exit code of ``dpypeline
    run``: 0, or 3 when a job of a run that stops by itself ended dead."""
    jobs = engine_jobs(job_producer)
    if not akita.running:
        akita.run()
    sections: dict[str, Any] = {"monitor": akita.monitor}
    if dask_client is not None:
        sections["executor"] = {"kind": "dask", "workers_per_event": workers_per_event}
    pipeline = Pipeline(watch=[watch_entry(akita.watch(), akita)], jobs=jobs, **sections)
    into_host_logging()
    report_carried(pipeline.config)
    akita.service = pipeline
    try:
        result = pipeline.run(dask_client=dask_client)
    finally:
        akita.service = None
    return report_dead(pipeline.config, result, once=not akita.monitor)
