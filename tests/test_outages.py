"""Outages of what the jobs write to: a full disk, an object store that hangs, an object store
down at start-up. Each costs no attempt, pauses with growing waits, says so in the log, and
ends by itself when the destination is back."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import xarray as xr
import yaml
from structlog.testing import capture_logs

from conftest import ROOT, ServiceProcess, env_for_subprocess, jobs, status, wait_for, write_config
from dpypeline.config.model import BackoffConfig, ObjectStoreConfig
from dpypeline.errors import PermanentError, Unavailable
from dpypeline.objectstore import classify_errors, filesystem
from dpypeline.outages import PendingSetup, disk_full, disk_full_is_outage
from dpypeline.pipeline import Job, SetupContext, Task
from s3server import KEY, SECRET, S3Server
from tcpproxy import TcpProxy
from test_notify import NotifySocket

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series

BUCKET = "nemo-out"
T = "time_counter"
MOTO = {"objectstore": "moto"}
STORE = f"s3://{BUCKET}/gyre_T.zarr"
FAST_BACKOFF = {"initial": "300ms", "factor": 2, "max": "2s"}
POLL = 0.2  # seconds between looks at a running service (each reads its log or ledger)


def proxied_credentials(directory: Path, proxy: TcpProxy) -> Path:
    path = directory / "s3.json"
    path.write_text(
        json.dumps({"token": KEY, "secret": SECRET, "endpoint_url": proxy.endpoint_url})
    )
    path.chmod(0o600)
    return path


def drop(files: list[Path], inbox: Path) -> None:
    """Files arrive as rsync delivers them: a hidden name, then a rename into place."""
    for f in files:
        shutil.copy(f, inbox / f".{f.name}.part")
        (inbox / f".{f.name}.part").rename(inbox / f.name)


def read_store(s3: S3Server) -> xr.Dataset:
    return xr.open_zarr(
        STORE, storage_options=s3.storage_options(), consolidated=None,
        decode_times=xr.coders.CFDatetimeCoder(use_cftime=True),
    )  # fmt: skip


def time_values(files: list[Path]) -> list[Any]:
    coder = xr.coders.CFDatetimeCoder(use_cftime=True)
    out: list[Any] = []
    for f in files:
        with xr.open_dataset(f, decode_times=coder) as ds:
            out += list(ds.time_counter.values)
    return out


# --- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_anywhere_in_the_exception_chain_is_an_outage_naming_path_and_space(
    tmp_path: Path,
) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("dask task failed") from exc
    except RuntimeError as exc:
        outage = disk_full(exc, "writing out.zarr", str(tmp_path / "out.zarr"))
    assert isinstance(outage, Unavailable)
    message = str(outage)
    assert str(tmp_path / "out.zarr") in message
    assert "ENOSPC" in message
    assert " free of " in message
    quota = OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "x"))
    assert "quota" in str(disk_full(ExceptionGroup("writes", [quota]), "writing x"))
    assert disk_full(OSError(errno.EIO, "I/O error"), "writing x") is None
    assert disk_full(ValueError("x"), "writing x") is None


def test_a_task_that_fills_the_disk_fails_as_an_outage_not_as_its_own_error(
    tmp_path: Path,
) -> None:
    def write(path: str) -> str:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.csv"))

    with pytest.raises(Unavailable, match=r"out\.csv") as info:
        Job("j", [Task(write)]).run("in.csv")
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(PermanentError), disk_full_is_outage("writing"):
        raise PermanentError("not an outage: left alone")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs: a disk that really fills up."""
    mount = tmp_path / "out"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(f"cannot mount a tmpfs: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path) -> Path:
    """Fill the filesystem to the last byte; returns the filler."""
    filler = mount / "filler"
    block, stopped = b"\0" * 65536, None
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            stopped = exc.errno
    assert stopped == errno.ENOSPC
    assert shutil.disk_usage(mount).free < 65536
    return filler


@pytest.mark.slow
def test_a_full_output_disk_pauses_jobs_without_spending_attempts_until_space_returns(
    tmp_path: Path, tmpfs: Path, service_processes: list[ServiceProcess]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    store = tmpfs / "gyre_T.zarr"
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "patterns": ["*.nc"], "settle": "100ms"}],
            "retry": {"max_attempts": 2, "backoff": FAST_BACKOFF},
            "jobs": [
                {
                    "name": "to-zarr",
                    "tasks": [
                        {"task": "open_dataset", "with": {"chunks": {"time_counter": 1}}},
                        {"task": "to_zarr", "with": {"store": str(store), "append_dim": T}},
                    ],
                }
            ],
            "logging": {"format": "json"},
        },
    )  # fmt: skip
    files = make_series(tmp_path / "made", 4)
    filler = fill(tmpfs)
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready()
    drop(files, inbox)
    wait_for(lambda: len(svc.events("service_paused")) >= 3, 60, POLL, message="pauses")
    paused = svc.events("service_paused")
    assert str(store) in paused[0]["error"]
    assert "ENOSPC" in paused[0]["error"]
    assert " free of 2.0 MiB" in paused[0]["error"]
    assert [p["retry_in"] for p in paused[:3]] == sorted(p["retry_in"] for p in paused[:3])
    assert paused[2]["retry_in"] > paused[0]["retry_in"]  # growing waits
    now = status(cfg)
    assert now["dead"] == 0
    assert now["retrying"] == 0
    assert now["done"] == 0
    assert all(j["attempts"] <= 1 for j in jobs(cfg))

    filler.unlink()  # space returns
    wait_for(lambda: status(cfg)["done"] == 4, 60, POLL, message="every file done")
    assert [j["attempts"] for j in jobs(cfg)] == [1, 1, 1, 1]
    assert not svc.events("job_retrying")
    assert not svc.events("job_dead")
    coder = xr.coders.CFDatetimeCoder(use_cftime=True)
    with xr.open_zarr(store, decode_times=coder) as got:
        assert list(got.time_counter.values) == time_values(files)
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


