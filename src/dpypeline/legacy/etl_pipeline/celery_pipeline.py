"""The original's Celery pipeline is not carried: jobs run in parallel on Dask instead."""

from __future__ import annotations

from typing import Any

from dpypeline.errors import Replaced


class CeleryPipeline:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise Replaced(
            "the Celery pipeline is replaced by Dask: give a BasicPipeline to"
            " ConsumerParallel(cluster_client=Client(...)), or set `executor: {kind: dask}`"
            " in a pipeline config"
        )


__all__ = ["CeleryPipeline"]
