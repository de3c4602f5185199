"""``ThreadPipeline``: as in the original, a ``BasicPipeline`` by another name."""

from __future__ import annotations

from dpypeline.legacy.etl_pipeline.basic_pipeline import BasicPipeline


class ThreadPipeline(BasicPipeline):
    pass


__all__ = ["ThreadPipeline"]