# --- an object store that hangs -----------------------------------------------------------------


def in_thread(call: Any, timeout: float) -> BaseException | None:
    """Run ``call`` on a thread; what it raised, or fail the test if it outlives ``timeout``."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="outage-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"the call still hangs after {timeout}s")
    return outcome[0]


@pytest.mark.parametrize("operation", ["put", "get"])
def test_a_store_that_accepts_and_never_answers_is_an_outage_within_its_timeouts(
    tmp_path: Path, s3: S3Server, s3_proxy: TcpProxy, operation: str
) -> None:
    cfg = ObjectStoreConfig(
        credentials=proxied_credentials(tmp_path, s3_proxy), read_timeout=1.0, attempts=2
    )
    fs = filesystem({"moto": cfg}, "moto")
    fs.mkdir(BUCKET)
    fs.pipe(f"s3://{BUCKET}/x", b"data")
    s3_proxy.set_mode("blackhole")

    def call() -> None:
        with classify_errors(f"writing s3://{BUCKET}/y", objectstore="moto", config=cfg):
            if operation == "put":
                fs.pipe(f"s3://{BUCKET}/y", b"data")  # botocore asks for 100-continue here
            else:
                fs.cat_file(f"s3://{BUCKET}/x")

    started = time.monotonic()
    error = in_thread(call, timeout=30)
    assert isinstance(error, Unavailable), error
    assert "does not answer" in str(error)
    assert time.monotonic() - started < 10  # 2 attempts of 1 s, and botocore's short backoff
    s3_proxy.set_mode("pass")
    fs.pipe(f"s3://{BUCKET}/y", b"data")  # the same client works again


def s3_config(tmp_path: Path, proxy: TcpProxy, **store: Any) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    creds = proxied_credentials(tmp_path, proxy)
    data = {
        "cache_dir": str(tmp_path / "state"),
        "watch": [{"path": str(inbox), "patterns": ["*.nc"], "settle": "100ms"}],
        "retry": {"max_attempts": 2, "backoff": FAST_BACKOFF},
        "objectstores": {"moto": {"credentials": str(creds), **store}},
        "setup": [{"task": "create_bucket", "with": {"objectstore": "moto", "bucket": BUCKET}}],
        "jobs": [
            {
                "name": "to-zarr",
                "tasks": [
                    {"task": "open_dataset", "with": {"chunks": {"time_counter": 1}}},
                    {"task": "to_zarr", "with": {**MOTO, "store": STORE, "append_dim": T}},
                ],
            },
            {"name": "raw", "tasks": [{"task": "upload_file", "with": {**MOTO, "bucket": BUCKET}}]},
        ],
        "logging": {"format": "json"},
    }  # fmt: skip
    return write_config(tmp_path, data), inbox


@pytest.mark.slow
def test_a_store_that_hangs_mid_ingest_pauses_the_service_and_costs_no_attempt(
    tmp_path: Path, s3: S3Server, s3_proxy: TcpProxy, service_processes: list[ServiceProcess]
) -> None:
    cfg, inbox = s3_config(tmp_path, s3_proxy, read_timeout="1s", attempts=2)
    files = make_series(tmp_path / "made", 3)
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready()
    drop(files[:1], inbox)
    wait_for(lambda: status(cfg)["done"] == 2, 60, POLL, message="the first file, both jobs")

    s3_proxy.set_mode("blackhole")
    drop(files[1:], inbox)
    wait_for(lambda: svc.events("service_paused"), 30, POLL, message="the outage noticed")
    paused = svc.events("service_paused")[0]
    assert "does not answer" in paused["error"]
    assert paused["state"] == "queued"
    wait_for(lambda: len(svc.events("service_paused")) >= 2, 30, POLL, message="a 2nd pause")
    now = status(cfg)
    assert now["dead"] == 0
    assert now["retrying"] == 0
    assert now["running"] <= 1
    assert all(j["attempts"] <= 1 for j in jobs(cfg))

    s3_proxy.set_mode("pass")
    wait_for(lambda: status(cfg)["done"] == 6, 60, POLL, message="every job after the outage")
    assert [j["attempts"] for j in jobs(cfg)] == [1] * 6
    assert list(read_store(s3).time_counter.values) == time_values(files)
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


@pytest.mark.slow
def test_with_the_shipped_timeouts_a_silent_store_pauses_the_service_within_a_minute(
    tmp_path: Path, s3: S3Server, s3_proxy: TcpProxy, service_processes: list[ServiceProcess]
) -> None:
    cfg, inbox = s3_config(tmp_path, s3_proxy)  # the default timeouts and attempts
    files = make_series(tmp_path / "made", 2)
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready()
    drop(files[:1], inbox)
    wait_for(lambda: status(cfg)["done"] == 2, 60, POLL, message="the first file")
    s3_proxy.set_mode("blackhole")
    silent_at = time.time()
    drop(files[1:], inbox)
    wait_for(lambda: svc.events("service_paused"), 120, POLL, message="the outage noticed")
    noticed = svc.events("service_paused")[0]
    latency = _timestamp(noticed["timestamp"]) - silent_at
    print(f"pause latency with the shipped defaults: {latency:.1f} s")
    assert latency < 90
    s3_proxy.set_mode("pass")
    wait_for(lambda: status(cfg)["done"] == 4, 120, POLL, message="every job after the outage")
    assert [j["attempts"] for j in jobs(cfg)] == [1] * 4
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


def _timestamp(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# --- an object store down at start-up -----------------------------------------------------------


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    """A datagram socket as systemd's NOTIFY_SOCKET."""
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.sock.close()


