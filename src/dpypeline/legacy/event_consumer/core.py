"""``EventConsumer``: the base of the original's consumers, which took events from the
queue and gave each to the job producer. Here ``run()`` starts the service on the
``Akita`` whose queue the consumer was given (see ``runner``)."""

from __future__ import annotations

from threading import Thread
from typing import Any, Protocol

from dpypeline.legacy.event_consumer.runner import akita_of, run_jobs


class JobProducer(Protocol):
    def produce_jobs(self, event: Any) -> Any: ...


class Queue(Protocol):
    @property
    def queue_list(self) -> list[Any]: ...

    @property
    def sentinel(self) -> Any: ...

    def dequeue(self) -> Any: ...

    def peek(self) -> Any: ...

    def get_queue_size(self) -> int: ...

    def enqueue(self, event: Any) -> bool: ...

    def remove(self, event: Any) -> bool: ...


class EventConsumer:
    """``worker`` is not used: the service runs in the thread that calls ``run()``."""

    def __init__(
        self, queue: Queue, job_producer: JobProducer, worker: Thread | None = None
    ) -> None:
        self._queue = queue
        self._job_producer = job_producer
        self._worker = worker
        self.akita = akita_of(queue)

    def _run_options(self) -> dict[str, Any]:
        return {}

    def run(self, daemon: bool = False) -> int:
        """Blocks while the service runs, as the original's joined its worker thread:
        until every file is done (``monitor=False``), or SIGTERM/SIGINT or ``akita.stop()``.
        Returns the exit code ``dpypeline run --once`` would: 0, or 3 when jobs are dead."""
        return run_jobs(self.akita, self._job_producer, **self._run_options())


__all__ = ["EventConsumer", "JobProducer", "Queue"]
