"""What both consumers do on ``run()``: the service on the Akita's directory, running the
job producer's jobs, with the ledger in ``CACHE_DIR`` (``.dpypeline`` in the working
directory when unset). Files already there and files that arrive are each done exactly
once, and a second run of the same script repeats nothing. Events are logged through the
script's own ``logging`` set-up, as the original's were."""

from __future__ import annotations

from typing import Any

from dpypeline.api import Pipeline
from dpypeline.errors import ConfigError, Replaced
from dpypeline.legacy.akita.core import Akita, EventQueue
from dpypeline.legacy.cache_state import report_carried
from dpypeline.logs import into_host_logging


def akita_of(queue: Any, akita: Akita | None) -> Akita:
    """The Akita a consumer serves: ``akita=`` or the one whose ``queue`` it was given."""
    if akita is not None:
        return akita
    if isinstance(queue, EventQueue):
        return queue.akita
    raise Replaced(
        "an event consumer takes `queue=akita.queue` (or `akita=`): file events now go"
        " through the durable ledger in CACHE_DIR, not through a queue of its own"
    )


def run_jobs(
    akita: Akita, job_producer: Any, *, dask_client: Any = None, workers_per_event: int = 1
) -> int:
    """Run the service until every file is done (``monitor=False``) or until SIGTERM or
    SIGINT (``monitor=True``). Returns the exit code of ``dpypeline run``: 0, or 3 when a
    job of a run that stops by itself ended dead."""
    jobs = list(getattr(job_producer, "jobs", None) or ())
    if not jobs:
        raise ConfigError("the pipeline has no jobs: add one with add_job(Job(...)) first")
    if not akita.running:
        akita.run()
    sections: dict[str, Any] = {"monitor": akita.monitor}
    if dask_client is not None:
        sections["executor"] = {"kind": "dask", "workers_per_event": workers_per_event}
    pipeline = Pipeline(watch=[akita.watch()], jobs=jobs, **sections)
    into_host_logging()
    report_carried(pipeline.config)
    return pipeline.run(dask_client=dask_client)
