"""``BasicPipeline``: the jobs each new file goes through. It only holds them; the event
consumer given it as ``job_producer`` runs them on the service."""

from __future__ import annotations

from collections.abc import Iterable

from dpypeline.pipeline import Job


class BasicPipeline:
    def __init__(self, jobs: Iterable[Job] | None = None) -> None:
        self.jobs = list(jobs or ())

    def add_job(self, job: Job) -> None:
        self.jobs.append(job)


__all__ = ["BasicPipeline"]
