"""The Dask cluster the service starts lets in nobody but the service: its scheduler, nannies
and workers speak only TLS with a certificate made for this start, listen on loopback, and
have no HTTP server unless a dashboard is asked for. A cluster the operator runs is reached
with the operator's certificate files, which must be private."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from distributed import Client, LocalCluster
from distributed.comm import connect
from distributed.security import Security

from conftest import dpypeline, write_config
from dpypeline.config.model import ClusterConfig, ExecutorConfig, config_from_dict
from dpypeline.errors import ConfigError
from dpypeline.executors.dask import DaskExecutor

if TYPE_CHECKING:
    from dpypeline.config.model import TlsConfig

pytestmark = pytest.mark.slow

CONNECT_TIMEOUT = 3  # seconds a refused client may take to give up
PEM = ("PRIVATE KEY", "BEGIN CERTIFICATE")


def _listening(pid: int) -> set[tuple[str, int]]:
    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
    except psutil.NoSuchProcess:
        return set()
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


def _listening_tree() -> set[tuple[str, int]]:
    """Every listening socket of this process and its children (the worker processes)."""
    pids = [os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))]
    return set().union(*(_listening(pid) for pid in pids))


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture
def executor() -> Iterator[DaskExecutor]:
    """The executor as the service makes it: a LocalCluster of two worker processes."""
    config = ExecutorConfig(kind="dask", cluster=ClusterConfig(options={"n_workers": 2}))
    started = DaskExecutor(threading.Event(), config)
    started.start()
    try:
        yield started
    finally:
        started.close()


def _members(executor: DaskExecutor) -> dict[str, str]:
    """Each worker's address -> its nanny's address."""
    assert executor._client is not None
    info = executor._client.scheduler_info(n_workers=-1)["workers"]
    assert len(info) == 2
    return {address: w["nanny"] for address, w in info.items()}


def test_a_client_without_the_clusters_certificate_is_refused(
    executor: DaskExecutor, tmp_path: Path
) -> None:
    address = executor.describe()["address"]
    marker = tmp_path / "ran"

    def touch() -> None:
        marker.write_text(str(os.getuid()))

    host_port = address.split("://")[1]

    async def attempt(target: str, **extra: Any) -> None:
        client = Client(target, asynchronous=True, timeout=CONNECT_TIMEOUT, **extra)
        try:
            await client
            await client.run(touch)
        finally:
            await client.close()

    for target, extra in (
        (f"tcp://{host_port}", {}),  # no TLS at all
        (address, {"security": Security.temporary()}),  # TLS, with a certificate of its own
    ):
        with pytest.raises((OSError, TimeoutError)) as refused:
            asyncio.run(attempt(target, **extra))
        print(f"{target} {'with its own certificate' if extra else 'plain'}: {refused.value!r}")
    assert address.startswith("tls://127.0.0.1:")
    with pytest.raises(TypeError, match="TLS expects a `ssl_context`"):
        asyncio.run(attempt(address))  # tls:// without any certificate
    assert not marker.exists()
    assert executor._client is not None
    assert sorted(executor._client.run(os.getpid)) == sorted(_members(executor))  # still works


def test_workers_and_nannies_refuse_an_unauthenticated_connection(executor: DaskExecutor) -> None:
    members = _members(executor)
    foreign = Security.temporary().get_connection_args("client")

    async def attempt(target: str, args: dict[str, Any]) -> None:
        comm = await connect(target, timeout=CONNECT_TIMEOUT, **args)
        await comm.close()  # connected: any "run" message could follow

    for address in [*members, *members.values()]:
        target = "tcp://" + address.split("://")[1]
        with pytest.raises((OSError, TimeoutError)) as refused:
            asyncio.run(attempt(target, {}))
        print(f"{target}: {refused.value!r}")
        assert address.startswith("tls://127.0.0.1:")
        with pytest.raises((OSError, TimeoutError)) as refused:
            asyncio.run(attempt(address, {"ssl_context": foreign["ssl_context"]}))
        print(f"{address} with a certificate of its own: {refused.value!r}")


def test_the_cluster_listens_only_on_loopback_and_serves_no_http() -> None:
    before = _listening_tree()
    config = ExecutorConfig(kind="dask", cluster=ClusterConfig(options={"n_workers": 2}))
    executor = DaskExecutor(threading.Event(), config)
    executor.start()
    try:
        opened = _listening_tree() - before
        assert {host for host, _ in opened} == {"127.0.0.1"}, opened
        members = _members(executor)
        comms = {executor.describe()["address"], *members, *members.values()}
        # nothing but the scheduler's, the nannies' and the workers' TLS ports: no HTTP
        assert {port for _, port in opened} == {_port(a) for a in comms}
        assert executor.describe()["dashboard"] is None
        assert executor._client is not None
        info = executor._client.scheduler_info(n_workers=-1)
        assert info["services"] == {}
        assert [w["services"] for w in info["workers"].values()] == [{}, {}]
    finally:
        executor.close()


def test_a_dashboard_asked_for_without_a_host_listens_on_loopback() -> None:
    before = _listening_tree()
    options = {"n_workers": 1, "processes": False, "dashboard_address": ":0"}
    config = ExecutorConfig(kind="dask", cluster=ClusterConfig(options=options))
    executor = DaskExecutor(threading.Event(), config)
    executor.start()
    try:
        link = executor.describe()["dashboard"]
        assert link.startswith("http://127.0.0.1:")
        dashboard_port = int(link.split(":")[2].split("/")[0])
        opened = _listening_tree() - before
        assert ("127.0.0.1", dashboard_port) in opened
        assert {host for host, _ in opened} == {"127.0.0.1"}, opened
    finally:
        executor.close()


def test_an_interface_option_still_chooses_where_the_cluster_listens() -> None:
    options = {"n_workers": 1, "processes": False, "interface": "lo"}  # not host: both clash
    config = ExecutorConfig(kind="dask", cluster=ClusterConfig(options=options))
    executor = DaskExecutor(threading.Event(), config)
    executor.start()
    try:
        assert executor.describe()["address"].startswith("tls://127.0.0.1:")
        assert executor.describe()["workers"] == 1
    finally:
        executor.close()


def test_the_local_cluster_refuses_options_that_would_change_its_security() -> None:
    options = {"n_workers": 1, "processes": False, "protocol": "tcp://"}
    config = ExecutorConfig(kind="dask", cluster=ClusterConfig(options=options))
    executor = DaskExecutor(threading.Event(), config)
    with pytest.raises(ConfigError, match="protocol cannot be set for the service's LocalCluster"):
        executor.start()


# -- the operator's certificate files ------------------------------------------------------


def _tls_files(directory: Path) -> TlsConfig:
    """A CA-signed (here: self-signed) certificate and its key, private to this user."""
    from dpypeline.config.model import TlsConfig

    made = Security.temporary()
    cert, key = directory / "dask.crt", directory / "dask.key"
    for path, text in ((cert, made.tls_client_cert), (key, made.tls_client_key)):
        path.write_text(text)
        path.chmod(0o600)
    return TlsConfig(ca_file=cert, cert=cert, key=key)


def test_a_scheduler_at_an_address_is_reached_with_the_operators_certificate(
    tmp_path: Path,
) -> None:
    from dpypeline.executors.cluster import tls_security

    tls = _tls_files(tmp_path)
    with LocalCluster(
        n_workers=1, processes=False, host="127.0.0.1", dashboard_address=None,
        security=tls_security(tls), protocol="tls://",
    ) as cluster:  # fmt: skip
        address = cluster.scheduler_address
        with_tls = ExecutorConfig(kind="dask", address=address, tls=tls)
        executor = DaskExecutor(threading.Event(), with_tls)
        executor.start()
        try:
            assert executor.describe()["workers"] == 1
            assert executor._client is not None
            assert list(executor._client.run(os.getpid).values()) == [os.getpid()]
        finally:
            executor.close()


def test_the_local_cluster_can_use_the_operators_certificate(tmp_path: Path) -> None:
    from dpypeline.executors.cluster import tls_security

    tls = _tls_files(tmp_path)
    options = {"n_workers": 1, "processes": False}
    config = ExecutorConfig(kind="dask", cluster=ClusterConfig(options=options), tls=tls)
    executor = DaskExecutor(threading.Event(), config)
    executor.start()
    try:
        address = executor.describe()["address"]
        assert address.startswith("tls://127.0.0.1:")
        with Client(address, security=tls_security(tls), timeout=CONNECT_TIMEOUT) as client:
            assert list(client.run(os.getpid).values()) == [os.getpid()]
    finally:
        executor.close()


def test_a_slurm_cluster_gets_the_operators_certificate_for_its_scheduler_and_workers(
    tmp_path: Path,
) -> None:
    """No job is submitted: the scheduler starts here, and the worker jobs' script is read."""
    from dpypeline.executors.cluster import build_cluster

    tls = _tls_files(tmp_path)
    options = {"cores": 1, "memory": "1GB", "interface": "lo", "log_directory": str(tmp_path)}
    cc = ClusterConfig(class_="dask_jobqueue.SLURMCluster", options=options)
    cluster = build_cluster(cc, tls)
    try:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        script = cluster.job_script()
        assert "--protocol tls://" in script
        for flag, path in (("ca-file", tls.ca_file), ("cert", tls.cert), ("key", tls.key)):
            assert f"--tls-{flag} {path}" in script
        assert "BEGIN" not in script
    finally:
        cluster.close()


