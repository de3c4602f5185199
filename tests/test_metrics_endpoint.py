"""The metrics endpoint against clients that misbehave (idle by the thousand, stalled halfway
through a request, resetting, asking for what it does not serve), over real sockets on
127.0.0.1: the endpoint of the real ``Metrics`` in this process, or of a real service."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Info
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from structlog.testing import capture_logs

from conftest import ServiceProcess, env_for_subprocess, wait_for, write_config
from dpypeline.config.model import load_config
from dpypeline.observability.metrics import Metrics

IDLE = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(tmp_path: Path, port: int, level: str = "info") -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    return write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms", "rescan_interval": "30s"}],
            "jobs": [
                {
                    "name": "work",
                    "tasks": [{"task": "taskbox.record", "with": {"log": str(tmp_path / "runs")}}],
                }
            ],
            "logging": {"format": "json", "level": level},
            "metrics": {"listen": f"127.0.0.1:{port}"},
        },
    )


@contextlib.contextmanager
def serving(tmp_path: Path) -> Iterator[int]:
    """The port of a real ``Metrics`` endpoint, served in this process."""
    metrics = Metrics(["work"])
    metrics.serve(load_config(make_config(tmp_path, free_port()), environ=env_for_subprocess()))
    try:
        assert metrics.address is not None
        yield metrics.address[1]
    finally:
        metrics.close()


def request(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, bytes]:
    """(status, Allow header, body) of one request."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, response.headers.get("Allow", ""), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Allow", ""), err.read()


def native_threads() -> int:
    """The threads of this process as the kernel counts them (a task limit counts these)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])


@pytest.fixture
def enough_files() -> Iterator[None]:
    """Room for IDLE client sockets and as many on the server's side: the soft limit of open
    files raised (up to the hard one) for the test, and put back after it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * IDLE + 256
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE's hard limit {hard} is under the {wanted} files needed")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_idle_connections_cost_no_thread_and_a_scrape_still_answers(
    tmp_path: Path, enough_files: None
) -> None:
    with serving(tmp_path) as port:
        assert request(port)[0] == 200
        before = native_threads()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
        try:
            began = time.monotonic()
            status, _, body = request(port)  # accepted after every idle one
            took = time.monotonic() - began
            during = native_threads()
        finally:
            for sock in idle:
                sock.close()
    assert status == 200
    assert b"dpypeline_jobs_finished_total" in body
    assert took < 5.0, f"a scrape took {took:.2f}s with {IDLE} idle connections open"
    assert during - before <= 2, f"{during - before} more threads with {IDLE} idle connections"


def test_a_half_sent_request_is_dropped_after_the_timeout_and_blocks_no_one() -> None:
    from dpypeline.observability.metrics_endpoint import MetricsEndpoint

    timeout = 3.0
    endpoint = MetricsEndpoint(Metrics(["work"]).registry, "127.0.0.1", 0, request_timeout=timeout)
    endpoint.start()
    try:
        port = endpoint.address[1]
        stalled = socket.create_connection(("127.0.0.1", port))
        trickling = socket.create_connection(("127.0.0.1", port))
        began = time.monotonic()
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        trickling.sendall(b"GET /metrics HTTP/1.1\r\n")
        status, _, body = request(port)
        assert status == 200, "a scrape waited behind a stalled client"
        assert time.monotonic() - began < timeout
        assert b"dpypeline_build_info" in body

        def closed(sock: socket.socket) -> bool:
            sock.settimeout(0.05)
            try:
                return sock.recv(1) == b""
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True

        def both_closed() -> bool:
            with contextlib.suppress(OSError):  # a byte a poll: it never ends its request
                trickling.send(b"X")
            return closed(stalled) and closed(trickling)

        wait_for(both_closed, timeout=timeout + 5, message="both slow clients dropped")
        assert time.monotonic() - began >= timeout * 0.9, "dropped before its time"
        stalled.close()
        trickling.close()
    finally:
        endpoint.close()


def test_a_client_that_takes_not_its_answer_is_dropped_after_the_timeout() -> None:
    from dpypeline.observability.metrics_endpoint import MetricsEndpoint

    registry = CollectorRegistry()  # an answer bigger than the kernel's buffers hold
    Info("big", "A large answer", registry=registry).info({"v": "x" * (16 << 20)})
    endpoint = MetricsEndpoint(registry, "127.0.0.1", 0, write_timeout=1.0)
    endpoint.start()
    try:
        with capture_logs() as logs, socket.socket() as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.connect(endpoint.address)
            slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # never read
            wait_for(
                lambda: any(e.get("kind") == "write_timeout" for e in logs),
                timeout=10,
                message="the slow reader dropped",
            )
            assert request(endpoint.address[1])[0] == 200
            slow.settimeout(5)
            taken = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := slow.recv(1 << 20):
                    taken += len(chunk)
        assert taken < 16 << 20, "the whole answer was taken: the test proved nothing"
    finally:
        endpoint.close()


class Failing(Collector):
    """A collector whose reads fail while ``failing`` is set (a ledger that cannot be read)."""

    failing = True

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        if self.failing:
            raise sqlite3.OperationalError("disk I/O error")
        return []


