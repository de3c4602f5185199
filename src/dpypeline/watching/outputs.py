"""Outputs that land where the service takes its input.

A job whose output lies inside a watched tree, where that watch's patterns take it, feeds
the service its own output as new input: every output runs the job again. The service
cannot tell such a file from a new one (except a file a job rewrote in place, see
:mod:`dpypeline.state.ownwrites`), so the outputs a config names are checked instead: each
``LocalPath`` argument of a task (``to_zarr``'s ``store``, or a task of your own that
annotates one) is looked for inside every watch. ``validate`` prints what it finds and the
service logs it at start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from dpypeline.config.model import PipelineConfig
from dpypeline.pipeline import Job, local_path_arguments
from dpypeline.watching.patterns import watch_matcher

# names written inside an output directory: a Zarr store's (v2, v3) and icechunk's
_WRITTEN_INSIDE = (
    "zarr.json",
    ".zgroup",
    ".zarray",
    "c/0/0/0",
    "0.0.0",
    "chunks/0",
    "manifests/0",
    "snapshots/0",
    "refs/branch.main/ref.json",
)


def outputs_inside_watches(config: PipelineConfig, jobs: list[Job]) -> Iterator[str]:
    """One line per task output that a watch would take as input: where, and what to do."""
    for j, job in enumerate(jobs):
        for t, task in enumerate(job.tasks):
            for key, path in local_path_arguments(task).items():
                for w, watch in enumerate(config.watch):
                    root = os.path.realpath(watch.path)
                    target = os.path.realpath(path)
                    if not target.startswith(root + os.sep):
                        continue
                    rel = target[len(root) + 1 :].replace(os.sep, "/")
                    matcher = watch_matcher(watch)
                    probes = [rel, *(f"{rel}/{name}" for name in _WRITTEN_INSIDE)]
                    taken = next((p for p in probes if matcher.matches(p)), None)
                    if taken is None:
                        continue
                    yield (
                        f"{config.where('jobs', j, 'tasks', t, 'with', key)}: {path} is inside"
                        f" watch[{w}] ({root}) and its patterns take what is written there"
                        f" ({taken}): each output would be taken as new input. Write outputs"
                        " outside the watched directory, or add the output to the watch's"
                        " ignore_patterns"
                    )


__all__ = ["outputs_inside_watches"]