@pytest.mark.parametrize(
    ("name", "mode", "expected"),
    [
        ("key", 0o640, "holds a private key and is accessible by group or others (mode 0640)"),
        ("key", 0o604, "holds a private key and is accessible by group or others (mode 0604)"),
        ("cert", 0o664, "is writable by group or others (mode 0664)"),
        ("ca_file", 0o646, "is writable by group or others (mode 0646)"),
    ],
    ids=["key-0640", "key-0604", "cert-0664", "ca-0646"],
)
def test_certificate_files_others_could_read_or_replace_are_refused(
    tmp_path: Path, name: str, mode: int, expected: str
) -> None:
    from dpypeline.config.model import TlsConfig
    from dpypeline.executors.cluster import tls_security

    tls = _tls_files(tmp_path)
    ca = tmp_path / "ca.crt"
    ca.write_text(Path(tls.ca_file).read_text())
    ca.chmod(0o644)  # a CA certificate is public: readable by all is fine
    tls = TlsConfig(ca_file=ca, cert=tls.cert, key=tls.key)
    tls_security(tls)
    path = Path(getattr(tls, name))
    path.chmod(mode)
    with pytest.raises(ConfigError) as refused:
        tls_security(tls)
    message = str(refused.value)
    assert message.startswith(f"executor.tls.{name}: {path} ")
    assert expected in message
    assert "chmod" in message
    assert "BEGIN" not in message