def test_a_failed_collection_is_a_500_and_the_endpoint_serves_on() -> None:
    from dpypeline.observability.metrics_endpoint import MetricsEndpoint

    metrics = Metrics(["work"])
    metrics.registry.register(failing := Failing())
    endpoint = MetricsEndpoint(metrics.registry, "127.0.0.1", 0)
    endpoint.start()
    try:
        with capture_logs() as logs:
            assert request(endpoint.address[1])[0] == 500
        failed = [e for e in logs if e["event"] == "metrics_collect_failed"]
        assert [e["error"] for e in failed] == ["OperationalError: disk I/O error"]
        failing.failing = False
        status, _, body = request(endpoint.address[1])
        assert status == 200
        assert b"dpypeline_healthy 1.0" in body
    finally:
        endpoint.close()


def test_only_get_and_head_of_metrics_are_answered(tmp_path: Path) -> None:
    with serving(tmp_path) as port:
        for path in ("/", "/metric", "/metrics/", "/metrics/x", "/favicon.ico", "/index.html"):
            assert request(port, path)[0] == 404, path
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
            assert request(port, method=method)[:2] == (405, "GET, HEAD"), method
        status, _, body = request(port)
        assert status == 200
        assert b"# TYPE dpypeline_healthy gauge" in body
        assert request(port, method="HEAD")[::2] == (200, b"")
        assert request(port, "/metrics?name[]=dpypeline_healthy")[2].count(b"\n# HELP") == 0


def test_clients_that_reset_or_send_garbage_are_logged_as_json_events(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    port = free_port()
    service = ServiceProcess(make_config(tmp_path, port, level="debug"))
    service_processes.append(service)
    service.wait_ready()
    for head in (b"GET /metrics HTTP/1.1\r\n", b"GET /metrics HTTP/1.1\r\n\r\n"):
        for _ in range(3):  # reset halfway through a request, and before the answer is read
            rude = socket.create_connection(("127.0.0.1", port))
            rude.sendall(head)
            rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            rude.close()
    with socket.create_connection(("127.0.0.1", port)) as garbage:
        garbage.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")  # TLS, say, to a plain port
        answer = garbage.recv(100)
    assert request(port)[0] == 200

    def kinds() -> set[str]:
        return {e.get("kind", "") for e in service.events("metrics_client_dropped")}

    def raw() -> list[str]:
        return [line for line in service.log.read_text().splitlines() if not _is_json(line)]

    wait_for(lambda: {"reset", "bad_request"} <= kinds() or raw(), message="the clients logged")
    wait_for(lambda: service.events("metrics_clients_dropped") or raw(), message="the warning")
    service.signal(signal.SIGTERM)
    assert service.wait(30) == 0
    assert not raw(), "lines that are not JSON events:\n" + "\n".join(raw()[:20])
    assert {"reset", "bad_request"} <= kinds()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


# -- under a task limit ---------------------------------------------------------------------


def pids_hierarchy() -> Path | None:
    """Where a child cgroup with a pids limit can be made: cgroup v2 with the pids
    controller, else v1's pids hierarchy; None if neither is mounted."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, kind, options, *_ = line.split()
        if kind == "cgroup2" and "pids" in _read(Path(where, "cgroup.subtree_control")).split():
            return Path(where)
        if kind == "cgroup" and "pids" in options.split(","):
            return Path(where)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.fixture
def task_limit() -> Iterator[Path]:
    """A child cgroup whose processes may have 40 tasks (threads) in all, as systemd's
    ``TasksMax=40`` sets; removed after the test's processes are gone."""
    root = pids_hierarchy()
    if root is None:
        pytest.skip("no cgroup hierarchy with the pids controller is mounted")
    group = root / f"dpypeline-test-{os.getpid()}-{threading.get_ident()}"
    try:
        group.mkdir()
        (group / "pids.max").write_text("40\n")
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"cannot make a cgroup with a pids limit under {root}: {exc}")
    yield group
    wait_for(lambda: not _read(group / "cgroup.procs").split(), message="the group empty")
    group.rmdir()


class LimitedService(ServiceProcess):
    """``dpypeline run`` started inside a cgroup (a shell joins it, then execs Python)."""

    def __init__(self, config: Path, group: Path) -> None:
        self.config, self.log = config, config.parent / "service.log"
        self._err = self.log.open("a")
        join = f'echo $$ > "{group}/cgroup.procs" && exec "$@"'
        self.proc = subprocess.Popen(
            ["sh", "-c", join, "sh", sys.executable, "-m", "dpypeline", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            env=env_for_subprocess(),
        )


@pytest.mark.slow
def test_idle_connections_under_a_task_limit_leave_the_service_and_its_jobs_running(
    tmp_path: Path, task_limit: Path, service_processes: list[ServiceProcess]
) -> None:
    port = free_port()
    service = LimitedService(make_config(tmp_path, port), task_limit)
    service_processes.append(service)
    service.wait_ready()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(45)]
    try:

        def served_or_limited() -> bool:
            with contextlib.suppress(OSError):
                return request(port)[0] == 200  # accepted after all 45
            return "max 0" not in _read(task_limit / "pids.events")

        wait_for(served_or_limited, message="the 45 connections taken, or the limit met")
        (tmp_path / "inbox" / "after.nc").write_bytes(b"a")
        wait_for(
            lambda: service.events("job_done") or service.proc.poll() is not None,
            message="the job's end or the service's",
            detail=service.log.read_text,
        )
        assert service.proc.poll() is None, f"the service ended:\n{service.log.read_text()}"
        assert [e["file"] for e in service.events("job_done")] == [
            str(tmp_path / "inbox" / "after.nc")
        ]
        assert request(port)[0] == 200
    finally:
        for sock in idle:
            sock.close()
