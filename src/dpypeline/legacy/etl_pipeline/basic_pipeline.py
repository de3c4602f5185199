"""``BasicPipeline``: runs each of its jobs on an event, one after the other. Given to an
event consumer as ``job_producer``, its jobs run on the service, one ledger entry each."""

from __future__ import annotations

from typing import Any

from dpypeline.legacy.etl_pipeline.core import ETLPipeline, Job


class BasicPipeline(ETLPipeline):
    def __init__(self, jobs: list[Job] | None = None) -> None:
        super().__init__(jobs)

    def produce_jobs(self, event: Any) -> list[Any]:
        """Every job's result on *event*, in the order the jobs were added."""
        return [job.run(event) for job in self.jobs]


__all__ = ["BasicPipeline"]
