"""``ThreadPipeline``: as in the original, another name for ``BasicPipeline``."""

from __future__ import annotations

from dpypeline.legacy.etl_pipeline.basic_pipeline import BasicPipeline

ThreadPipeline = BasicPipeline

__all__ = ["ThreadPipeline"]
