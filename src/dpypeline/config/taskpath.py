"""Task modules kept next to the config file, importable wherever tasks run.

A config names its own tasks by dotted path (``mytasks.clean``) and keeps ``mytasks.py``
beside it. The directory is put on ``sys.path`` by :func:`make_importable` alone: in the
service before tasks are imported, and on each Dask worker, which gets the list of
directories from :func:`task_dirs`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from dpypeline.config.model import PipelineConfig

__all__ = ["make_importable", "task_dirs"]


def task_dirs(config: PipelineConfig) -> list[str]:
    """The directories whose modules the config's tasks may import: the config file's own
    (as resolved), none for a config made in code."""
    return [str(Path(config.source).resolve().parent)] if config.source is not None else []


def make_importable(dirs: Sequence[str]) -> None:
    """Put ``dirs`` first on ``sys.path``, in their order, each once however often this
    runs (a worker runs it at every restart)."""
    for d in reversed(dirs):
        if d not in sys.path:
            sys.path.insert(0, d)
