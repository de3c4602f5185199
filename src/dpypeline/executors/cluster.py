"""The Dask cluster the dask executor runs on: which class builds it, with what defaults,
how it is sized, and the worker plugins that make a worker fit to run dpypeline's tasks.

``executor.cluster.class`` names any cluster class (a dotted path, or an alias such as
``SLURMCluster``), made with ``options`` on top of dpypeline's defaults for a
``LocalCluster`` and sized by ``scale`` (``{jobs: 4}``, ``{n: 8}``; ``{minimum: 0,
maximum: 10}`` makes it adaptive).
"""

from __future__ import annotations

from typing import Any

from distributed import WorkerPlugin

from dpypeline.config import SCALE_ADAPTIVE, ClusterConfig
from dpypeline.errors import ConfigError
from dpypeline.taskpath import make_importable
from dpypeline.trust import import_checked

CLASS_ALIASES = {
    "LocalCluster": "distributed.LocalCluster",
    "dask.distributed.LocalCluster": "distributed.LocalCluster",
    "SLURMCluster": "dask_jobqueue.SLURMCluster",
    "PBSCluster": "dask_jobqueue.PBSCluster",
}
LOCAL_DEFAULTS: dict[str, Any] = {
    "processes": True,  # tasks hold the GIL (decoding, cleaning): processes scale, threads don't
    "threads_per_worker": 1,  # one job per worker process; slots count workers
    "dashboard_address": ":0",  # any free port: two services on one host must not clash
}


class TaskPath(WorkerPlugin):
    """A Dask worker plugin that puts the config's directory on the worker's ``sys.path``,
    as the service does for itself, so task modules kept next to the config import there."""

    name = "dpypeline-task-path"

    def __init__(self, dirs: list[str]) -> None:
        self.dirs = dirs

    def setup(self, worker: Any) -> None:
        make_importable(self.dirs)


class LogSetup(WorkerPlugin):
    """A Dask worker plugin that configures the worker's logging as the service's
    (``logs.settings()``): the tasks' events and the worker's own lines come out in the
    service's format, with its level and its secrets blanked out, not in a second format."""

    name = "dpypeline-logs"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def setup(self, worker: Any) -> None:
        from dpypeline import logs

        if self.settings:
            logs.configure(**self.settings)


class CloseClients(WorkerPlugin):
    """Closes a worker's kept S3 clients when the worker stops, as the service does for its
    own (an HTTP session left open at exit is an "Unclosed client session" error)."""

    name = "dpypeline-close-clients"

    def teardown(self, worker: Any) -> None:
        from dpypeline.objectstore import close_clients

        close_clients()


def cluster_class(name: str) -> Any:
    """The cluster class ``executor.cluster.class`` names (a dotted path or an alias)."""
    target = CLASS_ALIASES.get(name, name)
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(import_checked(module_name, "module of the cluster class"), attr)
    except (ImportError, AttributeError, ValueError, ConfigError) as exc:
        raise ConfigError(f"executor.cluster.class: cannot import {name!r}: {exc}") from None


def build_cluster(cc: ClusterConfig) -> Any:
    """The cluster ``cluster.class`` names, made with ``cluster.options`` (for a
    LocalCluster on top of dpypeline's defaults: single-threaded worker processes)."""
    cls = cluster_class(cc.class_)
    options = dict(cc.options)
    if CLASS_ALIASES.get(cc.class_, cc.class_) == "distributed.LocalCluster":
        options = {**LOCAL_DEFAULTS, **options}
    return cls(**options)


def scale(cluster: Any, spec: dict[str, Any]) -> bool:
    """Size the cluster; True if it is adaptive (``minimum``/``maximum``)."""
    if set(SCALE_ADAPTIVE) & spec.keys():
        cluster.adapt(**spec)
        return True
    cluster.scale(**spec)
    return False
