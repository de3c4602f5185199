"""Under ``dpypeline -i``, an ``!ObjectStoreS3`` given to a task reaches it as the original
passed it: an ``ObjectStoreS3`` (an ``s3fs.S3FileSystem``) made from the store's
credentials file, one per store, shared by the tasks it was given to, as the YAML alias
shared it. Task code written for the original (``s3fs_instance.open(...)``,
``.write_file_to_bucket(...)``) runs unchanged.

The built-in tasks are the exception: they take ``objectstore: NAME`` and open the store
themselves (with the service's timeouts and outage handling), so they keep the name.
The config stays plain data throughout (``validate``, ``migrate`` and the ledger see the
name); the objects are put into the imported tasks just before the service starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpypeline.config.model import Loc, PipelineConfig
from dpypeline.legacy.filesystems.object_store import ObjectStoreS3
from dpypeline.pipeline import Job, Task

BUILT_IN = "dpypeline.tasks"


def pass_objects(config: PipelineConfig, jobs: list[Job], objects: Mapping[Loc, str]) -> None:
    """Put in the jobs' tasks, at each location of *objects* (``jobs, J, tasks, T, with,
    KEY, ...``), the store it names in place of its name."""
    stores: dict[str, ObjectStoreS3] = {}
    for loc, name in objects.items():
        if loc[:1] != ("jobs",) or len(loc) < 6:
            continue  # a setup step (!Method create_bucket) is a built-in task
        task = jobs[int(loc[1])].tasks[int(loc[3])]
        if _built_in(task):
            continue
        if name not in stores:
            stores[name] = _store(config, name)
        task.kwargs = _replaced(task.kwargs, loc[5:], stores[name])


def _built_in(task: Task) -> bool:
    module = getattr(task.func, "__module__", "") or ""
    return module == BUILT_IN or module.startswith(BUILT_IN + ".")


def _store(config: PipelineConfig, name: str) -> ObjectStoreS3:
    credentials = config.objectstores[name].credentials
    if credentials is None:
        return ObjectStoreS3(anon=False)
    return ObjectStoreS3(anon=False, store_credentials_json=str(credentials))


def _replaced(container: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of *container* with *value* at *path* (the config's own data is unchanged)."""
    key, rest = path[0], path[1:]
    copy = dict(container) if isinstance(container, dict) else list(container)
    copy[key] = _replaced(copy[key], rest, value) if rest else value
    return copy


__all__ = ["pass_objects"]
