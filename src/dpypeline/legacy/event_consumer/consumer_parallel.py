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
from dpypeline.legacy.event_consumer.core import EventConsumer


class ConsumerParallel(EventConsumer):
    def __init__(
        self, cluster_client: Any, workers_per_event: int = 1, *args: Any, **kwargs: Any
    ) -> None:
        if cluster_client is None:
            raise ConfigError("ConsumerParallel needs cluster_client=, a dask.distributed.Client")
        if workers_per_event < 1:
            raise ConfigError(f"workers_per_event must be at least 1, not {workers_per_event}")
        super().__init__(*args, **kwargs)
        self._client = cluster_client
        self._workers_per_event = workers_per_event

    def _run_options(self) -> dict[str, Any]:
        return {"dask_client": self._client, "workers_per_event": self._workers_per_event}


__all__ = ["ConsumerParallel"]