def setup_task(objectstore: str, calls: list[str], fail: list[BaseException]) -> None:
    calls.append(objectstore)
    if fail:
        raise fail.pop(0)


def test_setup_waits_out_an_outage_with_growing_waits_and_fails_on_anything_else() -> None:
    calls: list[str] = []
    outages: list[BaseException] = [Unavailable("store down"), Unavailable("store down")]
    task = Task(setup_task, objectstore="jasmin", calls=calls, fail=outages)
    setup = PendingSetup([task], SetupContext(), BackoffConfig(initial=1.0, factor=2, max=10))
    with capture_logs() as logs:
        assert setup.run(100.0) is False
        assert setup.waiting_for == "objectstore 'jasmin'"
        assert setup.next_at == 101.0
        assert setup.run(100.5) is False  # not due yet: not tried
        assert calls == ["jasmin"]
        assert setup.run(101.0) is False
        assert setup.next_at == 103.0  # the wait grew
        assert setup.run(103.0) is True
    assert setup.done
    assert calls == ["jasmin"] * 3
    waits = [e["retry_in"] for e in logs if e["event"] == "setup_waiting"]
    assert waits == [1.0, 2.0]
    assert logs[-1]["event"] == "setup_done"

    taken: list[BaseException] = [PermanentError("name taken")]
    bad = PendingSetup(
        [Task(setup_task, objectstore="jasmin", calls=calls, fail=taken)],
        SetupContext(log=structlog.get_logger()),
        BackoffConfig(),
    )
    with pytest.raises(PermanentError, match="name taken"):
        bad.run(0.0)


