"""The Dask cluster the dask executor runs on: which class builds it, with what defaults,
how it is sized, and the worker plugins that make a worker fit to run dpypeline's tasks.

``executor.cluster.class`` names any cluster class (a dotted path, or an alias such as
``SLURMCluster``), made with ``options`` on top of dpypeline's defaults for a
``LocalCluster`` and sized by ``scale`` (``{jobs: 4}``, ``{n: 8}``; ``{minimum: 0,
maximum: 10}`` makes it adaptive).

Security. A Dask worker runs whatever a client connected to its scheduler sends it, as the
service's user, so nobody else may connect. The ``LocalCluster`` the service starts speaks
only TLS with mutual authentication: a fresh self-signed certificate made for each start and
held in memory (``Security.temporary()``), or the operator's ``executor.tls`` files; its
scheduler and workers listen on loopback, and it has no HTTP server (dashboard) unless
``options.dashboard_address`` asks for one, on loopback unless it names a host. A scheduler
at ``executor.address`` and any other cluster class get the ``executor.tls`` files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from distributed import Nanny, Worker, WorkerPlugin
from distributed.security import Security

from dpypeline.config.model import SCALE_ADAPTIVE, ClusterConfig, TlsConfig
from dpypeline.config.taskpath import make_importable
from dpypeline.config.trust import import_checked
from dpypeline.errors import ConfigError

CLASS_ALIASES = {
    "LocalCluster": "distributed.LocalCluster",
    "dask.distributed.LocalCluster": "distributed.LocalCluster",
    "SLURMCluster": "dask_jobqueue.SLURMCluster",
    "PBSCluster": "dask_jobqueue.PBSCluster",
}
LOCAL_DEFAULTS: dict[str, Any] = {
    "processes": True,  # tasks hold the GIL (decoding, cleaning): processes scale, threads don't
    "threads_per_worker": 1,  # one job per worker process; slots count workers
    "dashboard_address": None,  # no dashboard: any local user could read it
}
LOCAL_REFUSED = ("security", "protocol")  # the service's own cluster always speaks TLS
LOOPBACK = "127.0.0.1"


class NoHttpWorker(Worker):
    """A worker without its HTTP server (Prometheus metrics and a health page, open to any
    local user): the service's cluster listens for nothing but TLS unless a dashboard is
    asked for."""

    def start_http_server(self, *args: Any, **kwargs: Any) -> None:
        return None


class NoHttpNanny(Nanny):
    """A nanny whose worker process is a :class:`NoHttpWorker`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["worker_class"] = NoHttpWorker
        super().__init__(*args, **kwargs)


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
        from dpypeline.observability import logs

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


def build_cluster(cc: ClusterConfig, tls: TlsConfig | None = None) -> Any:
    """The cluster ``cluster.class`` names, made with ``cluster.options`` (for a
    LocalCluster on top of dpypeline's defaults: single-threaded worker processes, TLS,
    loopback, no dashboard). Another class gets the ``tls`` files, if any, as its
    ``security`` and ``tls://`` as its protocol, unless its options name their own."""
    cls = cluster_class(cc.class_)
    options = dict(cc.options)
    if CLASS_ALIASES.get(cc.class_, cc.class_) != "distributed.LocalCluster":
        if tls is not None:
            options.setdefault("security", tls_security(tls))
            options.setdefault("protocol", "tls://")
        return cls(**options)
    refused = sorted(set(LOCAL_REFUSED) & options.keys())
    if refused:
        raise ConfigError(
            f"executor.cluster.options: {', '.join(refused)} cannot be set for the service's"
            " LocalCluster, which always speaks TLS with a certificate of its own (or those of"
            " executor.tls): remove the option"
        )
    options = {**LOCAL_DEFAULTS, **options}
    if "interface" not in options:  # distributed takes a host or an interface, not both
        options.setdefault("host", LOOPBACK)  # nobody off this machine connects
    options["security"] = tls_security(tls) if tls is not None else Security.temporary()
    options["protocol"] = "tls://"
    dashboard = options["dashboard_address"]
    if dashboard is not None:
        options["dashboard_address"] = on_loopback(str(dashboard))
        return cls(**options)
    # the scheduler starts an HTTP server whatever `dashboard` says: on a loopback port of
    # its own (not 8787, which another cluster may hold), closed as soon as it is up
    options["scheduler_kwargs"] = {
        "dashboard": False,
        "dashboard_address": f"{LOOPBACK}:0",
        **options.get("scheduler_kwargs", {}),
    }
    if "worker_dashboard_address" not in options and "worker_class" not in options:
        options["worker_class"] = NoHttpNanny if options["processes"] else NoHttpWorker
    cluster = cls(**options)
    try:
        cluster.sync(_close_http, cluster)
    except BaseException:
        cluster.close()
        raise
    return cluster


async def _close_http(cluster: Any) -> None:
    """Close the scheduler's HTTP server (identity, task and log pages, metrics), on the
    cluster's event loop, which owns its sockets; no dashboard link is left to show."""
    server = cluster.scheduler.services.pop("dashboard", None)
    if server is not None:
        server.stop()
    cluster.scheduler_info.get("services", {}).pop("dashboard", None)


def on_loopback(address: str) -> str:
    """``":8787"`` -> ``"127.0.0.1:8787"``: a dashboard address without a host would listen
    on every interface; one that names a host is the operator's choice."""
    host, _, port = address.rpartition(":")
    return address if host else f"{LOOPBACK}:{port or 0}"


def tls_security(tls: TlsConfig) -> Security:
    """Distributed's ``Security`` from the operator's files, after checking that nobody
    but the service's user can replace them or read the key."""
    key = tls.key or tls.cert  # the cert file may hold the key as well
    _check_file("tls.ca_file", Path(tls.ca_file), private=key == tls.ca_file)
    _check_file("tls.cert", Path(tls.cert), private=key == tls.cert)
    if tls.key is not None:
        _check_file("tls.key", Path(tls.key), private=True)
    files = {
        f"tls_{role}_{kind}": str(path)
        for role in ("client", "scheduler", "worker")
        for kind, path in (("cert", tls.cert), ("key", key))
    }
    return Security(require_encryption=True, tls_ca_file=str(tls.ca_file), **files)


def _check_file(field: str, path: Path, *, private: bool) -> None:
    """A certificate others could write, or a key others could read, lets them into the
    cluster, and so run code as the service's user: refuse it, as a credentials file."""
    where = f"executor.{field}: {path}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist (fix the path)") from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if private and mode & 0o077:
        raise ConfigError(
            f"{where} holds a private key and is accessible by group or others (mode"
            f" {mode:04o}); it must be private to the service's user: run `chmod 600 {path}`"
        )
    if mode & 0o022:
        raise ConfigError(
            f"{where} is writable by group or others (mode {mode:04o}); whoever can replace"
            f" a certificate can join the cluster: run `chmod go-w {path}`"
        )


def scale(cluster: Any, spec: dict[str, Any]) -> bool:
    """Size the cluster; True if it is adaptive (``minimum``/``maximum``)."""
    if set(SCALE_ADAPTIVE) & spec.keys():
        cluster.adapt(**spec)
        return True
    cluster.scale(**spec)
    return False
