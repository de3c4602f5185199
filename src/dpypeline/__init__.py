"""dpypeline: a durable ingest service that runs a pipeline exactly once in effect on
every complete new file."""

from __future__ import annotations

from dpypeline.api import Pipeline, RunResult
from dpypeline.pipeline import Job, JobContext, LocalPath, Task

__all__ = ["Job", "JobContext", "LocalPath", "Pipeline", "RunResult", "Task"]