@pytest.mark.slow
def test_a_store_down_at_start_up_is_waited_for_then_setup_runs_and_files_are_processed(
    tmp_path: Path, s3: S3Server, s3_proxy: TcpProxy, notify: NotifySocket
) -> None:
    cfg, inbox = s3_config(tmp_path, s3_proxy, read_timeout="1s")
    files = make_series(tmp_path / "made", 2)
    s3_proxy.set_mode("refuse")
    log = tmp_path / "service.log"
    env = {**env_for_subprocess(), "NOTIFY_SOCKET": str(notify.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpypeline", "run", "-c", str(cfg)],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )  # fmt: skip

    def logged(name: str) -> list[dict[str, Any]]:
        return [e for e in map(_json, log.read_text().splitlines()) if e.get("event") == name]

    try:
        wait_for(lambda: notify.sent("READY=1"), timeout=30, message="READY=1")
        ready = next(m for _, m in notify.poll() if "READY=1" in m)
        assert "STATUS=waiting for objectstore 'moto'" in ready
        drop(files, inbox)  # recorded while the store is down, not started
        wait_for(lambda: len(logged("setup_waiting")) >= 3, 30, POLL, message="3 waits")
        assert proc.poll() is None  # alive, several seconds after the first wait
        waits = [e["retry_in"] for e in logged("setup_waiting")]
        assert waits[2] > waits[0]  # growing
        assert "waiting until it answers" in logged("setup_waiting")[0]["error"]
        wait_for(lambda: status(cfg)["queued"] == 4, 20, POLL, message="the files queued")
        assert not logged("job_done")

        s3_proxy.set_mode("pass")
        wait_for(lambda: logged("setup_done"), 30, POLL, message="setup done")
        wait_for(lambda: status(cfg)["done"] == 4, 60, POLL, message="every job done")
        assert [j["attempts"] for j in jobs(cfg)] == [1] * 4
        assert list(read_store(s3).time_counter.values) == time_values(files)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _json(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# --- clean stop -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["serial", "dask"])
def test_a_run_against_an_object_store_ends_without_unclosed_sessions(
    tmp_path: Path, s3: S3Server, s3_proxy: TcpProxy, executor: str
) -> None:
    cfg, inbox = s3_config(tmp_path, s3_proxy)
    if executor == "dask":  # the workers keep clients of their own
        data = yaml.safe_load(cfg.read_text())
        data["executor"] = {"kind": "dask", "cluster": {"options": {"n_workers": 1}}}
        write_config(tmp_path, data)
    drop(make_series(tmp_path / "made", 2), inbox)
    done = subprocess.run(
        [sys.executable, "-m", "dpypeline", "run", "--once", "-c", str(cfg)],
        env=env_for_subprocess(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert status(cfg)["done"] == 4
    assert "Unclosed" not in done.stderr
    assert "service_stopped" in done.stderr