def test_validate_names_the_line_of_a_key_others_can_read(tmp_path: Path) -> None:
    tls = _tls_files(tmp_path)
    Path(tls.key).chmod(0o644)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    executor = {
        "kind": "dask",
        "tls": {"ca_file": "dask.crt", "cert": "dask.crt", "key": "dask.key"},
    }
    cfg = write_config(tmp_path, {"cache_dir": str(tmp_path / "state"), "watch": [{"path":
        str(inbox)}], "executor": executor, "jobs": [{"name": "j", "tasks": [{"task":
        "taskbox.noop"}]}]})  # fmt: skip
    proc = dpypeline("validate", "-c", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert f"pipeline.yaml:9: executor.tls.key: {tls.key} holds a private key" in proc.stderr
    assert f"run `chmod 600 {tls.key}`" in proc.stderr
    assert "BEGIN" not in proc.stderr


def test_tls_with_a_plain_tcp_address_is_a_config_error(tmp_path: Path) -> None:
    executor = {
        "kind": "dask",
        "address": "tcp://127.0.0.1:8786",
        "tls": {"ca_file": "ca.crt", "cert": "dask.crt", "key": "dask.key"},
    }
    data = {"watch": [{"path": str(tmp_path)}], "executor": executor, "jobs": [{"name": "j",
            "tasks": [{"task": "taskbox.record"}]}]}  # fmt: skip
    with pytest.raises(ConfigError, match="is not a tls:// address, but tls is set"):
        config_from_dict(data, base_dir=tmp_path)


# -- the service ------------------------------------------------------------------------


def test_the_service_runs_jobs_on_its_secured_cluster_and_logs_no_key(tmp_path: Path) -> None:
    log, inbox = tmp_path / "runs.log", tmp_path / "inbox"
    inbox.mkdir()
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "monitor": False,
            "watch": [{"path": str(inbox), "settle": "100ms"}],
            "executor": {"kind": "dask", "cluster": {"options": {"n_workers": 2}}},
            "jobs": [{"name": "ingest", "tasks": [{"task": "taskbox.record",
                                                   "with": {"log": str(log)}}]}],
            "logging": {"format": "json", "level": "debug"},
        },
    )  # fmt: skip
    for i in range(4):
        (inbox / f"f{i}.nc").write_text("x")
    proc = dpypeline("run", "-c", str(cfg), "--once", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(log.read_text().splitlines()) == 4
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    (ready,) = [e for e in events if e.get("event") == "cluster_ready"]
    assert ready["address"].startswith("tls://127.0.0.1:")
    assert ready["dashboard"] is None
    assert not [e for e in events if e.get("event") == "cluster_unauthenticated"]
    for text in PEM:
        assert text not in proc.stderr
        assert text not in proc.stdout
