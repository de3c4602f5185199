"""``ConsumerParallel``: the jobs run as futures on the workers of the user's own
``dask.distributed.Client``, which is left open at the end.

``workers_per_event``: each file's job holds that many of the cluster's workers, so at most
``workers // workers_per_event`` files are in flight at once. A job itself runs on one
worker; the others stay free for the Dask computations its tasks start (an xarray dataset
computed through the same client). Writes to one Zarr store still happen one at a time,
in the order files arrived.
"""

from __future__ import annotations

from typing import Any

from dpypeline.errors import ConfigError
from dpypeline.legacy.akita.core import Akita
from dpypeline.legacy.event_consumer.runner import akita_of, run_jobs


class ConsumerParallel:
    def __init__(
        self,
        cluster_client: Any,
        workers_per_event: int = 1,
        queue: Any = None,
        job_producer: Any = None,
        *,
        akita: Akita | None = None,
    ) -> None:
        if cluster_client is None:
            raise ConfigError("ConsumerParallel needs cluster_client=, a dask.distributed.Client")
        if workers_per_event < 1:
            raise ConfigError(f"workers_per_event must be at least 1, not {workers_per_event}")
        self.cluster_client = cluster_client
        self.workers_per_event = workers_per_event
        self.akita = akita_of(queue, akita)
        self.job_producer = job_producer

    def run(self) -> int:
        """Blocks while the service runs (see ``runner.run_jobs``)."""
        return run_jobs(
            self.akita,
            self.job_producer,
            dask_client=self.cluster_client,
            workers_per_event=self.workers_per_event,
        )


__all__ = ["ConsumerParallel"]
