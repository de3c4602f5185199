"""``ConsumerSerial``: the jobs run one file at a time, in the order files arrived."""

from __future__ import annotations

from typing import Any

from dpypeline.legacy.akita.core import Akita
from dpypeline.legacy.event_consumer.runner import akita_of, run_jobs


class ConsumerSerial:
    def __init__(
        self, queue: Any = None, job_producer: Any = None, *, akita: Akita | None = None
    ) -> None:
        self.akita = akita_of(queue, akita)
        self.job_producer = job_producer

    def run(self) -> int:
        """Blocks while the service runs (see ``runner.run_jobs``)."""
        return run_jobs(self.akita, self.job_producer)


__all__ = ["ConsumerSerial"]
